"""The `qwen_1_5` template (LLaVA-OneVision's): rendering as LLaVA-NeXT's `conv_qwen`, rows
and targets as LLaVA-NeXT's `preprocess_qwen` (tests/llava_next_reference.py, its code
written out), prompts as Qwen2's chat template; on a Qwen-shaped tokenizer
(tests/qwen_tokenizer.py)."""

import dataclasses

import numpy as np
import pytest
from llava_next_reference import IGNORE_INDEX, IMAGE_TOKEN_INDEX, QWEN_ROLES, conv_qwen_prompt
from llava_next_reference import preprocess_multimodal as next_preprocess_multimodal
from llava_next_reference import training_row as next_training_row
from qwen_tokenizer import qwen_shaped_tokenizer

from llava_jax.data.conversation import (
    DroppedExample,
    get_template,
    tokenize_conversation,
    with_system,
)
from llava_jax.data.datasets.synthetic import conversation, sample_scene
from llava_jax.data.prompt import prompt_ids
from llava_jax.data.tokenizer import prepare_tokenizer


def _human(value: str) -> dict:
    return {"from": "human", "value": value}


def _gpt(value: str) -> dict:
    return {"from": "gpt", "value": value}


# What OneVision's data holds: one image, several images in one turn or in several turns,
# newlines in questions and answers (a lone "\n" is a target even in a question), a turn
# that is only an image, a leading gpt turn, text only.
CONVERSATIONS = [
    [_human("What is shown?\n<image>"), _gpt("A red circle.")],
    [
        _human("<image>\nWhere is it\nAnswer in one word"),
        _gpt("left"),
        _human("How many circles?"),
        _gpt("Exactly one, near the top.\n\nfirst line.\nsecond line."),
        _human("And the colour?\n"),
        _gpt("red"),
    ],
    [_human("<image>\n<image>\nCompare them."), _gpt("There are 2 red circles.")],
    [_human("<image> and <image>: the same?"), _gpt("No.")],
    [_human("Describe it.<image>"), _gpt("A red circle."), _human("And this? <image>"), _gpt("7")],
    [_human("<image>"), _gpt("first line\nsecond line")],
    [_gpt("Hello."), _human("<image>\nWhat is shown?"), _gpt("A red circle.")],
    [_human("How many circles?\nAnswer briefly."), _gpt("13"), _human("Sure?"), _gpt("Yes.")],
]


@pytest.fixture(scope="module")
def reference():
    """The tokenizer as LLaVA-NeXT's trainer holds it: nothing added."""
    return qwen_shaped_tokenizer()


@pytest.fixture(scope="module")
def loaded():
    """Ours: the same tokenizer, with <image> added (its pad <|endoftext|> is kept)."""
    return prepare_tokenizer(qwen_shaped_tokenizer())


@pytest.fixture(scope="module")
def conversations():
    rng = np.random.default_rng(0)
    synthetic = [conversation(sample_scene(rng), "instruct", rng) for _ in range(8)]
    return CONVERSATIONS + synthetic


def _row(turns, loaded, template=None, num_image_tokens=1, max_len=4096):
    num_images = sum(t["value"].count("<image>") for t in turns)
    template = template or get_template("qwen_1_5")
    return tokenize_conversation(turns, loaded, template, num_images, num_image_tokens, max_len)


def _as_llava(row, image_token_id: int) -> tuple[list[int], list[int]]:
    """Our row in LLaVA's terms: the image as IMAGE_TOKEN_INDEX, non-targets IGNORE_INDEX."""
    ids = np.where(row.input_ids == image_token_id, IMAGE_TOKEN_INDEX, row.input_ids)
    return ids.tolist(), np.where(row.loss_mask > 0, ids, IGNORE_INDEX).tolist()


def _without_leading_answer(turns: list[dict]) -> list[dict]:
    return turns[1:] if turns[0]["from"] == "gpt" else turns


def test_render_is_llava_nexts_conv_qwen():
    turns = CONVERSATIONS[1]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhere is it\nAnswer in one word<|im_end|>\n"
        "<|im_start|>assistant\nleft<|im_end|>\n"
        "<|im_start|>user\nHow many circles?<|im_end|>\n"
        "<|im_start|>assistant\nExactly one, near the top.\n\nfirst line.\nsecond line.<|im_end|>\n"
        "<|im_start|>user\nAnd the colour?\n<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )
    template = get_template("qwen_1_5")
    assert template.render(turns).text == expected
    for turns in CONVERSATIONS:
        turns = _without_leading_answer(turns)
        # LLaVA-NeXT's text: its preprocess_multimodal, then conv_qwen's get_prompt
        moved = next_preprocess_multimodal([[dict(t) for t in turns]])[0]
        messages = [(QWEN_ROLES[t["from"] == "gpt"], t["value"]) for t in moved]
        assert template.render(turns).text == conv_qwen_prompt(messages), turns
        prompt = template.render(turns[:1], generation_prompt=True).text
        assert prompt == conv_qwen_prompt([*messages[:1], (QWEN_ROLES[1], None)])
        assert prompt.endswith("<|im_start|>assistant\n")
    assert template.end == "<|im_end|>"  # the stop string


