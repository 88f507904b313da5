"""Conversation templates (as LLaVA defines them), and a conversation's tokens and targets.

A conversation is LLaVA's list of turns, ``[{"from": "human"|"gpt", "value": str}, ...]``,
humans first and alternating. A template renders it turn by turn (`Rendered`): prompt k is
human turn k up to where answer k starts (exactly the text a program sends the model to
answer it), answer k is the answer with its end. Pieces of text are text, whatever they
hold; only the template's own special tokens (``</s>``, ``<s>``, ``<|im_start|>``,
``<|im_end|>``) are control pieces, and ``<image>`` is the image placeholder.

Tokens follow LLaVA's ``tokenizer_image_token``: the text between two ``<image>`` is
tokenized on its own (with a SentencePiece tokenizer the text after an image starts a new
word, ``▁``), the first part with the tokenizer's BOS (`tokenizer.TextEncoder`).

The targets keep one invariant: **the prompt a program builds for turn k, followed by turn
k's answer targets, is exactly the training row's tokens up to the end of answer k.** So the
targets of answer k are the row's tokens after the tokens of prompt k, through the end of
answer k (``qwen_1_5`` adds LLaVA-NeXT's other targets, above, outside the answers):
a space the tokenizer splits off before the answer (LLaMA's ``▁`` before a digit) is a
target, as in LLaVA, because at inference the model must produce it. A conversation whose
prompt tokens are not a prefix of its row (a tokenizer that merges across the boundary) is
dropped, never trained on shifted targets.

Templates, following ``llava/conversation.py`` and ``llava/train/train.py``:

- ``plain`` (stage 1, ``preprocess_plain``): the human text is replaced by its images,
  then the answer and the separator ``"\\n"``; no system prompt.
- ``vicuna_v1`` (LLaVA-1.5's ``--version v1``: ``conv_vicuna_v1``, ``SeparatorStyle.TWO``):
  ``"{system} USER: {q} ASSISTANT: {a}</s>USER: ..."``.
- ``llava_llama_2`` (``SeparatorStyle.LLAMA_2``):
  ``"[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ..."``.
- ``mistral_instruct`` (LLaVA-NeXT's ``conv_mistral_instruct``): LLaMA-2's turns with no
  system prompt and no separator between them.
- ``chatml`` (Qwen-style decoders):
  ``"<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n..."``.
- ``qwen_1_5`` (LLaVA-OneVision's: LLaVA-NeXT's ``conv_qwen``, ``SeparatorStyle.CHATML``, and
  its trainer's ``preprocess_qwen``): every message, the system prompt first, is
  ``"<|im_start|>{role}\\n{text}<|im_end|>\\n"``; a prompt ends with
  ``"<|im_start|>assistant\\n"``. Its targets are LLaVA-NeXT's, more than the answers: each
  answer's header ``"<|im_start|>assistant\\n"`` (`Template.supervised_header`), and every
  ``<|im_start|>``, ``<|im_end|>`` and lone ``"\\n"`` token of the row, system and user
  turns included (`Template.always_targets`). A turn with exactly one ``<image>`` gets it
  in front, as LLaVA-NeXT's ``preprocess_multimodal`` does (`move_each_single_image_to_front`).

``data.template_version`` names the format a model was trained with (`TEMPLATE_VERSION`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from llava_jax.data.tokenizer import LoadedTokenizer

IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = "human", "gpt"

# Versions of the conversation format (`data.template_version`):
# 1: before 2026-12: vicuna_v1 with LLaVA-1's system prompt (conv_llava_v1), the whole text
#    tokenized at once (the text after <image> glued to it; special-token strings in the
#    data were control tokens) and the space before an answer never a target. Models trained
#    then are prompted this way so that they answer as they were trained; nothing trains on it.
# 2: LLaVA's own tokens and targets (this module's docstring).
TEMPLATE_VERSION = 2
TEMPLATE_VERSIONS = (1, 2)

VICUNA_SYSTEM = (  # LLaVA's conv_vicuna_v1, the template LLaVA-1 and 1.5 train with
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (  # LLaVA's conv_llava_v1: what vicuna_v1 said in template version 1
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "You are a helpful assistant."  # also LLaVA-NeXT's preprocess_qwen default
BOS, EOS, IM_START, IM_END = "<s>", "</s>", "<|im_start|>", "<|im_end|>"
CONTROL_TOKENS = (BOS, EOS, IM_START, IM_END)  # every template's control pieces


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
class Piece:
    """A run of rendered text. ``control``: one of the template's own special tokens (e.g.
    ``</s>``), which becomes that token where the tokenizer has it; every other piece is
    text, even when it spells a special token."""

    text: str
    control: bool = False


Pieces = tuple[Piece, ...]


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A conversation rendered turn by turn: ``prompts[k]`` (human turn k up to where answer
    k starts) and ``answers[k]`` (answer k and its end). The text is prompt 0, answer 0,
    prompt 1, …; a generation prompt has one prompt more than answers."""

    prompts: tuple[Pieces, ...]
    answers: tuple[Pieces, ...]

    def prefix(self, prompts: int, answers: int) -> Pieces:
        """The pieces of the first ``prompts`` prompts and ``answers`` answers, in order."""
        pieces: list[Piece] = []
        for k in range(prompts):
            pieces.extend(self.prompts[k])
            if k < answers:
                pieces.extend(self.answers[k])
        return tuple(pieces)

    @property
    def pieces(self) -> Pieces:
        return self.prefix(len(self.prompts), len(self.answers))

    @property
    def text(self) -> str:
        return "".join(piece.text for piece in self.pieces)


