"""The grain pipeline: fixed shapes, exact resume, disjoint shards, dropped samples."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from llava_jax.data import datasets
from llava_jax.data.config import DataConfig
from llava_jax.data.eval_questions import make_eval_questions
from llava_jax.data.pipeline import (
    make_dataset,
    make_train_iterator,
    to_global_batch,
    tokenizer_for,
)
from llava_jax.models.inputs import ImageGeometry

NUM_TRAIN = 36
IMAGE_SIZE, IMAGE_TOKENS = 16, 4  # the model's image: 16 x 16 pixels, 4 image tokens


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return DataConfig(
        data_dir=str(tmp_path_factory.mktemp("tfds")),
        synthetic_num_train=NUM_TRAIN,
        synthetic_num_test=6,
        synthetic_image_size=24,
        max_len=48,
        global_batch_size=8,
        seed=3,
    )


@pytest.fixture(scope="module")
def geometry():
    return ImageGeometry.square(IMAGE_SIZE, IMAGE_TOKENS)


@pytest.fixture(scope="module")
def tokenizer(config):
    return tokenizer_for(config)


@pytest.fixture(scope="module")
def train_records(config):
    source = datasets.open_split(config, "train")
    return [source[i] for i in range(len(source))]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_has_fixed_shapes_and_consistent_masks(config, geometry, tokenizer):
    batch = next(make_train_iterator(config, geometry, tokenizer, 0, 1))
    b, t, s = 8, config.max_len, geometry.image_size
    assert batch["input_ids"].shape == (b, t) and batch["input_ids"].dtype == np.int32
    assert batch["loss_mask"].shape == (b, t) and batch["loss_mask"].dtype == np.float32
    assert batch["attention_mask"].shape == (b, t) and batch["attention_mask"].dtype == np.int32
    assert batch["images"].shape == (b, 1, 1, s, s, 3) and batch["images"].dtype == np.float32
    assert batch["image_mask"].shape == (b, 1) and batch["image_mask"].dtype == bool
    assert batch["image_mask"].all()
    is_image = batch["input_ids"] == tokenizer.image_token_id
    assert np.all(is_image.sum(axis=1) == IMAGE_TOKENS)
    # right padding with the pad id, nothing supervised outside real tokens or on images
    padding = batch["attention_mask"] == 0
    assert np.all(batch["input_ids"][padding] == tokenizer.pad_token_id)
    assert np.all(np.diff(batch["attention_mask"], axis=1) <= 0)
    assert np.all(batch["loss_mask"][padding | is_image] == 0)
    assert np.all(batch["loss_mask"].sum(axis=1) >= 2)  # at least one answer and its end


def test_restored_iterator_yields_the_same_next_batches(config, geometry, tokenizer):
    iterator = make_train_iterator(config, geometry, tokenizer, 0, 1)
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))  # must survive JSON (Orbax)
    expected = take(iterator, 4)  # crosses the epoch boundary (36 records / 8)
    restored = make_train_iterator(config, geometry, tokenizer, 0, 1)
    restored.set_state(state)
    assert_same_batches(take(restored, 4), expected)
    other_seed = make_train_iterator(dataclasses.replace(config, seed=4), geometry, tokenizer, 0, 1)
    assert not np.array_equal(next(other_seed)["input_ids"], take(restored, 1)[0]["input_ids"])


def _ids(config, geometry, tokenizer, process_index, process_count, epochs=1):
    config = dataclasses.replace(config, passes=epochs)
    return [
        example["id"]
        for example in make_dataset(config, geometry, tokenizer, process_index, process_count)
    ]


def test_process_shards_are_disjoint_and_cover_the_split(config, geometry, tokenizer):
    config = dataclasses.replace(config, global_batch_size=12)  # 36 records: 3 global batches
    shards = [_ids(config, geometry, tokenizer, index, 3) for index in range(3)]
    sets = [set(shard) for shard in shards]
    assert all(len(shard) == len(set(shard)) for shard in shards)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    all_ids = {f"synthetic-train-{i:06d}" for i in range(NUM_TRAIN)}
    assert sets[0] | sets[1] | sets[2] == all_ids
    assert sorted(len(s) for s in sets) == [12, 12, 12]


def test_global_batches_do_not_depend_on_the_number_of_processes(config, geometry, tokenizer):
    """Two processes' local batches, stacked in process order, are one process's batches."""
    one = make_train_iterator(config, geometry, tokenizer, 0, 1)
    two = [make_train_iterator(config, geometry, tokenizer, index, 2) for index in range(2)]
    for _ in range(6):  # crosses an epoch boundary (36 records, batches of 8)
        expected = next(one)
        halves = [next(iterator) for iterator in two]
        for key, value in expected.items():
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)
    for iterator in (one, *two):
        iterator.close()


def test_each_epoch_is_a_new_permutation(config, geometry, tokenizer):
    ids = _ids(config, geometry, tokenizer, 0, 1, epochs=2)
    first, second = ids[:NUM_TRAIN], ids[NUM_TRAIN:]
    assert sorted(first) == sorted(second) and len(set(first)) == NUM_TRAIN
    assert first != second
    assert first != sorted(first)  # shuffled, not in stored order


def test_corrupt_image_is_dropped_counted_and_never_batched(
    config, geometry, tokenizer, train_records
):
    records = [dict(r) for r in train_records[:17]]
    records[5] = dict(records[5], image_bytes=[b"\x89PNG broken"])
    text_only = dict(records[6], image_bytes=[], image_paths=[])  # text has <image>: mismatch
    records[6] = text_only
    cfg = dataclasses.replace(config, passes=1)
    iterator = make_train_iterator(cfg, geometry, tokenizer, 0, 1, source=records)
    batches = list(iterator)
    assert len(batches) == 1  # 15 good examples: one full batch, the rest dropped at the end
    assert iterator.dropped == {"unreadable_image": 1, "image_count_mismatch": 1}
    assert iterator.get_state()["dropped"] == {"unreadable_image": 1, "image_count_mismatch": 1}


def test_text_only_and_multi_image_samples(config, geometry, tokenizer, train_records):
    record = train_records[0]
    text_only = dict(record, image_bytes=[], image_paths=[])
    text_only["conversations"] = json.dumps(
        [{"from": "human", "value": "How many objects are there?"}, {"from": "gpt", "value": "two"}]
    )
    two_images = dict(record, image_bytes=list(record["image_bytes"]) * 2)
    two_images["conversations"] = json.dumps(
        [
            {"from": "human", "value": "<image> <image> Which color do you see?"},
            {"from": "gpt", "value": "red"},
        ]
    )
    cfg = dataclasses.replace(config, max_images_per_sample=2, global_batch_size=2, max_len=96)
    iterator = make_train_iterator(cfg, geometry, tokenizer, 0, 1, source=[text_only, two_images])
    batch = next(iterator)
    assert not iterator.dropped
    order = np.argsort(batch["image_mask"].sum(axis=1))  # text-only first
    np.testing.assert_array_equal(batch["image_mask"][order], [[False, False], [True, True]])
    assert np.all(batch["images"][order[0]] == 0)
    image_tokens = (batch["input_ids"][order] == tokenizer.image_token_id).sum(axis=1)
    np.testing.assert_array_equal(image_tokens, [0, 2 * IMAGE_TOKENS])


def test_worker_processes_give_the_same_batches_and_resume(config, geometry, tokenizer):
    expected = take(make_train_iterator(config, geometry, tokenizer, 0, 1), 3)
    workers = dataclasses.replace(config, num_workers=2)
    iterator = make_train_iterator(workers, geometry, tokenizer, 0, 1)
    assert_same_batches(take(iterator, 1), expected[:1])
    state = iterator.get_state()
    iterator.close()
    restored = make_train_iterator(workers, geometry, tokenizer, 0, 1)
    restored.set_state(state)
    assert_same_batches(take(restored, 2), expected[1:])
    restored.close()


def test_to_global_batch_shards_the_batch_over_data_axes(config, geometry, tokenizer):
    batch = next(make_train_iterator(config, geometry, tokenizer, 0, 1))
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
    global_batch = to_global_batch(batch, mesh)
    for key, value in batch.items():
        array = getattr(global_batch, key)
        assert array.shape == value.shape and array.dtype == value.dtype
        assert array.sharding.spec[0] == ("data", "fsdp")
        assert len(array.addressable_shards) == 8
        assert array.addressable_shards[0].data.shape[0] == 1
        np.testing.assert_array_equal(np.asarray(array), value)


def test_eval_questions_are_the_assistant_turns(config, geometry, tokenizer):
    questions = make_eval_questions(config, geometry, tokenizer)
    source = datasets.open_split(config, "test")
    answers = sum(len(json.loads(source[i]["conversations"])) // 2 for i in range(len(source)))
    assert len(questions) == answers
    first = questions[0]
    assert first.images.shape == (1, 1, 16, 16, 3) and first.image_mask.tolist() == [True]
    assert (first.prompt_ids == tokenizer.image_token_id).sum() == IMAGE_TOKENS
    decoded = tokenizer.tokenizer.decode(first.prompt_ids[-3:])
    assert decoded.replace(" ", "").endswith("ASSISTANT:")
    assert first.stop == "</s>"
