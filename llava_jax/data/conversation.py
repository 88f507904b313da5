"""Conversation templates (as LLaVA defines them) and tokenization with the answer mask.

A conversation is LLaVA's list of turns, ``[{"from": "human"|"gpt", "value": str}, ...]``,
humans first and alternating. A template renders it to one string and remembers the
character spans of the assistant answers (each answer plus its end token). The string
is tokenized once with a Hugging Face fast tokenizer; the tokens' character offsets
then decide which tokens are supervised, so the mask never depends on how a tokenizer
glues whitespace to words.

Templates, following ``llava/conversation.py`` and ``llava/train/train.py``:

- ``plain`` (stage 1, ``preprocess_plain``): the human text is replaced by its images,
  then the answer and the separator ``"\\n"``; no system prompt.
- ``vicuna_v1`` (LLaVA-1.5, ``SeparatorStyle.TWO``):
  ``"{system} USER: {q} ASSISTANT: {a}</s>USER: ..."``.
- ``llava_llama_2`` (``SeparatorStyle.LLAMA_2``):
  ``"[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ..."``.
- ``chatml`` (Qwen-style decoders):
  ``"<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n..."``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = "human", "gpt"

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "You are a helpful assistant."


class DroppedExample(Exception):
    """A sample that must not be trained on; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = "", file: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.file = file


class ImageCountError(ValueError):
    """The text has more or fewer image tokens than there are image sizes to expand them."""


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A rendered conversation: the text and the ``[start, end)`` character spans of
    every assistant answer together with its end token."""

    text: str
    answer_spans: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Template:
    """One of LLaVA's conversation formats. ``end`` closes an answer and is supervised."""

    name: str
    system: str
    end: str

    def render(self, turns: Sequence[dict], generation_prompt: bool = False) -> Rendered:
        """Renders ``turns``. With ``generation_prompt`` the text ends where the
        assistant's next answer would start (``turns`` must then end on a human turn)."""
        check_roles(turns, allow_trailing_human=generation_prompt)
        pieces: list[tuple[str, bool]] = []  # (text, is_supervised)
        render_turn = _RENDERERS[self.name]
        for index, turn in enumerate(turns):
            pieces.extend(render_turn(self, index, turn["from"], turn["value"]))
        if generation_prompt:
            pieces.append((_GENERATION_PROMPTS[self.name], False))
        text, spans, position = [], [], 0
        for piece, supervised in pieces:
            if supervised:
                spans.append((position, position + len(piece)))
            text.append(piece)
            position += len(piece)
        return Rendered("".join(text), tuple(spans))


def _plain(t: Template, index: int, role: str, value: str) -> list[tuple[str, bool]]:
    if role == HUMAN:  # preprocess_plain keeps only the image of the human turn
        return [(IMAGE_PLACEHOLDER * value.count(IMAGE_PLACEHOLDER), False)]
    return [(value + t.end, True)]


def _vicuna_v1(t: Template, index: int, role: str, value: str) -> list[tuple[str, bool]]:
    prefix = t.system + " " if index == 0 else ""
    if role == HUMAN:
        return [(f"{prefix}USER: {value} ", False)]
    return [("ASSISTANT: ", False), (value + t.end, True)]


def _llava_llama_2(t: Template, index: int, role: str, value: str) -> list[tuple[str, bool]]:
    if role == HUMAN:
        if index == 0:
            system = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n" if t.system else ""
            return [(f"[INST] {system}{value} [/INST]", False)]
        return [(f"<s>[INST] {value} [/INST]", False)]
    return [(" ", False), (f"{value} {t.end}", True)]


def _mistral_instruct(t: Template, index: int, role: str, value: str) -> list[tuple[str, bool]]:
    # LLaVA-NeXT's conv_mistral_instruct: LLaMA-2's turns with no system prompt and no
    # separator between them ("[INST] q1 [/INST] a1 </s>[INST] q2 [/INST]").
    if role == HUMAN:
        return [(f"[INST] {value} [/INST]", False)]
    return [(" ", False), (f"{value} {t.end}", True)]