def _text(text: str) -> Piece:
    return Piece(text)


def _control(text: str) -> Piece:
    return Piece(text, control=True)


# A template's two renderers: prompt(template, k, question) and answer(template, answer).
PromptRenderer = Callable[["Template", int, str], Pieces]
AnswerRenderer = Callable[["Template", str], Pieces]


def _plain_prompt(t: Template, k: int, question: str) -> Pieces:
    # preprocess_plain keeps only the images of the human turn
    return (_text(IMAGE_PLACEHOLDER * question.count(IMAGE_PLACEHOLDER)),)


def _plain_answer(t: Template, answer: str) -> Pieces:
    return (_text(answer + t.end),)


def _vicuna_v1_prompt(t: Template, k: int, question: str) -> Pieces:
    system = f"{t.system} " if k == 0 else ""
    return (_text(f"{system}USER: {question} ASSISTANT:"),)


def _vicuna_v1_answer(t: Template, answer: str) -> Pieces:
    return (_text(f" {answer}"), _control(t.end))


def _llava_llama_2_prompt(t: Template, k: int, question: str) -> Pieces:
    if k == 0:
        system = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n" if t.system else ""
        return (_text(f"[INST] {system}{question} [/INST]"),)
    return (_control(BOS), _text(f"[INST] {question} [/INST]"))


def _mistral_instruct_prompt(t: Template, k: int, question: str) -> Pieces:
    # LLaVA-NeXT's conv_mistral_instruct: no system prompt, no separator between turns; a
    # caller's system text goes before the first question (as Mistral's chat template does)
    if k == 0 and t.system:
        question = f"{t.system}\n\n{question}"
    return (_text(f"[INST] {question} [/INST]"),)


def _llama_2_answer(t: Template, answer: str) -> Pieces:
    return (_text(f" {answer} "), _control(t.end))


def _chatml_prompt(t: Template, k: int, question: str) -> Pieces:
    system: Pieces = ()
    if k == 0 and t.system:
        system = (_control(IM_START), _text(f"system\n{t.system}"), _control(IM_END), _text("\n"))
    before = () if k == 0 else (_text("\n"),)  # the newline after the previous <|im_end|>
    return (
        *before,
        *system,
        _control(IM_START),
        _text(f"user\n{question}"),
        _control(IM_END),
        _text("\n"),
        _control(IM_START),
        _text("assistant\n"),
    )


