"""The synthetic dataset: deterministic, balanced, image-dependent; its tokenizer."""

import collections
import io

import numpy as np
from PIL import Image
from transformers import AutoTokenizer

from llava_jax.data.datasets import synthetic


def test_records_are_a_pure_function_of_the_seed():
    a = synthetic.make_record(7, "train", 0, 32, "instruct")
    assert a == synthetic.make_record(7, "train", 0, 32, "instruct")
    assert a != synthetic.make_record(7, "train", 1, 32, "instruct")
    assert a.image_bytes != synthetic.make_record(7, "test", 0, 32, "instruct").image_bytes


def _dominant_colour(png: bytes) -> str:
    """The palette colour closest to the brightest pixels (test-side reading of the image)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32).reshape(-1, 3)
    shape_pixels = pixels[pixels.max(axis=1) > 100]
    mean = shape_pixels.mean(axis=0)
    return min(synthetic.COLOURS, key=lambda c: np.abs(np.array(synthetic.COLOURS[c]) - mean).sum())


def test_answers_are_read_from_the_image_and_balanced():
    answers = collections.defaultdict(collections.Counter)
    for index in range(600):
        record = synthetic.make_record(index, "train", 0, 32, "instruct")
        turns = record.conversations
        assert turns[0]["value"].startswith("<image>\n") and len(turns) in (4, 6)
        questions = {q: kind for kind, qs in synthetic.QUESTIONS.items() for q in qs}
        for question, reply in zip(turns[::2], turns[1::2], strict=True):
            kind = questions[question["value"].replace("<image>\n", "")]
            answers[kind][reply["value"]] += 1
            assert len(reply["value"].split()) == 1
            if kind == "colour":
                assert _dominant_colour(record.image_bytes[0]) == reply["value"]
    for kind, vocabulary in [
        ("colour", synthetic.COLOURS),
        ("shape", synthetic.SHAPES),
        ("count", synthetic.COUNT_WORDS),
        ("position", synthetic.POSITIONS),
    ]:
        counts = answers[kind]
        assert set(counts) == set(vocabulary)
        # the best blind guess per question type stays well under one half
        assert max(counts.values()) / sum(counts.values()) < 0.45, (kind, counts)


def test_position_answer_matches_where_the_shape_is():
    for index in range(200):
        record = synthetic.make_record(index, "train", 3, 48, "caption")
        caption = record.conversations[1]["value"]
        if " on the " not in caption:
            continue
        side = caption.rsplit(" ", 1)[-1]
        pixels = np.asarray(Image.open(io.BytesIO(record.image_bytes[0])).convert("RGB"))
        ys, xs = np.nonzero(pixels.max(axis=2) > 100)
        cx, cy = xs.mean() / 48, ys.mean() / 48
        expected = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6}
        assert expected[side], (caption, cx, cy)


def test_tokenizer_loads_with_auto_tokenizer_and_covers_the_vocabulary(tmp_path):
    path = synthetic.build_tokenizer(str(tmp_path / "tok"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    unk = tokenizer.unk_token_id
    words = list(synthetic.COLOURS) + list(synthetic.SHAPES) + list(synthetic.POSITIONS)
    for index in range(50):
        for turn in synthetic.make_record(index, "train", 0, 32, "instruct").conversations:
            ids = tokenizer(turn["value"])["input_ids"]
            assert unk not in ids, turn
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.decode(ids) == word
    assert tokenizer("<image>", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids("<image>")
    ]


def test_builder_for_the_default_config_can_be_made():
    """Regression: a custom config named like a registered one made TFDS refuse it."""
    from llava_jax.data.config import DataConfig
    from llava_jax.data.datasets import builder_for

    builder = builder_for(DataConfig(data_dir="/nonexistent-never-prepared"))
    assert builder.builder_config.num_train == DataConfig().synthetic_num_train