def _chatml(t: Template, index: int, role: str, value: str) -> list[tuple[str, bool]]:
    prefix = f"<|im_start|>system\n{t.system}{t.end}\n" if index == 0 and t.system else ""
    if role == HUMAN:
        return [(f"{prefix}<|im_start|>user\n{value}{t.end}\n", False)]
    return [("<|im_start|>assistant\n", False), (value + t.end, True), ("\n", False)]


_RENDERERS = {
    "plain": _plain,
    "vicuna_v1": _vicuna_v1,
    "llava_llama_2": _llava_llama_2,
    "mistral_instruct": _mistral_instruct,
    "chatml": _chatml,
}
_GENERATION_PROMPTS = {
    "plain": "",
    "vicuna_v1": "ASSISTANT:",
    "llava_llama_2": "",
    "mistral_instruct": "",
    "chatml": "<|im_start|>assistant\n",
}

TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", system="", end="\n"),
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM, end="</s>"),
    "llava_llama_2": Template("llava_llama_2", system=LLAMA_2_SYSTEM, end="</s>"),
    "mistral_instruct": Template("mistral_instruct", system="", end="</s>"),
    "chatml": Template("chatml", system=CHATML_SYSTEM, end="<|im_end|>"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"Unknown conversation template {name!r}; choose from {list(TEMPLATES)}")
    return TEMPLATES[name]


def check_roles(turns: Sequence[dict], allow_trailing_human: bool = False) -> None:
    """Raises ``DroppedExample('roles_out_of_order')`` unless turns alternate
    human, gpt, human, gpt, ... (ending on gpt unless ``allow_trailing_human``)."""
    if not turns:
        raise DroppedExample("empty_turn", "conversation has no turns")
    for index, turn in enumerate(turns):
        expected = HUMAN if index % 2 == 0 else GPT
        if turn.get("from") != expected:
            raise DroppedExample(
                "roles_out_of_order", f"turn {index} is from {turn.get('from')!r}, not {expected}"
            )
    if len(turns) % 2 and not allow_trailing_human:
        raise DroppedExample("roles_out_of_order", "the last turn is not an assistant answer")


def move_image_to_front(turns: Sequence[dict]) -> list[dict]:
    """LLaVA's ``preprocess_multimodal`` for one image: the turn holding ``<image>``
    becomes ``"<image>\\n" + rest.strip()``."""
    out = []
    for turn in turns:
        value = turn["value"]
        if IMAGE_PLACEHOLDER in value:
            rest = value.replace(IMAGE_PLACEHOLDER, "").strip()
            value = IMAGE_PLACEHOLDER + "\n" + rest
        out.append({"from": turn["from"], "value": value})
    return out