def _chatml_answer(t: Template, answer: str) -> Pieces:
    return (_text(answer), _control(t.end))


# qwen_1_5: the end of every prompt, which LLaVA-NeXT's preprocess_qwen trains on
QWEN_ASSISTANT_HEADER: Pieces = (_control(IM_START), _text("assistant\n"))


def _qwen_message(role: str, text: str) -> Pieces:
    return (_control(IM_START), _text(f"{role}\n{text}"), _control(IM_END), _text("\n"))


def _qwen_1_5_prompt(t: Template, k: int, question: str) -> Pieces:
    # preprocess_qwen writes the system message even when it is empty, as Qwen2's chat
    # template does for a given one
    system = _qwen_message("system", t.system) if k == 0 else ()
    return (*system, *_qwen_message("user", question), *QWEN_ASSISTANT_HEADER)


def _qwen_1_5_answer(t: Template, answer: str) -> Pieces:
    # the "\n" after <|im_end|> closes the message and is a target in LLaVA-NeXT
    return (_text(answer), _control(t.end), _text("\n"))


_RENDERERS: dict[str, tuple[PromptRenderer, AnswerRenderer]] = {
    "plain": (_plain_prompt, _plain_answer),
    "vicuna_v1": (_vicuna_v1_prompt, _vicuna_v1_answer),
    "llava_llama_2": (_llava_llama_2_prompt, _llama_2_answer),
    "mistral_instruct": (_mistral_instruct_prompt, _llama_2_answer),
    "chatml": (_chatml_prompt, _chatml_answer),
    "qwen_1_5": (_qwen_1_5_prompt, _qwen_1_5_answer),
}
# Templates trained with LLaVA-NeXT's preprocess_multimodal, which moves the image of each
# turn holding exactly one to its front; LLaVA-1.5's moves a conversation's one image.
_IMAGE_TO_FRONT_PER_TURN = frozenset({"qwen_1_5"})


@dataclasses.dataclass(frozen=True)
class Template:
    """One of LLaVA's conversation formats. ``end`` closes an answer and is a target (and,
    at inference, a stop string).

    ``supervised_header``: pieces that end every prompt and are targets all the same;
    ``always_targets``: texts, each one token, that are targets wherever they are in the
    row. Both are LLaVA-NeXT's ``preprocess_qwen`` (``qwen_1_5``); other templates train on
    their answers only."""

    name: str
    system: str
    end: str
    version: int = TEMPLATE_VERSION
    supervised_header: Pieces = ()
    always_targets: tuple[str, ...] = ()

    def render(self, turns: Sequence[dict], generation_prompt: bool = False) -> Rendered:
        """Renders ``turns`` (a single ``<image>`` moved to the front of its turn, as
        LLaVA's ``preprocess_multimodal`` does; for ``qwen_1_5`` each turn's single image,
        as LLaVA-NeXT's does). With ``generation_prompt`` the turns end
        on a human turn and the rendering ends where the assistant's answer would start."""
        check_roles(turns, allow_trailing_human=generation_prompt)
        if self.name in _IMAGE_TO_FRONT_PER_TURN:
            turns = move_each_single_image_to_front(turns)
        elif sum(str(turn["value"]).count(IMAGE_PLACEHOLDER) for turn in turns) == 1:
            turns = move_image_to_front(turns)
        render_prompt, render_answer = _RENDERERS[self.name]
        prompts = tuple(render_prompt(self, k, turn["value"]) for k, turn in enumerate(turns[0::2]))
        answers = tuple(render_answer(self, turn["value"]) for turn in turns[1::2])
        return Rendered(prompts, answers)


