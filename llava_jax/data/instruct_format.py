"""What LLaVA's GPT-assisted data generation sends and reads: prompt folders, the messages of
one request, the replies' format, and the LLaVA JSON records made from them.

Kinds (LLaVA-Instruct-158K's three, and stage 1's captions):

- `conversation`: sees the captions; replies with `Question:` / `Answer:` blocks, `===`
  between them; one multi-turn record.
- `detail_description`: sees captions and boxes; replies in free text; one turn, its
  instruction drawn from the paper's list.
- `complex_reasoning`: sees captions and boxes; replies with one `Question:` … `===`
  `Answer:` … pair; one turn.
- `brief` (stage 1, no LLM): a record per caption, the caption as the answer.

A prompt folder holds one folder per kind in LLaVA's layout (`playground/data/prompts`):
`system_message.txt` and few-shot pairs `000_caps.txt` (a context) / `000_conv.txt` (the reply
it should get), `001_…`, in number order. A request is the system message, each pair as a
user and an assistant message, then the image's context as the last user message, as LLaVA's
README shows. The package's own folders are `instruct_prompts/`; `--prompts` takes LLaVA's.

Records: `<image>` goes in the first human turn, before or after its text at random (as in
LLaVA-Instruct); a detailed description's instruction is drawn from the paper's Table 9 list,
a brief one's from Table 8. The draws come from `random.Random(seed/kind/id/image)`: the same
run gives the same records, whatever order or process made them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
from typing import Any

from llava_jax.data.annotations import ImageAnnotations, render_context
from llava_jax.data.conversation import IMAGE_PLACEHOLDER
from llava_jax.errors import InputError

CONVERSATION = "conversation"
DETAIL = "detail_description"
REASONING = "complex_reasoning"
BRIEF = "brief"
LLM_KINDS = (CONVERSATION, DETAIL, REASONING)
KINDS = (*LLM_KINDS, BRIEF)
SEES_BOXES = {CONVERSATION: False, DETAIL: True, REASONING: True}
DEFAULT_PROMPTS = os.path.join(os.path.dirname(__file__), "instruct_prompts")
SYSTEM_FILE = "system_message.txt"

# The LLaVA paper's Table 8: stage 1's instructions for a brief description.
BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
# The LLaVA paper's Table 9: instructions for a detailed description.
DETAIL_INSTRUCTIONS = (
    "Describe the following image in detail",
    "Provide a detailed description of the given image",
    "Give an elaborate explanation of the image you see",
    "Share a comprehensive rundown of the presented image",
    "Offer a thorough analysis of the image",
    "Explain the various aspects of the image before you",
    "Clarify the contents of the displayed image with great detail",
    "Characterize the image using a well-detailed description",
    "Break down the elements of the image in a detailed manner",
    "Walk through the important details of the image",
    "Portray the image with a rich, descriptive narrative",
    "Narrate the contents of the image with precision",
    "Analyze the image in a comprehensive and detailed manner",
    "Illustrate the image through a descriptive explanation",
    "Examine the image closely and share its details",
    "Write an exhaustive depiction of the given image",
)

# A reply that names where its knowledge came from cannot be an answer about an image.
SOURCE_LEAK = re.compile(r"\bcaption|bounding box|\bcoordinates\b", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(Question|Answer)\s*:\s*(.*)$")
_SEPARATOR = "==="
_PAIR = re.compile(r"^(\d+)_(caps|conv)\.txt$")


class PromptFolderError(InputError):
    """A prompt folder that cannot be used; the message names the file."""


class ReplyError(Exception):
    """A reply that makes no record: `reason` (a `REPLY_PROBLEMS` key) and a detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


REPLY_PROBLEMS = ("empty_reply", "unparsable", "leaks_source")


@dataclasses.dataclass(frozen=True)
class Prompts:
    """One kind's prompt folder: the system message and the few-shot (context, reply) pairs."""

    kind: str
    folder: str
    system: str
    examples: tuple[tuple[str, str], ...]

    def digest(self) -> str:
        """SHA-256 of what is sent (a rerun with other prompts is refused)."""
        parts = [self.system, *(text for pair in self.examples for text in pair)]
        return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError:
        raise PromptFolderError(f"{path}: no such file") from None
    except OSError as err:
        raise PromptFolderError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise PromptFolderError(f"{path}: not UTF-8 text ({err.reason})") from None
    if not text:
        raise PromptFolderError(f"{path}: empty")
    return text


def load_prompts(root: str, kind: str) -> Prompts:
    """`root/kind`'s system message and few-shot pairs (LLaVA's layout, see the docstring)."""
    folder = os.path.join(root, kind)
    if not os.path.isdir(folder):
        raise PromptFolderError(
            f"{folder}: no such folder; --prompts needs one folder per kind "
            f"({', '.join(LLM_KINDS)}) holding {SYSTEM_FILE} and NNN_caps.txt / NNN_conv.txt pairs"
        )
    system = _read_text(os.path.join(folder, SYSTEM_FILE))
    numbers: dict[str, set[str]] = {}
    for name in os.listdir(folder):
        found = _PAIR.match(name)
        if found:
            numbers.setdefault(found.group(1), set()).add(found.group(2))
    examples = []
    for number in sorted(numbers, key=int):
        for part in ("caps", "conv"):
            if part not in numbers[number]:
                raise PromptFolderError(
                    f"{os.path.join(folder, f'{number}_{part}.txt')}: no such file (its pair "
                    f"{number}_{'conv' if part == 'caps' else 'caps'}.txt is there)"
                )
        context = _read_text(os.path.join(folder, f"{number}_caps.txt"))
        reply = _read_text(os.path.join(folder, f"{number}_conv.txt"))
        examples.append((context, reply))
    return Prompts(kind, folder, system, tuple(examples))


