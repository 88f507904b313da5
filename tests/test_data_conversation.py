"""Templates render as LLaVA defines them; tokens and targets are LLaVA's own (checked against
the LLaVA authors' code, tests/llava_reference.py); a program's prompt for turn k followed by
turn k's targets is the training row up to the end of answer k, for every template and
tokenizer kind; special-token text in data is text."""

import numpy as np
import pytest
from llava_reference import generation_prompt as llava_generation_prompt
from llava_reference import load as load_llava
from llava_reference import training_row as llava_training_row
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizerFast
from vicuna_tokenizer import save_vicuna_tokenizer

from llava_jax.data.conversation import (
    LLAVA_V1_SYSTEM,
    DroppedExample,
    get_template,
    tokenize_conversation,
    with_system,
)
from llava_jax.data.datasets.synthetic import conversation, sample_scene
from llava_jax.data.prompt import prompt_ids
from llava_jax.data.tokenizer import load_tokenizer, prepare_tokenizer

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
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. "
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
        "<|im_start|>assistant\nExactly one, near the top.<|im_end|>"
    ),
    "plain": "<image>A red circle.\nExactly one, near the top.\n",
}
# LLaVA's own name of each template (llava/conversation.py conv_templates)
LLAVA_NAMES = {
    "vicuna_v1": "v1",
    "llava_llama_2": "llava_llama_2",
    "mistral_instruct": "mistral_instruct",
}
ANSWER_WITH_END = {
    "vicuna_v1": ["A red circle.</s>", "Exactly one, near the top.</s>"],
    "llava_llama_2": ["A red circle. </s>", "Exactly one, near the top. </s>"],
    "mistral_instruct": ["A red circle. </s>", "Exactly one, near the top. </s>"],
    "chatml": ["A red circle.<|im_end|>", "Exactly one, near the top.<|im_end|>"],
    "plain": ["A red circle.\n", "Exactly one, near the top.\n"],
}
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def llava():
    return load_llava()


def _corpus():
    texts = [EXPECTED[name] for name in EXPECTED] + ["how many squares are there? two blue."]
    texts += ["USER: 2 13 7 </s> <s> first line", LLAVA_V1_SYSTEM]
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


def metaspace_bpe_tokenizer(newline_pieces: bool = False) -> PreTrainedTokenizerFast:
    """LLaMA's habits: '▁' glued to the next word, a newline a piece of its own (LLaMA's
    byte <0x0A>; with `newline_pieces` pieces such as '\nA' span one), BOS added."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=["\n"],  # a piece of its own, as LLaMA's byte <0x0A>
    )
    corpus = _corpus() if newline_pieces else [t.replace("\n", " ") for t in _corpus()]
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return _wrap(tokenizer)


def across_words_bpe_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A BPE trained without splitting the text at spaces (as SentencePiece with
    `split_by_whitespace=false`): its pieces run across words, so that after `vicuna_v1`'s
    "ASSISTANT:" one piece holds the prompt's end, the separator's space and the answer's
    first words ('?▁ASSISTANT:▁A▁red▁circle' with 400 pieces, ':▁A▁red▁circle' with 300)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=["\n"]
    )
    tokenizer.train_from_iterator([t.replace("\n", " ") for t in _corpus()], trainer)
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


@pytest.fixture(scope="module")
def vicuna_dir(tmp_path_factory):
    """Vicuna-1.5's shape: SentencePiece, `legacy: false`, no tokenizer.json."""
    return save_vicuna_tokenizer(str(tmp_path_factory.mktemp("vicuna")))