def test_rows_equal_llava_nexts_preprocess_qwen(conversations, reference, loaded):
    """input_ids and labels token for token: the system and user turns masked except their
    <|im_start|>, <|im_end|> and lone "\\n" tokens; each assistant turn a target from its
    "<|im_start|>assistant\\n" through its closing "\\n"."""
    assert loaded.image_token_id == len(reference)  # as preprocess_qwen adds it
    for turns in conversations:
        expected = next_training_row(turns, reference)
        assert any(label != IGNORE_INDEX for label in expected[1])
        assert _as_llava(_row(turns, loaded), loaded.image_token_id) == expected, turns


def test_a_system_message_is_llava_nexts_system_message(reference, loaded):
    template = with_system(get_template("qwen_1_5"), "Be brief.")
    for turns in CONVERSATIONS[:3]:
        expected = next_training_row(turns, reference, system_message="Be brief.")
        assert _as_llava(_row(turns, loaded, template), loaded.image_token_id) == expected


def test_targets_spelled_out(loaded):
    """Written by hand: the targets of a one-round row, and what is left unsupervised."""
    row = _row([_human("Where is it\nAnswer briefly"), _gpt("A red circle.")], loaded)
    tokens = loaded.tokenizer.convert_ids_to_tokens(row.input_ids.tolist())
    decode = loaded.tokenizer.convert_tokens_to_string
    targets = decode([t for t, m in zip(tokens, row.loss_mask, strict=True) if m])
    masked = decode([t for t, m in zip(tokens, row.loss_mask, strict=True) if not m])
    assert targets == (
        "<|im_start|>\n<|im_end|>\n"  # system
        "<|im_start|>\n\n<|im_end|>\n"  # user: its two lone newlines
        "<|im_start|>assistant\nA red circle.<|im_end|>\n"
    )
    assert masked == "systemYou are a helpful assistant.userWhere is itAnswer briefly"


def test_generation_prompts_equal_qwen2s_chat_template(conversations, reference, loaded):
    """Every prompt, turn by turn, is Qwen2's chat template with add_generation_prompt
    (its default system message, or the one given), tokenized by the tokenizer itself."""
    with_image = qwen_shaped_tokenizer()
    with_image.add_tokens(["<image>"], special_tokens=True)
    template = get_template("qwen_1_5")
    for system in (None, "Be brief."):
        chosen = template if system is None else with_system(template, system)
        for turns in conversations:
            turns = _without_leading_answer(turns)
            moved = next_preprocess_multimodal([[dict(t) for t in turns]])[0]
            messages = [] if system is None else [{"role": "system", "content": system}]
            for k in range(0, len(turns), 2):
                messages += [{"role": "user", "content": moved[k]["value"]}]
                text = with_image.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
                assert chosen.render(turns[: k + 1], generation_prompt=True).text == text
                ids = with_image.apply_chat_template(
                    messages, add_generation_prompt=True, return_dict=False
                )
                assert prompt_ids(turns[: k + 1], chosen, loaded, 1).tolist() == ids
                messages += [{"role": "assistant", "content": moved[k + 1]["value"]}]


def test_each_prompt_then_its_answer_is_the_row(conversations, loaded):
    """The project's invariant still holds for the answers: the row starts with the prompt
    of turn k, and the tokens after it through answer k's <|im_end|>\\n are all targets."""
    template = get_template("qwen_1_5")
    for turns in conversations:
        turns = _without_leading_answer(turns)
        row = _row(turns, loaded, num_image_tokens=3)
        for k in range(1, len(turns), 2):
            prompt = prompt_ids(turns[:k], template, loaded, 3)
            np.testing.assert_array_equal(row.input_ids[: len(prompt)], prompt)
            end = len(row.input_ids)  # the last answer ends the row
            if k + 2 < len(turns):
                end = _answer_end(prompt_ids(turns[: k + 2], template, loaded, 3), loaded)
            assert row.loss_mask[len(prompt) : end].all()
            answer = loaded.tokenizer.decode(row.input_ids[len(prompt) : end].tolist())
            assert answer == turns[k]["value"] + "<|im_end|>\n"


def _answer_end(next_prompt: np.ndarray, loaded) -> int:
    """Where the previous answer ends in the next turn's prompt: before its last
    '<|im_start|>user'."""
    im_start = loaded.tokenizer.convert_tokens_to_ids("<|im_start|>")
    starts = np.flatnonzero(next_prompt == im_start)
    return int(starts[-2])  # the last is the assistant header's


def test_a_row_cut_before_its_first_answer_is_dropped(loaded):
    """The system and user turns' <|im_start|> are targets, but a row that keeps no answer
    token is dropped as for every template (LLaVA-NeXT cuts rows in its collator and would
    train on those tokens alone)."""
    turns = CONVERSATIONS[0]
    full = _row(turns, loaded, num_image_tokens=4)
    header_start = int(np.flatnonzero(full.input_ids == full.input_ids[0])[-1])
    with pytest.raises(DroppedExample) as error:
        _row(turns, loaded, num_image_tokens=4, max_len=header_start + 3)  # the header only
    assert error.value.reason == "no_supervised_tokens"
    cut = _row(turns, loaded, num_image_tokens=4, max_len=header_start + 4)
    np.testing.assert_array_equal(cut.loss_mask, full.loss_mask[: header_start + 4])


def test_a_tokenizer_without_the_templates_tokens_is_refused(loaded):
    template = dataclasses.replace(get_template("qwen_1_5"), always_targets=("circle.",))
    with pytest.raises(ValueError, match="template 'qwen_1_5' trains on 'circle.' as one"):
        _row(CONVERSATIONS[0], loaded, template)