_WHITESPACE_CODEPOINTS = np.array(
    [9, 10, 11, 12, 13, 32, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
    + list(range(0x2000, 0x200B)),
    dtype=np.uint32,
)


def supervised_tokens(
    text: str, offsets: np.ndarray, answer_spans: Sequence[tuple[int, int]]
) -> np.ndarray:
    """Which tokens belong to an answer: ``bool[N]`` from ``offsets int[N, 2]``.

    A token is supervised when it lies wholly inside an answer span, or when it
    straddles a span edge with a non-whitespace character inside the span (e.g.
    LLaMA's ``"▁red"`` whose space belongs to the prompt). Tokens with empty spans
    (special tokens added by the tokenizer, such as BOS) are never supervised.
    """
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    in_answer = np.zeros(len(text), dtype=np.int64)
    for start, end in answer_spans:
        in_answer[start:end] = 1
    visible = in_answer * ~np.isin(codepoints, _WHITESPACE_CODEPOINTS)
    answer_cum = np.concatenate([[0], np.cumsum(in_answer)])
    visible_cum = np.concatenate([[0], np.cumsum(visible)])
    starts, ends = offsets[:, 0], offsets[:, 1]
    length = ends - starts
    inside = answer_cum[ends] - answer_cum[starts]
    visible_inside = visible_cum[ends] - visible_cum[starts]
    return (length > 0) & ((inside == length) | (visible_inside > 0))


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
    """``input_ids int32[L]`` and ``loss_mask float32[L]`` (L <= max_len), unpadded."""

    input_ids: np.ndarray
    loss_mask: np.ndarray


def image_token_repeats(
    ids: np.ndarray, image_token_id: int, num_image_tokens: int | Sequence[int]
) -> np.ndarray:
    """``int[L]``: how many times each of ``ids`` is repeated so that every image token
    becomes its image's tokens: ``num_image_tokens`` each, or one count per image in order
    (LLaVA-NeXT, where the count depends on the image's size)."""
    is_image = ids == image_token_id
    repeats = np.ones(len(ids), np.int64)
    if isinstance(num_image_tokens, int | np.integer):
        repeats[is_image] = num_image_tokens
    else:
        counts = np.asarray(num_image_tokens, np.int64)
        if len(counts) != int(is_image.sum()):
            raise ImageCountError(
                f"{int(is_image.sum())} image tokens in the text, {len(counts)} image sizes"
            )
        repeats[is_image] = counts
    return repeats


def tokenize_conversation(
    turns: Sequence[dict],
    tokenizer,
    template: Template,
    num_images: int,
    num_image_tokens: int | Sequence[int],
    max_len: int,
    image_token_id: int,
) -> TokenizedConversation:
    """Renders, tokenizes once, expands each ``<image>`` to its image's tokens
    (``num_image_tokens``: one count for every image, or one per image in order) and
    truncates to ``max_len``.

    Raises ``DroppedExample`` when the sample must not be trained on: roles out of order,
    an empty turn, ``<image>`` count != ``num_images``, image tokens cut by truncation,
    or no supervised token left.
    """
    check_roles(turns)
    for index, turn in enumerate(turns):
        if not str(turn.get("value", "")).strip():
            raise DroppedExample("empty_turn", f"turn {index} is empty")
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != num_images:
        raise DroppedExample(
            "image_count_mismatch", f"{placeholders} <image> in text, {num_images} images"
        )
    if num_images == 1:
        turns = move_image_to_front(turns)
    rendered = template.render(turns)
    encoding = tokenizer(
        rendered.text, return_offsets_mapping=True, add_special_tokens=True, verbose=False
    )
    ids = np.asarray(encoding["input_ids"], dtype=np.int32)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    supervised = supervised_tokens(rendered.text, offsets, rendered.answer_spans)

    is_image = ids == image_token_id
    if int(is_image.sum()) != num_images:
        raise DroppedExample(
            "image_count_mismatch",
            f"tokenizer produced {int(is_image.sum())} image tokens for {num_images} images",
        )
    repeats = image_token_repeats(ids, image_token_id, num_image_tokens)
    ids = np.repeat(ids, repeats)
    supervised = np.repeat(supervised & ~is_image, repeats)

    if len(ids) > max_len:
        last_image_end = 0
        if num_images:
            last_image_end = int(np.flatnonzero(ids == image_token_id)[-1]) + 1
        if last_image_end > max_len:
            raise DroppedExample(
                "image_truncated", f"image tokens end at {last_image_end} > max_len {max_len}"
            )
        ids, supervised = ids[:max_len], supervised[:max_len]
    if not supervised.any():
        raise DroppedExample("no_supervised_tokens", "no answer token within max_len")
    return TokenizedConversation(ids, supervised.astype(np.float32))


def generation_prompt(turns: Sequence[dict], template: Template) -> str:
    """The text a model continues to answer the last human turn of ``turns``
    (images already moved as in training when there is a single ``<image>``)."""
    if sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns) == 1:
        turns = move_image_to_front(turns)
    return template.render(turns, generation_prompt=True).text