TOKENIZERS = {
    "word_level": word_level_tokenizer,
    "metaspace_bpe": metaspace_bpe_tokenizer,
    "byte_level_bpe": byte_level_bpe_tokenizer,
    "vicuna_sentencepiece": None,  # from vicuna_dir
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def loaded(request, vicuna_dir):
    if request.param == "vicuna_sentencepiece":
        return load_tokenizer(vicuna_dir)
    return prepare_tokenizer(TOKENIZERS[request.param]())


@pytest.fixture(scope="module")
def vicuna(vicuna_dir):
    """(ours, LLaVA's): the same directory, ours with <image> and <pad> added; LLaVA's as
    its trainer sets it up for v1 (pad = unk, nothing added)."""
    reference = AutoTokenizer.from_pretrained(vicuna_dir, local_files_only=True)
    reference.pad_token = reference.unk_token
    return load_tokenizer(vicuna_dir), reference


def _tokenize(turns, loaded, name, num_image_tokens=1, max_len=4096):
    num_images = sum(t["value"].count("<image>") for t in turns)
    return tokenize_conversation(
        turns, loaded, get_template(name), num_images, num_image_tokens, max_len
    )


def _as_llava(ids: np.ndarray, mask: np.ndarray, image_token_id: int) -> tuple[list, list]:
    """Our row in LLaVA's terms: the image as IMAGE_TOKEN_INDEX (-200), non-targets -100."""
    ids = np.where(ids == image_token_id, -200, ids)
    return ids.tolist(), np.where(mask > 0, ids, -100).tolist()


# --- rendering ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXPECTED))
def test_render_two_turns_matches_llava(name, llava):
    turns = TWO_TURNS
    if name == "plain":  # stage 1 data: only the image of the human turn is kept
        turns = [TWO_TURNS[0], TWO_TURNS[1], {"from": "human", "value": "?"}, TWO_TURNS[3]]
    assert get_template(name).render(turns).text == EXPECTED[name]
    if name in LLAVA_NAMES:  # and as LLaVA's own Conversation.get_prompt() writes it
        conv = llava.conversation.conv_templates[LLAVA_NAMES[name]].copy()
        for turn in llava.preprocess_multimodal([[dict(t) for t in turns]], _MULTIMODAL)[0]:
            conv.append_message(conv.roles[turn["from"] == "gpt"], turn["value"])
        assert conv.get_prompt() == EXPECTED[name]


class _Multimodal:
    is_multimodal = True
    mm_use_im_start_end = False


_MULTIMODAL = _Multimodal()


def test_vicuna_v1_system_prompt_is_llava_15s(llava):
    """LLaVA-1.5 trains and evaluates with `--version v1`: conv_vicuna_v1, not LLaVA-1's
    conv_llava_v1 (which template version 1 still gives, for models trained with it)."""
    expected = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    assert get_template("vicuna_v1").system == expected
    assert llava.conversation.conv_templates["v1"].system == expected
    assert get_template("vicuna_v1", version=1).system == llava.conversation.conv_llava_v1.system


# --- tokens and targets against LLaVA's own code -------------------------------------------


def _vicuna_conversations() -> list[tuple[list[dict], bool]]:
    """(turns, has image): the synthetic data's conversations, and answers LLaVA's
    tokenization treats specially: digits (LLaMA splits " 2" into "▁" and "2"), numbers,
    several sentences, newlines, several rounds, text only, a leading gpt turn."""
    rng = np.random.default_rng(0)
    out = [(conversation(sample_scene(rng), "instruct", rng), True) for _ in range(24)]
    digits = ["2", "13", "7 blue squares", "3.", "There are 2 red circles."]
    for answer in digits:
        out.append(([{"from": "human", "value": "<image>\nHow many?"}, _gpt(answer)], True))
        out.append(([{"from": "human", "value": "How many?"}, _gpt(answer)], False))
    out += [
        ([_human("What is shown?\n<image>"), _gpt("first line\nsecond line")], True),
        ([_human("Describe it.<image>"), _gpt("A red circle.\n\nNear the top left.")], True),
        (
            [
                _human("<image>\nWhat color are the objects?"),
                _gpt("red"),
                _human("How many?"),
                _gpt("2"),
                _human("Where is it?\nAnswer briefly."),
                _gpt("On the left."),
                _human("And the shape?"),
                _gpt("a circle"),
            ],
            True,
        ),
        ([_human("Say 2."), _gpt("2"), _human("Say 13."), _gpt("13")], False),
        ([_gpt("Hello."), _human("<image>\nColor?"), _gpt("blue")], True),
        ([_gpt("Hi."), _human("Count to 3."), _gpt("1, 2, 3")], False),
    ]
    return out


def _human(value: str) -> dict:
    return {"from": "human", "value": value}


def _gpt(value: str) -> dict:
    return {"from": "gpt", "value": value}


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_llama_2"])
def test_rows_equal_llavas_preprocess(name, vicuna, llava):
    """preprocess_v1 (LLaVA-1.5's `--version v1`) and preprocess_llama_2."""
    ours, reference = vicuna
    conversations = _vicuna_conversations()
    assert len(conversations) >= 40
    for turns, has_image in conversations:
        ids, labels = llava_training_row(llava, turns, reference, LLAVA_NAMES[name], has_image)
        assert any(label >= 0 for label in labels), "LLaVA blanked the sample: a bad test case"
        row = _tokenize(turns, ours, name)
        assert _as_llava(row.input_ids, row.loss_mask, ours.image_token_id) == (ids, labels), turns


def test_plain_rows_equal_llavas_preprocess_plain(vicuna, llava):
    """Stage 1: the caption's first word is a whole word (LLaVA tokenizes the text after
    <image> on its own), and every caption token is a target."""
    ours, reference = vicuna
    captions = ["a red circle", "first line", "2 red circles", "There are 13 blue squares."]
    rng = np.random.default_rng(1)
    captions += [conversation(sample_scene(rng), "caption", rng)[1]["value"] for _ in range(8)]
    for caption in captions:
        turns = [_human("<image>\nDescribe the image briefly."), _gpt(caption)]
        ids, labels = llava_training_row(llava, turns, reference, "plain", True)
        row = _tokenize(turns, ours, "plain")
        assert _as_llava(row.input_ids, row.loss_mask, ours.image_token_id) == (ids, labels)
    row = _tokenize([_human("<image>"), _gpt("a red circle")], ours, "plain")
    pieces = reference.convert_ids_to_tokens(row.input_ids[row.loss_mask > 0].tolist())
    assert pieces[0] == "▁a"  # not "a": the caption starts a word, as in LLaVA


def test_digit_answer_targets_its_space(vicuna):
    """After "ASSISTANT:" LLaMA's tokenizer splits " 2" into "▁" and "2": both are
    targets (the model must produce the "▁" first), as in LLaVA."""
    ours, reference = vicuna
    row = _tokenize([_human("How many?"), _gpt("2")], ours, "vicuna_v1")
    targets = reference.convert_ids_to_tokens(row.input_ids[row.loss_mask > 0].tolist())
    assert targets == ["▁", "2", "</s>"]


def test_generation_prompts_equal_llavas(vicuna, llava):
    """LLaVA's inference prompt (conv.get_prompt() with the assistant's turn open, through
    tokenizer_image_token) for every turn of every conversation."""
    ours, reference = vicuna
    for turns, has_image in _vicuna_conversations()[:30]:
        if turns[0]["from"] == "gpt":  # a prompt starts with a question
            turns = turns[1:]
        for k in range(0, len(turns), 2):
            theirs = llava_generation_prompt(
                llava, _image_first(turns[: k + 1], has_image), reference, "v1"
            )
            mine = prompt_ids(turns[: k + 1], get_template("vicuna_v1"), ours, 1)
            assert np.where(mine == ours.image_token_id, -200, mine).tolist() == theirs


def _image_first(turns: list[dict], has_image: bool) -> list[dict]:
    """LLaVA's eval scripts write "<image>\\n" + question (preprocess_multimodal's form)."""
    if not has_image:
        return turns
    first = turns[0]["value"].replace("<image>", "").strip()
    return [{"from": "human", "value": "<image>\n" + first}, *turns[1:]]


# --- the invariant, for every template and tokenizer kind ----------------------------------


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_prefix_is_tokenized_as_llavas_tokenizer_image_token(name, loaded, llava):
    """`TextEncoder.encode` tokenizes each prompt and each row-through-an-answer from the
    segments between images and control tokens; each equals LLaVA's tokenizer_image_token
    of that text alone (special tokens matched by the tokenizer: the data holds none)."""
    turns = list(TWO_TURNS) + [_human("And the <image> here?"), _gpt("Two: 2 and 13.")]
    rendered = get_template(name).render(turns)
    counts = [(k + 1, k + a) for k in range(len(rendered.answers)) for a in (0, 1)]
    cuts = [len(rendered.prefix(*count)) for count in counts]
    row, lengths = loaded.text_encoder.encode_with_prefixes(rendered.pieces, cuts)
    for cut, length in zip(cuts, lengths, strict=True):
        text = "".join(piece.text for piece in rendered.pieces[:cut])
        theirs = llava.tokenizer_image_token(text, loaded.tokenizer)
        alone = loaded.text_encoder.encode(rendered.pieces[:cut])
        assert np.where(alone == loaded.image_token_id, -200, alone).tolist() == theirs, text
        assert length == len(theirs)  # and they are the row's first tokens
        np.testing.assert_array_equal(row[:length], alone)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_prompt_then_targets_is_the_training_row(name, loaded):
    """For each answer k: the row starts with the program's prompt for turn k; the targets
    are exactly the tokens after it through the end of answer k (decoding to the answer and
    its end); the next prompt starts with the row through answer k."""
    turns = list(TWO_TURNS)
    if name == "plain":  # the second question carries an image too
        turns[2] = {"from": "human", "value": "<image>"}
    num_image_tokens = 3
    row = _tokenize(turns, loaded, name, num_image_tokens)
    ids, mask = row.input_ids, row.loss_mask
    template = get_template(name)
    end_of_previous = 0
    for k in range(len(turns) // 2):
        prompt = prompt_ids(turns[: 2 * k + 1], template, loaded, num_image_tokens)
        np.testing.assert_array_equal(ids[: len(prompt)], prompt)
        assert not mask[end_of_previous : len(prompt)].any()
        ends = np.flatnonzero(mask[len(prompt) :] == 0)
        end = len(prompt) + (int(ends[0]) if len(ends) else len(mask) - len(prompt))
        assert end > len(prompt)
        decoded = loaded.tokenizer.decode(ids[len(prompt) : end].tolist())
        # the decoders differ only in whitespace (word level drops spaces)
        assert "".join(decoded.split()) == "".join(ANSWER_WITH_END[name][k].split())
        if name == "plain":  # the end "\n" is whitespace: check it apart
            assert decoded.endswith("\n")
        end_of_previous = end
    assert not mask[end_of_previous:].any()
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}


def _answer_texts(name: str) -> list[str]:
    """Each answer as the rendered text holds it after its prompt: the separator's space
    before it (where the template has one) belongs to the answer, since at inference the
    model writes it after the prompt's last token; then the answer's end."""
    space = " " if name in ("vicuna_v1", "llava_llama_2", "mistral_instruct") else ""
    return [space + answer for answer in ANSWER_WITH_END[name]]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_targets_are_exactly_the_tokens_of_each_answer(name, loaded, llava):
    """The row and its targets token for token, non-targets (IGNORE_INDEX) included: the
    rendered text (written out in EXPECTED) is cut by hand before and after each answer,
    and answer k's targets are the tokens LLaVA's tokenizer_image_token gives the text
    through answer k beyond those it gives the text before it. A whitespace token that
    starts an answer ('▁', 'Ġ') is a target like any other."""
    turns = list(TWO_TURNS)
    if name == "plain":  # as EXPECTED renders it: only the first question's image is kept
        turns[2] = _human("?")
    text = EXPECTED[name]
    full = llava.tokenizer_image_token(text, loaded.tokenizer)
    labels = [-100] * len(full)
    start = 0
    for answer in _answer_texts(name):
        begin = text.index(answer, start)
        start = begin + len(answer)
        before = llava.tokenizer_image_token(text[:begin], loaded.tokenizer)
        through = llava.tokenizer_image_token(text[:start], loaded.tokenizer)
        # these tokenizers never join text across an answer's start or end
        assert through[: len(before)] == before and full[: len(through)] == through
        labels[len(before) : len(through)] = through[len(before) :]
    assert start == len(text)  # the last answer ends the row
    row = _tokenize(turns, loaded, name)
    assert _as_llava(row.input_ids, row.loss_mask, loaded.image_token_id) == (full, labels)
    assert set(np.unique(row.loss_mask).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("name", ["vicuna_v1", "llava_llama_2"])
def test_the_separators_space_merged_into_the_answer_is_a_target_as_in_llava(name, vicuna, llava):
    """LLaVA splits a round at " ASSISTANT: " (" [/INST] "), whose last space LLaMA's
    tokenizer merges into the answer's first piece ('▁The'): a token across LLaVA's prompt
    and answer, which its `- 2` in preprocess_v1 counts as the answer's. Ours is the same
    target, and the row equals LLaVA's token for token."""
    ours, reference = vicuna
    turns = [_human("<image>\nWhat is shown?"), _gpt("The first line.")]
    ids, labels = llava_training_row(llava, turns, reference, LLAVA_NAMES[name], True)
    row = _tokenize(turns, ours, name)
    assert _as_llava(row.input_ids, row.loss_mask, ours.image_token_id) == (ids, labels)
    first = int(np.flatnonzero(row.loss_mask)[0])
    pieces = reference.convert_ids_to_tokens(row.input_ids[first - 1 : first + 1].tolist())
    assert pieces == [":" if name == "vicuna_v1" else "<0x5D>", "▁The"]  # 0x5D: "]"


@pytest.mark.parametrize(
    ("vocab_size", "llava_targets"),
    [
        (400, [".", "</s>"]),  # "A red circle" is never a target
        (300, [":▁A▁red▁circle", ".", "</s>"]),  # the prompt's ":" is one
    ],
)
def test_a_token_across_the_prompt_and_the_answer_drops_the_conversation(
    vocab_size, llava_targets, llava
):
    """A piece that holds the end of the prompt, the separator's space and the start of
    the answer: no split of that row is both a prompt the programs send and the answer
    after it. LLaVA's preprocess_v1 counts tokens and trains on a split anyway (which one
    depends on the vocabulary: the answer's first words unsupervised, or the prompt's ':'
    supervised); llava_jax drops the conversation, by name (docs/design.md, "Bad records
    are dropped")."""
    turns = [_human("<image>\nWhat is shown?"), _gpt("A red circle.")]
    reference = across_words_bpe_tokenizer(vocab_size)
    chunk = "\nWhat is shown? ASSISTANT: A red circle."  # the text after the image
    boundary = chunk.index(" A red")  # where the prompt ends and the answer starts
    offsets = reference(chunk, add_special_tokens=False, return_offsets_mapping=True)
    assert any(s < boundary < e for s, e in offsets["offset_mapping"]), "no token across"

    with pytest.raises(DroppedExample) as error:
        _tokenize(turns, prepare_tokenizer(across_words_bpe_tokenizer(vocab_size)), "vicuna_v1")
    assert error.value.reason == "prompt_not_prefix"
    assert "answer 0" in error.value.detail

    reference.pad_token = reference.unk_token  # as LLaVA's trainer sets it for v1
    ids, labels = llava_training_row(llava, turns, reference, "v1", True)
    targets = [i for i, label in zip(ids, labels, strict=True) if label != -100]
    assert labels[-len(targets) :] == ids[-len(targets) :]  # one run, to the row's end
    assert reference.convert_ids_to_tokens(targets) == llava_targets


def test_a_tokenizer_that_joins_the_prompt_to_the_answer_drops_the_conversation():
    """A piece '\nA' across the end of "assistant\n" and the answer: the model would be
    trained on a row its prompts never start; the conversation is dropped, by name."""
    loaded = prepare_tokenizer(metaspace_bpe_tokenizer(newline_pieces=True))
    row = loaded.tokenizer("assistant\nA red circle.", add_special_tokens=False)["input_ids"]
    assert any("\nA" in piece for piece in loaded.tokenizer.convert_ids_to_tokens(row))
    with pytest.raises(DroppedExample) as error:
        _tokenize(TWO_TURNS, loaded, "chatml")
    assert error.value.reason == "prompt_not_prefix"
    assert "answer 0" in error.value.detail


# --- special-token text in data is text ----------------------------------------------------


class _TextOnly:
    """A tokenizer as LLaVA's tokenizer_image_token calls it, that tokenizes special-token
    text as text (transformers' `split_special_tokens`): the reference for rows whose data
    writes `</s>`, where LLaVA itself would put control tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        self.tokenizer = tokenizer
        self.bos_token_id = tokenizer.bos_token_id

    def __call__(self, text: str) -> BatchEncoding:
        return self.tokenizer(text, split_special_tokens=True)


def _vicuna_v1_row_of_text(
    llava, tokenizer: PreTrainedTokenizerFast, question: str, answer: str
) -> tuple[list[int], list[int]]:
    """(ids, labels) of a one-round vicuna_v1 row whose text is all text, in LLaVA's terms:
    the prompt "{system} USER: {question} ASSISTANT:", then the targets: " {answer}" and
    the end-of-sequence control token."""
    system = llava.conversation.conv_templates["v1"].system
    prompt_text = f"{system} USER: {question} ASSISTANT:"
    as_text = _TextOnly(tokenizer)
    prompt = llava.tokenizer_image_token(prompt_text, as_text)
    ids = llava.tokenizer_image_token(f"{prompt_text} {answer}", as_text)
    ids.append(tokenizer.eos_token_id)
    assert ids[: len(prompt)] == prompt
    return ids, [-100] * len(prompt) + ids[len(prompt) :]


@pytest.mark.parametrize("text", ["</s>", "<s>", "<|im_end|>"])
def test_special_token_text_in_data_stays_text(text, loaded, llava):
    """An answer or a question that writes a special token's text gets text tokens: the
    only control tokens of the row are the template's own."""
    tokenizer = loaded.tokenizer
    # the control tokens (<unk> is where a word-level vocabulary lacks a word: not one)
    specials = {tokenizer.convert_tokens_to_ids(t) for t in SPECIALS if t != "<unk>"}
    answer = f"Use {text} to end it."
    turns = [_human(f"<image>\nWhat does {text} mean?"), _gpt(answer)]
    plain_turns = [_human("<image>\nWhat does it mean?"), _gpt("Use it to end it.")]
    for name in ("vicuna_v1", "chatml"):
        row = _tokenize(turns, loaded, name)
        control = [int(i) for i in row.input_ids if int(i) in specials]
        reference = _tokenize(plain_turns, loaded, name)
        assert control == [int(i) for i in reference.input_ids if int(i) in specials]
        prompt = prompt_ids(turns[:1], get_template(name), loaded, 1)
        expected = prompt_ids(plain_turns[:1], get_template(name), loaded, 1)
        assert [i for i in prompt if i in specials] == [i for i in expected if i in specials]
    row = _tokenize(turns, loaded, "vicuna_v1")
    targets = row.input_ids[row.loss_mask > 0]
    assert targets[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in targets[:-1].tolist()
    if tokenizer.unk_token_id not in targets.tolist():  # a vocabulary that spells it
        assert tokenizer.decode(targets[:-1].tolist()).strip() == answer
    # token for token: the text tokenized as text, the targets all after the prompt
    expected = _vicuna_v1_row_of_text(llava, tokenizer, turns[0]["value"], answer)
    assert _as_llava(row.input_ids, row.loss_mask, loaded.image_token_id) == expected


def test_special_token_text_round_trips_with_a_sentencepiece_tokenizer(vicuna, llava):
    ours, reference = vicuna
    for text in ("</s>", "<s>", "<unk>", "<pad>"):
        answer = f"Use {text} to end it."
        row = _tokenize([_human(f"What is {text}?"), _gpt(answer)], ours, "vicuna_v1")
        targets = row.input_ids[row.loss_mask > 0].tolist()
        assert targets[-1] == reference.eos_token_id
        assert reference.decode(targets[:-1]).strip() == answer
        expected = _vicuna_v1_row_of_text(llava, reference, f"What is {text}?", answer)
        assert _as_llava(row.input_ids, row.loss_mask, ours.image_token_id) == expected
        assert reference.convert_ids_to_tokens(targets[0]).startswith("▁")  # the space
        specials = {reference.bos_token_id, reference.eos_token_id, reference.unk_token_id}
        assert not specials & set(targets[:-1]), text


def test_reserved_characters_are_refused(loaded):
    turns = [_human("<image>\nWhat?"), _gpt("a \ufdd0 b")]
    with pytest.raises(DroppedExample) as error:
        _tokenize(turns, loaded, "vicuna_v1")
    assert error.value.reason == "reserved_character"
    assert "U+FDD0" in error.value.detail


# --- what else a conversation can be ------------------------------------------------------


def test_leading_gpt_turn_is_skipped_as_llava_does(loaded):
    turns = [_gpt("Hello there."), *TWO_TURNS]
    with_leading = _tokenize(turns, loaded, "vicuna_v1")
    without = _tokenize(TWO_TURNS, loaded, "vicuna_v1")
    np.testing.assert_array_equal(with_leading.input_ids, without.input_ids)
    np.testing.assert_array_equal(with_leading.loss_mask, without.loss_mask)


def test_each_image_becomes_num_image_tokens(loaded):
    out = _tokenize(TWO_TURNS, loaded, "vicuna_v1", num_image_tokens=576, max_len=2048)
    positions = np.flatnonzero(out.input_ids == loaded.image_token_id)
    assert len(positions) == 576
    assert np.all(np.diff(positions) == 1)  # one contiguous block
    assert np.all(out.loss_mask[positions] == 0)


def test_truncation_keeps_images_whole_and_drops_otherwise(loaded):
    full = _tokenize(TWO_TURNS, loaded, "vicuna_v1", num_image_tokens=8)
    first_answer_start = int(np.flatnonzero(full.loss_mask)[0])
    cut = _tokenize(TWO_TURNS, loaded, "vicuna_v1", 8, max_len=first_answer_start + 1)
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[: first_answer_start + 1])
    assert cut.loss_mask.sum() == 1

    image_end = int(np.flatnonzero(full.input_ids == loaded.image_token_id)[-1]) + 1
    with pytest.raises(DroppedExample) as error:
        _tokenize(TWO_TURNS, loaded, "vicuna_v1", 8, max_len=image_end - 1)
    assert error.value.reason == "image_truncated"
    with pytest.raises(DroppedExample) as error:  # images fit, no answer token does
        _tokenize(TWO_TURNS, loaded, "vicuna_v1", 8, max_len=image_end)
    assert error.value.reason == "no_supervised_tokens"


@pytest.mark.parametrize(
    ("turns", "num_images", "reason"),
    [
        (TWO_TURNS, 2, "image_count_mismatch"),
        (TWO_TURNS[1:2], 0, "empty_turn"),  # a lone gpt turn: nothing left once skipped
        (TWO_TURNS[:3], 1, "roles_out_of_order"),
        ([TWO_TURNS[0], {"from": "gpt", "value": "  "}], 1, "empty_turn"),
    ],
)
def test_bad_conversations_are_dropped(turns, num_images, reason, loaded):
    with pytest.raises(DroppedExample) as error:
        tokenize_conversation(turns, loaded, get_template("vicuna_v1"), num_images, 4, 512)
    assert error.value.reason == reason


def test_text_only_sample_has_no_image_tokens(loaded):
    out = _tokenize([_human("How many circles?"), TWO_TURNS[3]], loaded, "vicuna_v1")
    assert not np.any(out.input_ids == loaded.image_token_id)
    assert out.loss_mask.sum() > 0


def test_template_version_1_prompts_as_models_trained_before_were(vicuna):
    """LLaVA-1's system prompt and the whole text tokenized at once (the text after <image>
    glued to it): what models trained before the conversation format's version 2 saw."""
    ours, reference = vicuna
    old = get_template("vicuna_v1", version=1)
    ids = prompt_ids([_human("<image>\nHow many?")], old, ours, 1)
    text = f"{LLAVA_V1_SYSTEM} USER: <image>\nHow many? ASSISTANT:"
    expected = ours.tokenizer(text)["input_ids"]
    assert ids.tolist() == expected
    image = expected.index(ours.image_token_id)
    assert reference.convert_ids_to_tokens(expected[image + 1]) == "<0x0A>"  # no "▁"
    with pytest.raises(ValueError, match="version 1 is kept only"):
        tokenize_conversation([_human("<image>\nHow many?"), _gpt("2")], ours, old, 1, 1, 512)


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


def test_a_system_prompt_takes_the_template_s_place_or_comes_first():
    """A chat request's system message (conversation.with_system)."""
    turns = [_human("<image>\nWhat is it?")]
    vicuna = with_system(get_template("vicuna_v1"), "Be brief.")
    assert vicuna.render(turns, generation_prompt=True).text == (
        "Be brief. USER: <image>\nWhat is it? ASSISTANT:"
    )
    chatml = with_system(get_template("chatml"), "Be brief.")
    assert chatml.render(turns, generation_prompt=True).text.startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?"
    )
    mistral = with_system(get_template("mistral_instruct"), "Be brief.")
    assert mistral.render(turns, generation_prompt=True).text == (
        "[INST] Be brief.\n\n<image>\nWhat is it? [/INST]"
    )
    with pytest.raises(ValueError, match="'plain' template"):
        with_system(get_template("plain"), "Be brief.")