def with_system(template: Template, system: str) -> Template:
    """`template` with `system` as its system prompt (a chat request's system message);
    `mistral_instruct`, which has none, puts it before the first question. Raises
    `ValueError` for `plain`, whose prompts hold only images."""
    if template.name == "plain":
        raise ValueError(
            "the 'plain' template (stage 1) keeps no text of the conversation but its images: "
            "it has no place for a system message"
        )
    return dataclasses.replace(template, system=system)


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", system="", end="\n"),
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM, end=EOS),
    "llava_llama_2": Template("llava_llama_2", system=LLAMA_2_SYSTEM, end=EOS),
    "mistral_instruct": Template("mistral_instruct", system="", end=EOS),
    "chatml": Template("chatml", system=CHATML_SYSTEM, end=IM_END),
    "qwen_1_5": Template(
        "qwen_1_5",
        system=CHATML_SYSTEM,
        end=IM_END,
        supervised_header=QWEN_ASSISTANT_HEADER,
        # preprocess_qwen's unmask_tokens_idx = [198, im_start, im_end]: 198 is "\n" in Qwen's
        # vocabulary; here "\n" is whatever single token the tokenizer gives it
        always_targets=(IM_START, IM_END, "\n"),
    ),
}


def get_template(name: str, version: int = TEMPLATE_VERSION) -> Template:
    """The template ``name`` as conversation format ``version`` wrote it."""
    if name not in TEMPLATES:
        raise ValueError(f"Unknown conversation template {name!r}; choose from {list(TEMPLATES)}")
    if version not in TEMPLATE_VERSIONS:
        raise ValueError(
            f"Unknown conversation template version {version}; known: {TEMPLATE_VERSIONS}"
        )
    template = dataclasses.replace(TEMPLATES[name], version=version)
    if version == 1 and name == "vicuna_v1":
        template = dataclasses.replace(template, system=LLAVA_V1_SYSTEM)
    return template


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


def skip_leading_answer(turns: Sequence[dict]) -> list[dict]:
    """LLaVA's ``preprocess_v1``: a conversation that starts with a ``gpt`` turn loses that
    turn and trains on the rest."""
    turns = list(turns)
    if turns and isinstance(turns[0], dict) and turns[0].get("from") == GPT:
        return turns[1:]
    return turns


def move_each_single_image_to_front(turns: Sequence[dict]) -> list[dict]:
    """LLaVA-NeXT's ``preprocess_multimodal``: a turn with exactly one ``<image>``, not
    already first, becomes ``"<image>\\n" + rest.strip()``; turns with several images stay
    as they are."""
    out = []
    for turn in turns:
        value = turn["value"]
        if value.count(IMAGE_PLACEHOLDER) == 1 and not value.startswith(IMAGE_PLACEHOLDER):
            rest = value.replace(IMAGE_PLACEHOLDER, "").strip()
            value = (IMAGE_PLACEHOLDER + "\n" + rest).strip()
        out.append({"from": turn["from"], "value": value})
    return out


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


def encode_rendered(rendered: Rendered, tokenizer: LoadedTokenizer, version: int) -> np.ndarray:
    """``int32[L]``, one image token per ``<image>``: the whole of ``rendered``, tokenized as
    LLaVA does (version 2), or at once as template version 1 did."""
    if version == 1:
        return np.asarray(tokenizer.tokenizer(rendered.text)["input_ids"], np.int32)
    return tokenizer.text_encoder.encode(rendered.pieces)


def always_target_ids(template: Template, tokenizer: LoadedTokenizer) -> np.ndarray:
    """``int32[N]``: the ids of ``template.always_targets``. Raises ``ValueError`` naming
    the template when the tokenizer does not give one of them a single token."""
    ids = []
    for text in template.always_targets:
        encoded = tokenizer.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(
                f"template {template.name!r} trains on {text!r} as one token, which this "
                f"tokenizer makes {encoded}: use the tokenizer the template was made for "
                "(qwen_1_5: Qwen's, with <|im_start|> and <|im_end|> special tokens)"
            )
        ids.append(encoded[0])
    return np.asarray(ids, np.int32)


