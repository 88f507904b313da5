"""Templates render as LLaVA defines them; answer masks cover exactly the answers."""

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava_jax.data.conversation import (
    DroppedExample,
    generation_prompt,
    get_template,
    move_image_to_front,
    tokenize_conversation,
)
from llava_jax.data.tokenizer import prepare_tokenizer

TWO_TURNS = [
    {"from": "human", "value": "What is shown?\n<image>"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "How many circles?"},
    {"from": "gpt", "value": "Exactly one, near the top."},
]

# Written from llava/conversation.py (conv_vicuna_v1, conv_llava_llama_2, conv_llava_plain;
# LLaVA-NeXT's conv_mistral_instruct: the LLAMA_2 style with no system and sep "") and the
# Qwen chat format; <image> moved to the front as preprocess_multimodal does.
EXPECTED = {
    "vicuna_v1": (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions. "
        "USER: <image>\nWhat is shown? ASSISTANT: A red circle.</s>"
        "USER: How many circles? ASSISTANT: Exactly one, near the top.</s>"
    ),
    "llava_llama_2": (
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to "
        "understand the visual content that the user provides, and assist the user with a "
        "variety of tasks using natural language.\n<</SYS>>\n\n<image>\nWhat is shown? [/INST]"
        " A red circle. </s><s>[INST] How many circles? [/INST] Exactly one, near the top. </s>"
    ),
    "mistral_instruct": (
        "[INST] <image>\nWhat is shown? [/INST] A red circle. </s>"
        "[INST] How many circles? [/INST] Exactly one, near the top. </s>"
    ),
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n"
        "<|im_start|>user\nHow many circles?<|im_end|>\n"
        "<|im_start|>assistant\nExactly one, near the top.<|im_end|>\n"
    ),
    "plain": "<image>A red circle.\nExactly one, near the top.\n",
}
ANSWER_WITH_END = {
    "vicuna_v1": ["A red circle.</s>", "Exactly one, near the top.</s>"],
    "llava_llama_2": ["A red circle. </s>", "Exactly one, near the top. </s>"],
    "mistral_instruct": ["A red circle. </s>", "Exactly one, near the top. </s>"],
    "chatml": ["A red circle.<|im_end|>", "Exactly one, near the top.<|im_end|>"],
    "plain": ["A red circle.\n", "Exactly one, near the top.\n"],
}
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _corpus():
    texts = [EXPECTED[name] for name in EXPECTED] + ["how many squares are there? two blue."]
    for special in SPECIALS + ["<image>"]:
        texts = [t.replace(special, " ") for t in texts]
    return texts


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    tokenizer.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """Words, single punctuation and newlines; spaces vanish."""
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="isolated"),
        ]
    )
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre
    tokenizer.train_from_iterator(_corpus(), trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    tokenizer.decoder = decoders.WordPiece(cleanup=False)
    return _wrap(tokenizer)


def metaspace_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """LLaMA's habits: '▁' glued to the next word, byte fallback, BOS added."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=[f"<0x{i:02X}>" for i in range(256)],
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return _wrap(tokenizer)


def byte_level_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2/Qwen habits: 'Ġ' (the space) glued to the next word, no BOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return _wrap(tokenizer)


TOKENIZERS = {
    "word_level": word_level_tokenizer,
    "metaspace_bpe": metaspace_bpe_tokenizer,
    "byte_level_bpe": byte_level_bpe_tokenizer,
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def loaded(request):
    return prepare_tokenizer(TOKENIZERS[request.param]())


@pytest.mark.parametrize("name", list(EXPECTED))
def test_render_two_turns_matches_llava(name):
    turns = TWO_TURNS
    if name == "plain":  # stage 1 data: only the image of the human turn is kept
        turns = [TWO_TURNS[0], TWO_TURNS[1], {"from": "human", "value": "?"}, TWO_TURNS[3]]
    assert get_template(name).render(move_image_to_front(turns)).text == EXPECTED[name]


def _masked_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    runs, current = [], []
    for token, supervised in zip(ids.tolist(), mask.tolist(), strict=True):
        if supervised:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


@pytest.mark.parametrize("name", list(EXPECTED))
def test_loss_mask_is_exactly_the_answers(name, loaded):
    # plain: the second question carries an image too, so the two answers are not adjacent
    turns = list(TWO_TURNS)
    if name == "plain":
        turns[2] = {"from": "human", "value": "<image>"}
    num_images = sum(t["value"].count("<image>") for t in turns)
    out = tokenize_conversation(
        turns,
        loaded.tokenizer,
        get_template(name),
        num_images=num_images,
        num_image_tokens=3,
        max_len=512,
        image_token_id=loaded.image_token_id,
    )
    runs = _masked_runs(out.input_ids, out.loss_mask)
    decoded = [loaded.tokenizer.decode(run) for run in runs]
    # Whitespace is compared loosely: a tokenizer may glue the prompt's "\n" or " " to
    # the answer's first word, and that token is rightly supervised.
    assert ["".join(text.split()) for text in decoded] == [
        "".join(answer.split()) for answer in ANSWER_WITH_END[name]
    ]
    if name == "plain":  # the end token "\n" is whitespace: check it separately
        assert all(text.endswith("\n") for text in decoded)
    assert set(np.unique(out.loss_mask).tolist()) <= {0.0, 1.0}


def test_each_image_becomes_num_image_tokens(loaded):
    out = tokenize_conversation(
        TWO_TURNS, loaded.tokenizer, get_template("vicuna_v1"), 1, 576, 2048, loaded.image_token_id
    )
    positions = np.flatnonzero(out.input_ids == loaded.image_token_id)
    assert len(positions) == 576
    assert np.all(np.diff(positions) == 1)  # one contiguous block
    assert np.all(out.loss_mask[positions] == 0)


def test_truncation_keeps_images_whole_and_drops_otherwise(loaded):
    tokenizer, template = loaded.tokenizer, get_template("vicuna_v1")
    full = tokenize_conversation(TWO_TURNS, tokenizer, template, 1, 8, 4096, loaded.image_token_id)
    first_answer_end = int(np.flatnonzero(full.loss_mask)[0]) + 1
    cut = tokenize_conversation(
        TWO_TURNS, tokenizer, template, 1, 8, first_answer_end, loaded.image_token_id
    )
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:first_answer_end])
    assert cut.loss_mask.sum() == 1

    image_end = int(np.flatnonzero(full.input_ids == loaded.image_token_id)[-1]) + 1
    with pytest.raises(DroppedExample) as error:
        tokenize_conversation(
            TWO_TURNS, tokenizer, template, 1, 8, image_end - 1, loaded.image_token_id
        )
    assert error.value.reason == "image_truncated"
    with pytest.raises(DroppedExample) as error:  # images fit, no answer token does
        tokenize_conversation(
            TWO_TURNS, tokenizer, template, 1, 8, image_end, loaded.image_token_id
        )
    assert error.value.reason == "no_supervised_tokens"


@pytest.mark.parametrize(
    ("turns", "num_images", "reason"),
    [
        (TWO_TURNS, 2, "image_count_mismatch"),
        (TWO_TURNS[1:], 0, "roles_out_of_order"),
        ([TWO_TURNS[0], {"from": "gpt", "value": "  "}], 1, "empty_turn"),
    ],
)
def test_bad_conversations_are_dropped(turns, num_images, reason, loaded):
    with pytest.raises(DroppedExample) as error:
        tokenize_conversation(
            turns,
            loaded.tokenizer,
            get_template("vicuna_v1"),
            num_images,
            4,
            512,
            loaded.image_token_id,
        )
    assert error.value.reason == reason


def test_text_only_sample_has_no_image_tokens(loaded):
    turns = [{"from": "human", "value": "How many circles?"}, TWO_TURNS[3]]
    out = tokenize_conversation(
        turns, loaded.tokenizer, get_template("vicuna_v1"), 0, 4, 512, loaded.image_token_id
    )
    assert not np.any(out.input_ids == loaded.image_token_id)
    assert out.loss_mask.sum() > 0


def test_generation_prompt_is_the_training_text_before_the_answer():
    for name in ("vicuna_v1", "chatml", "llava_llama_2", "mistral_instruct"):
        prompt = generation_prompt(TWO_TURNS[:3], get_template(name))
        full = EXPECTED[name]
        answer_start = full.rindex("Exactly one")
        assert full[:answer_start].rstrip() == prompt.rstrip(), name


def test_prepare_tokenizer_adds_image_and_pad_and_reports_vocab():
    tokenizer = byte_level_bpe_tokenizer()
    before = len(tokenizer)
    loaded = prepare_tokenizer(tokenizer)
    assert loaded.added_tokens == ("<image>", "<pad>")
    assert loaded.vocab_size == before + 2 == len(tokenizer)
    assert (
        tokenizer("a<image>b", add_special_tokens=False)["input_ids"].count(loaded.image_token_id)
        == 1
    )
    assert prepare_tokenizer(tokenizer).added_tokens == ()  # idempotent