def request_messages(prompts: Prompts, image: ImageAnnotations) -> list[dict[str, str]]:
    """System message, few-shot pairs as user/assistant turns, then this image's context."""
    messages = [{"role": "system", "content": prompts.system}]
    for context, reply in prompts.examples:
        messages.append({"role": "user", "content": context})
        messages.append({"role": "assistant", "content": reply})
    context = render_context(image, with_boxes=SEES_BOXES[prompts.kind])
    messages.append({"role": "user", "content": context})
    return messages


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a `Question:` … `===` `Answer:` … reply, in order.
    A label's text may start on its line or the next; `===` lines separate blocks. Raises
    `ReplyError("unparsable")` for anything else."""
    blocks: list[tuple[str, list[str]]] = []
    for number, line in enumerate(text.strip().split("\n"), start=1):
        if line.strip() == _SEPARATOR:
            continue
        label = _LABEL.match(line)
        if label:
            blocks.append((label.group(1), [label.group(2)]))
        elif blocks:
            blocks[-1][1].append(line)
        elif line.strip():
            raise ReplyError("unparsable", f"line {number} comes before any 'Question:'")
    if not blocks:
        raise ReplyError("unparsable", "no 'Question:' / 'Answer:' blocks")
    pairs = []
    for index, (label, lines) in enumerate(blocks):
        expected = "Question" if index % 2 == 0 else "Answer"
        if label != expected:
            raise ReplyError("unparsable", f"block {index + 1} is {label}:, expected {expected}:")
        body = "\n".join(lines).strip()
        if not body:
            raise ReplyError("unparsable", f"block {index + 1} ({label}:) is empty")
        if expected == "Question":
            pairs.append([body, ""])
        else:
            pairs[-1][1] = body
    if len(blocks) % 2:
        raise ReplyError("unparsable", f"the last question ({pairs[-1][0][:60]!r}) has no answer")
    return [(q, a) for q, a in pairs]


def parse_reply(kind: str, text: str | None) -> list[tuple[str, str]] | str:
    """The reply's content: pairs (conversation, complex_reasoning) or a description."""
    if text is None or not text.strip():
        raise ReplyError("empty_reply", "the reply has no text")
    if kind == DETAIL:
        content: list[tuple[str, str]] | str = text.strip()
        if _LABEL.match(content.split("\n")[0]):
            raise ReplyError("unparsable", "a description was asked for, not Question/Answer")
        texts = [content]
    else:
        content = parse_pairs(text)
        if kind == REASONING and len(content) != 1:
            raise ReplyError("unparsable", f"{len(content)} question/answer pairs, expected one")
        texts = [t for pair in content for t in pair]
    for piece in texts:
        leak = SOURCE_LEAK.search(piece)
        if leak:
            start = max(0, leak.start() - 40)
            raise ReplyError(
                "leaks_source", f"says {leak.group(0)!r}: …{piece[start : leak.end() + 40]}…"
            )
    return content


def _rng(seed: int, kind: str, image: ImageAnnotations) -> random.Random:
    return random.Random(f"{seed}/{kind}/{image.id}/{image.image}")


def _with_image(text: str, rng: random.Random) -> str:
    """`<image>` before or after the turn's text, as LLaVA-Instruct places it."""
    if rng.random() < 0.5:
        return f"{IMAGE_PLACEHOLDER}\n{text}"
    return f"{text}\n{IMAGE_PLACEHOLDER}"


def _record(image: ImageAnnotations, pairs: list[tuple[str, str]], rng: random.Random) -> dict:
    turns = []
    for index, (question, answer) in enumerate(pairs):
        turns.append(
            {"from": "human", "value": _with_image(question, rng) if index == 0 else question}
        )
        turns.append({"from": "gpt", "value": answer})
    return {"id": image.id, "image": image.image, "conversations": turns}


def make_records(
    kind: str, image: ImageAnnotations, content: Any, seed: int
) -> list[dict[str, Any]]:
    """The LLaVA JSON records of one image and kind (`content`: parse_reply's; for brief,
    unused: each caption is an answer)."""
    rng = _rng(seed, kind, image)
    if kind == BRIEF:
        return [
            _record(image, [(rng.choice(BRIEF_INSTRUCTIONS), caption)], rng)
            for caption in image.captions
        ]
    if kind == DETAIL:
        return [_record(image, [(rng.choice(DETAIL_INSTRUCTIONS), content)], rng)]
    return [_record(image, list(content), rng)]