def tokenize_conversation(
    turns: Sequence[dict],
    tokenizer: LoadedTokenizer,
    template: Template,
    num_images: int,
    num_image_tokens: int | Sequence[int],
    max_len: int,
) -> TokenizedConversation:
    """The training row of ``turns``: rendered, tokenized as LLaVA does, each ``<image>``
    expanded to its image's tokens (``num_image_tokens``: one count for every image, or one
    per image in order), the targets of every answer marked, truncated to ``max_len``.

    The targets are each answer and its end, and what else ``template`` trains on
    (``supervised_header``, ``always_targets``). A leading ``gpt`` turn is skipped, as LLaVA
    does. Raises ``DroppedExample`` when the sample must not be trained on: roles out of
    order, an empty turn, ``<image>`` count != ``num_images``, a prompt whose tokens are not
    a prefix of the row's, image tokens cut by truncation, or no answer token left.
    """
    if template.version != TEMPLATE_VERSION:
        raise ValueError(
            f"template version {template.version} is kept only so that models trained with "
            f"it still answer; training uses version {TEMPLATE_VERSION}"
        )
    turns = skip_leading_answer(turns)
    check_roles(turns)
    for index, turn in enumerate(turns):
        if not str(turn.get("value", "")).strip():
            raise DroppedExample("empty_turn", f"turn {index} is empty")
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != num_images:
        raise DroppedExample(
            "image_count_mismatch", f"{placeholders} <image> in text, {num_images} images"
        )
    rendered = template.render(turns)
    header = len(template.supervised_header)
    # for each answer k, the number of pieces through: the start of its prompt's supervised
    # header (its prompt's end where there is none), its prompt, the answer
    spans, count = [], 0
    for prompt, answer in zip(rendered.prompts, rendered.answers, strict=True):
        if prompt[len(prompt) - header :] != template.supervised_header:
            raise ValueError(f"template {template.name!r}: a prompt does not end with its header")
        count += len(prompt)
        spans.append((count - header, count, count + len(answer)))
        count += len(answer)
    cuts = sorted({cut for span in spans for cut in span})
    ids, lengths = tokenizer.text_encoder.encode_with_prefixes(rendered.pieces, cuts)
    tokens_through = dict(zip(cuts, lengths, strict=True))
    answer_targets = np.zeros(len(ids), bool)  # the answers and their ends
    targets = np.zeros(len(ids), bool)  # and what else the template trains on
    for k, span in enumerate(spans):
        header_start, prompt, through_answer = (tokens_through[cut] for cut in span)
        if header_start is None or prompt is None or through_answer is None:
            raise DroppedExample(
                "prompt_not_prefix",
                f"answer {k}: the tokens of its prompt are not the start of the row's (the "
                "tokenizer joins text across the start or end of the answer)",
            )
        answer_targets[prompt:through_answer] = True
        targets[header_start:through_answer] = True
    if template.always_targets:
        targets |= np.isin(ids, always_target_ids(template, tokenizer))

    image_token_id = tokenizer.image_token_id
    is_image = ids == image_token_id
    if int(is_image.sum()) != num_images:
        raise DroppedExample(
            "image_count_mismatch",
            f"tokenizer produced {int(is_image.sum())} image tokens for {num_images} images",
        )
    repeats = image_token_repeats(ids, image_token_id, num_image_tokens)
    ids = np.repeat(ids, repeats)
    targets = np.repeat(targets & ~is_image, repeats)
    answer_targets = np.repeat(answer_targets & ~is_image, repeats)

    if len(ids) > max_len:
        last_image_end = 0
        if num_images:
            last_image_end = int(np.flatnonzero(ids == image_token_id)[-1]) + 1
        if last_image_end > max_len:
            raise DroppedExample(
                "image_truncated", f"image tokens end at {last_image_end} > max_len {max_len}"
            )
        ids, targets, answer_targets = ids[:max_len], targets[:max_len], answer_targets[:max_len]
    # a row cut before its first answer is dropped even where the template trains on more
    if not answer_targets.any():
        raise DroppedExample("no_supervised_tokens", "no answer token within max_len")
    return TokenizedConversation(ids, targets.astype(np.float32))
