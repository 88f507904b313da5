"""Sequence packing and modality-length grouping: whole conversations, the same loss and
gradients as unpacked, no attention across conversations, exact resume, any process count."""

from __future__ import annotations

import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from train_fixtures import TINY, build, flat_params, host_params, make_batch, max_relative

from llava_jax.data import datasets
from llava_jax.data.config import DataConfig
from llava_jax.data.datasets.record import from_stored
from llava_jax.data.encode import ExampleEncoder, RowEncoder
from llava_jax.data.image_tiles import ImageTiler
from llava_jax.data.packing import LengthTable, first_fit, modality_length_order
from llava_jax.data.pipeline import (
    NoUsableData,
    length_table,
    make_train_iterator,
    tokenizer_for,
)
from llava_jax.models.inputs import Batch, ImageGeometry
from llava_jax.models.llava import Llava
from llava_jax.sharding import make_mesh
from llava_jax.train.state import init_train_state
from llava_jax.train.step import loss_sums
from llava_jax.train.trainer import check_packing_attention

TEXT_ONLY = [
    {"from": "human", "value": "How many objects are there?"},
    {"from": "gpt", "value": "two"},
]
TWO_IMAGES = [
    {"from": "human", "value": "<image> <image> Which color do you see?"},
    {"from": "gpt", "value": "red"},
]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return DataConfig(
        data_dir=str(tmp_path_factory.mktemp("tfds")),
        synthetic_num_train=30,
        synthetic_num_test=4,
        synthetic_image_size=16,
        max_len=160,
        max_images_per_sample=2,
        max_images_per_row=4,
        packing=True,
        packing_window=4,
        global_batch_size=4,
        seed=1,
    )


@pytest.fixture(scope="module")
def geometry():
    return ImageGeometry.square(14, 4)  # TINY's vision tower: 4 image tokens


@pytest.fixture(scope="module")
def tokenizer(config):
    return tokenizer_for(config)


@pytest.fixture(scope="module")
def records(config):
    """30 one-image conversations, 6 text-only and 4 with two images, interleaved, and one
    text-only conversation longer than max_len (truncated, as without packing)."""
    source = datasets.open_split(config, "train")
    stored = [source[i] for i in range(len(source))]
    mixed = []
    for index, record in enumerate(stored):
        mixed.append(record)
        if index % 5 == 0:
            mixed.append(
                dict(
                    record,
                    id=f"text-{index}",
                    image_bytes=[],
                    image_paths=[],
                    conversations=json.dumps(TEXT_ONLY),
                )
            )
        if index % 8 == 1:
            mixed.append(
                dict(
                    record,
                    id=f"two-{index}",
                    image_bytes=list(record["image_bytes"]) * 2,
                    conversations=json.dumps(TWO_IMAGES),
                )
            )
    long_answer = " ".join(["red circle"] * 120)
    mixed.append(
        dict(
            stored[0],
            id="too-long",
            image_bytes=[],
            image_paths=[],
            conversations=json.dumps([TEXT_ONLY[0], {"from": "gpt", "value": long_answer}]),
        )
    )
    return mixed


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(a, b):
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_first_fit_places_whole_conversations_within_the_limits():
    lengths = np.array([60, 100, 30, 0, 90, 40, 70, 10, 50, 160], np.int32)
    images = np.array([1, 1, 0, 1, 2, 0, 1, 0, 2, 1], np.int32)
    reasons = np.array(["", "", "", "image_truncated", "", "", "", "", "", ""])
    table = LengthTable(lengths, images, reasons)
    order = np.random.default_rng(0).permutation(len(lengths))
    rows = first_fit(order, table, max_len=160, max_images=2, window=3)
    placed = np.concatenate(rows)
    assert sorted(placed.tolist()) == [i for i in range(10) if i != 3]  # each kept once
    for row in rows:
        assert lengths[row].sum() <= 160 and images[row].sum() <= 2
    assert len(rows) < 9  # some rows hold several conversations
    again = first_fit(order, table, max_len=160, max_images=2, window=3)
    assert [r.tolist() for r in rows] == [r.tolist() for r in again]
    with pytest.raises(ValueError, match="max_images_per_row"):
        first_fit(order, table, max_len=160, max_images=1, window=3)


def test_packed_rows_hold_each_conversation_as_unpacked_training_would(
    config, geometry, tokenizer, records
):
    one_epoch = dataclasses.replace(config, passes=1, global_batch_size=1)  # every row
    iterator = make_train_iterator(one_epoch, geometry, tokenizer, 0, 1, source=records)
    batches = list(iterator)
    assert not iterator.dropped
    unpacked = ExampleEncoder(dataclasses.replace(config, packing=False), geometry, tokenizer)
    by_id = {from_stored(r).id: r for r in records}
    seen = []
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            segments = batch["attention_mask"][row]
            count = segments.max()
            image_slot = 0
            for segment in range(1, count + 1):
                where = np.flatnonzero(segments == segment)
                assert np.all(np.diff(where) == 1)  # contiguous
                # The row's ids, in order, name its conversations.
                example = unpacked.encode(from_stored(by_id[records_in(batch, row)[segment - 1]]))
                length = int(example["attention_mask"].sum())
                assert len(where) == length
                np.testing.assert_array_equal(
                    batch["input_ids"][row, where], example["input_ids"][:length]
                )
                np.testing.assert_array_equal(batch["positions"][row, where], np.arange(length))
                # Targets as unpacked: a row's first token is never one.
                np.testing.assert_array_equal(
                    batch["loss_mask"][row, where[1:]], example["loss_mask"][1:length]
                )
                assert batch["loss_mask"][row, where[0]] == 0
                images = example["images"][example["image_mask"]]
                got = batch["images"][row, image_slot : image_slot + len(images)]
                np.testing.assert_array_equal(got, images)
                image_slot += len(images)
            assert batch["image_mask"][row].sum() == image_slot
            padding = segments == 0
            assert np.all(batch["input_ids"][row, padding] == tokenizer.pad_token_id)
            assert np.all(batch["loss_mask"][row, padding] == 0)
            seen.extend(records_in(batch, row))
    # One epoch: every conversation once.
    assert sorted(seen) == sorted(from_stored(r).id for r in records)
    assert "too-long" in seen  # truncated to a row of its own, as unpacked training would
    rows = sum(len(b["input_ids"]) for b in batches)
    assert rows < len(records) / 1.5  # packed: far fewer rows than conversations


def records_in(batch, row) -> list[str]:
    """The ids of a packed row's conversations, in order (kept beside the batch)."""
    return batch["ids"][row].split(",")


@pytest.fixture(autouse=True)
def _keep_ids(monkeypatch):
    """Batches carry their rows' record ids in these tests (`ids`)."""
    from llava_jax.data import pipeline

    monkeypatch.setattr(pipeline, "BATCH_KEYS", (*pipeline.BATCH_KEYS, "ids"))
    original = RowEncoder.__call__

    def with_ids(self, row):
        example = original(self, row)
        return {**example, "ids": np.asarray(example["id"])}

    monkeypatch.setattr(RowEncoder, "__call__", with_ids)
    original_example = ExampleEncoder.__call__

    def example_with_ids(self, stored):
        example = original_example(self, stored)
        if "input_ids" not in example:  # a dropped record the stream refills
            return example
        return {**example, "ids": np.asarray(example["id"])}  # '': a slot left empty

    monkeypatch.setattr(ExampleEncoder, "__call__", example_with_ids)


def _model_and_params(tokenizer, pinpoints=()):
    config = dataclasses.replace(
        TINY,
        text=dataclasses.replace(
            TINY.text, vocab_size=tokenizer.vocab_size, max_position_embeddings=256
        ),
        image_token_id=tokenizer.image_token_id,
        image_grid_pinpoints=pinpoints,
    )
    return Llava(config), host_params_for(config)


def host_params_for(config):
    from llava_jax.models.llava import init_params

    return jax.device_get(init_params(config, jax.random.key(0)))


def _inputs(batch):
    keys = ("input_ids", "images", "image_mask", "attention_mask", "positions", "loss_mask")
    return {k: jnp.asarray(batch[k]) for k in keys}


# LLaVA-NeXT grids of TINY's 14-pixel tiles (2 x 2 features each), and images of several
# shapes for it: a row's images take different numbers of tokens, none the largest layout's.
NEXT_PINPOINTS = ((14, 28), (28, 14), (28, 28))
NEXT_IMAGE_SIZES = [[(12, 30)], [], [(30, 12)], [(9, 25), (25, 11)], [(12, 30)]]


def _with_images(record: dict, sizes: list[tuple[int, int]], seed: int) -> dict:
    """`record` with random PNG images of these (height, width) instead of its own."""
    rng = np.random.default_rng(seed)
    pngs = []
    for height, width in sizes:
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(png, "PNG")
        pngs.append(png.getvalue())
    return dict(record, image_bytes=pngs)


@pytest.mark.parametrize("pinpoints", [(), NEXT_PINPOINTS], ids=["llava-1.5", "next"])
def test_packed_loss_and_gradients_equal_unpacked(config, geometry, tokenizer, records, pinpoints):
    """Text-only, one-image and two-image conversations: the token-weighted loss and its
    gradients are the same packed into rows as one conversation per row (float32). NeXT:
    each image's own token count, so a row's later images start their features after the
    earlier images' counts."""
    chosen = [records[i] for i in (0, 1, 2, 3, 4)]  # image, text-only, image, two images, ...
    if pinpoints:
        geometry = ImageTiler(geometry.tile, 7, pinpoints)
        chosen = [
            _with_images(record, sizes, seed)
            for seed, (record, sizes) in enumerate(zip(chosen, NEXT_IMAGE_SIZES, strict=True))
        ]
    kinds = [len(r["image_bytes"]) for r in chosen]
    assert 0 in kinds and 1 in kinds and 2 in kinds
    packed_config = dataclasses.replace(config, passes=1, global_batch_size=2, max_len=200)
    packed = next(make_train_iterator(packed_config, geometry, tokenizer, 0, 1, source=chosen))
    assert packed["attention_mask"].max() >= 3  # one row holds three or more conversations
    assert packed["image_mask"].sum(axis=1).max() >= 2  # and a row several images
    assert sorted(sum((records_in(packed, r) for r in range(2)), [])) == sorted(
        from_stored(r).id for r in chosen
    )
    plain_config = dataclasses.replace(
        config, packing=False, passes=1, global_batch_size=len(chosen)
    )
    plain = next(make_train_iterator(plain_config, geometry, tokenizer, 0, 1, source=chosen))
    model, params = _model_and_params(tokenizer, pinpoints)

    def mean_loss(params, batch):
        _, ce, _, tokens = loss_sums(model, params, Batch.from_arrays(batch))
        return ce / tokens, tokens

    results = []
    for batch in (packed, plain):
        inputs = _inputs(batch)
        if pinpoints:
            inputs["image_layout"] = jnp.asarray(batch["image_layout"])
            counts = (batch["image_layout"] >= 0).sum(axis=-1)[batch["image_mask"]]
            assert len(set(counts.tolist())) > 1 and counts.max() < geometry.max_tokens
        loss_and_grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))
        (loss, tokens), grads = loss_and_grads(params, inputs)
        results.append((float(loss), float(tokens), grads))
    (loss_p, tokens_p, grads_p), (loss_u, tokens_u, grads_u) = results
    assert tokens_p == tokens_u > 0
    assert abs(loss_p - loss_u) <= 1e-5 * abs(loss_u)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(grads_p), jax.tree.leaves(grads_u), strict=True
    ):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-6)
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale, jax.tree_util.keystr(path)


@pytest.mark.parametrize("attention", ["xla", "chunked", "dot_product"])
def test_changing_one_conversation_leaves_the_others_logits_bitwise(
    attention, config, geometry, tokenizer, records
):
    chosen = [records[i] for i in (0, 1, 2, 3, 4)]
    packed_config = dataclasses.replace(config, passes=1, global_batch_size=2)
    batch = next(make_train_iterator(packed_config, geometry, tokenizer, 0, 1, source=chosen))
    row = int(np.argmax(batch["attention_mask"].max(axis=1)))  # the row with most segments
    model, params = _model_and_params(tokenizer)
    model = Llava(dataclasses.replace(model.config, attention=attention))
    segments = batch["attention_mask"][row]
    assert segments.max() >= 2
    changed = {k: v.copy() for k, v in batch.items() if k != "ids"}
    victim = segments == 1  # the first conversation (every later one could see it): its
    is_image = batch["input_ids"][row] == tokenizer.image_token_id  # text and images change
    text = victim & ~is_image
    changed["input_ids"][row, text] = (changed["input_ids"][row, text] + 7) % tokenizer.vocab_size
    changed["images"][row, : int(is_image[victim].sum()) // 4] += 1.0

    def logits(b):
        inputs = _inputs(b)
        inputs.pop("loss_mask")
        return np.asarray(jax.jit(model.apply)({"params": params}, **inputs))

    before, after = logits(batch), logits(changed)
    others = (segments > 0) & ~victim
    np.testing.assert_array_equal(before[row, others], after[row, others])
    assert np.abs(before[row, victim] - after[row, victim]).max() > 1e-3  # it did change


def test_packing_resumes_exactly_and_does_not_depend_on_the_process_count(
    config, geometry, tokenizer, records
):
    iterator = make_train_iterator(config, geometry, tokenizer, 0, 1, source=records)
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))  # must survive JSON (Orbax)
    expected = take(iterator, 8)  # crosses into the second epoch
    restored = make_train_iterator(config, geometry, tokenizer, 0, 1, source=records)
    restored.set_state(state)
    assert_same_batches(take(restored, 8), expected)

    one = make_train_iterator(config, geometry, tokenizer, 0, 1, source=records)
    two = [make_train_iterator(config, geometry, tokenizer, p, 2, source=records) for p in range(2)]
    for _ in range(10):
        whole = next(one)
        halves = [next(iterator) for iterator in two]
        for key, value in whole.items():
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)


def test_modality_length_grouping_gives_single_modality_batches_sorted_by_length(
    config, geometry, tokenizer, records
):
    grouped = dataclasses.replace(
        config, packing=False, group_by_modality_length=True, global_batch_size=4, passes=2
    )
    table = length_table(grouped, geometry, tokenizer, records)
    iterator = make_train_iterator(grouped, geometry, tokenizer, 0, 1, source=records)
    batches = list(iterator)
    # LLaVA puts each modality's last mega-batch together at the end of the epoch: only
    # batches holding some of those may mix (or be unsorted).
    count, image_count = len(records), int((table.num_images > 0).sum())
    tail = sum((n - 1) % 4 + 1 for n in (image_count, count - image_count) if n)
    per_epoch = count // 4  # whole batches: the epoch's last count % 4 records are left out
    assert len(batches) == 2 * per_epoch
    at_the_end = {
        epoch * per_epoch + position // 4
        for epoch in range(2)
        for position in range(count - tail, per_epoch * 4)
    }
    has_image = [b["image_mask"].any(axis=1) for b in batches]
    mixed = {i for i, h in enumerate(has_image) if h.any() and not h.all()}
    assert mixed and mixed <= at_the_end
    assert sum(1 for h in has_image if not h.any()) >= 1  # whole text-only batches
    for index, batch in enumerate(batches):
        if index not in at_the_end:
            lengths = batch["attention_mask"].sum(axis=1)
            assert np.all(np.diff(lengths) <= 0), index  # longest first
    # Deterministic, a new order each epoch, and exactly resumable.
    order0 = modality_length_order(table, 4, grouped.seed, 0)
    assert len(set(order0.tolist())) == len(order0) == len(records) // 4 * 4
    assert order0.tolist() == modality_length_order(table, 4, grouped.seed, 0).tolist()
    assert order0.tolist() != modality_length_order(table, 4, grouped.seed, 1).tolist()
    iterator = make_train_iterator(grouped, geometry, tokenizer, 0, 1, source=records)
    take(iterator, 5)
    state = iterator.get_state()
    expected = take(iterator, 4)
    restored = make_train_iterator(grouped, geometry, tokenizer, 0, 1, source=records)
    restored.set_state(state)
    assert_same_batches(take(restored, 4), expected)


def test_settings_that_cannot_work_are_refused(config):
    with pytest.raises(ValueError, match="choose one"):
        dataclasses.replace(config, group_by_modality_length=True)
    with pytest.raises(ValueError, match="max_images_per_row=1"):
        dataclasses.replace(config, max_images_per_row=1)
    model = dataclasses.replace(TINY, attention="cudnn")
    with pytest.raises(ValueError, match="honours segments"):
        check_packing_attention(model, config, make_mesh((8, 1, 1)))
    check_packing_attention(model, dataclasses.replace(config, packing=False), make_mesh((8, 1, 1)))


def test_bad_records_leave_their_place_in_a_packed_row_counted(
    config, geometry, tokenizer, records, caplog
):
    """Too many images (known before packing) and an unreadable image (found when the row
    is encoded) are dropped and counted; the rows go on, and nothing stops. When every
    record is unusable, packing says so instead of spinning."""
    five = dict(records[0], id="five-images", image_bytes=list(records[0]["image_bytes"]) * 5)
    five["conversations"] = json.dumps(
        [{"from": "human", "value": "<image> " * 5 + "colours?"}, {"from": "gpt", "value": "red"}]
    )
    corrupt = dict(records[2], id="corrupt", image_bytes=[b"not an image"])
    source = [five, corrupt, *records[4:12]]
    one_epoch = dataclasses.replace(config, passes=1, global_batch_size=2)
    iterator = make_train_iterator(one_epoch, geometry, tokenizer, 0, 1, source=source)
    with caplog.at_level("WARNING"):
        batches = list(iterator)
    ids = {i for b in batches for row in range(len(b["ids"])) for i in records_in(b, row)}
    assert "five-images" not in ids and "corrupt" not in ids
    good = {from_stored(r).id for r in records[4:12]}
    assert ids <= good and len(ids) >= len(good) - 3  # a last partial batch is left out
    assert iterator.dropped == {"unreadable_image": 1}  # found in its row
    assert "too_many_images: 1" in caplog.text and "five-images" in caplog.text
    assert "corrupt" in caplog.text
    with pytest.raises(NoUsableData, match="too_many_images: 2"):
        make_train_iterator(one_epoch, geometry, tokenizer, 0, 1, source=[five, five])


GROUPED_BATCH = 16


def _answer(words: int) -> list[dict]:
    return [TEXT_ONLY[0], {"from": "gpt", "value": " ".join(["red"] * words)}]


def _empty_answer(record: dict) -> dict:
    """The record with its first answer empty: the length table drops it ('empty_turn')."""
    turns = json.loads(record["conversations"])
    turns[1] = dict(turns[1], value="")
    return dict(record, conversations=json.dumps(turns))


@pytest.fixture(scope="module")
def grouping_sources(records):
    """(clean, with drops, the empty-answer ids, the corrupt id): 316 records, 6 copies of
    `records` (text-only answers of varied length) and 70 more text-only ones; `with drops`
    has 3 of them with an empty answer (known to the length table) and one image record
    with corrupt image bytes (found only when it is read)."""
    clean = []
    for copy in range(6):
        for index, record in enumerate(records):
            record = dict(record, id=f"{from_stored(record).id}#{copy}")
            if not record["image_bytes"] and not record["id"].startswith("too-long"):
                record["conversations"] = json.dumps(_answer(1 + (7 * copy + index) % 25))
            clean.append(record)
    for k in range(70):
        text = dict(records[1], id=f"words-{k}", conversations=json.dumps(_answer(1 + k % 30)))
        clean.insert(4 * k + 3, text)  # interleaved
    with_drops = list(clean)
    images = [i for i, r in enumerate(clean) if len(r["image_bytes"]) == 1]
    texts = [i for i, r in enumerate(clean) if not r["image_bytes"]]
    empty = [images[5], images[90], texts[30]]  # two image records and a text-only one
    for index in empty:
        with_drops[index] = _empty_answer(clean[index])
    corrupt = images[20]  # read in a sorted batch of each epoch (the test checks)
    with_drops[corrupt] = dict(clean[corrupt], image_bytes=[b"not an image"])
    return clean, with_drops, [from_stored(clean[i]).id for i in empty], clean[corrupt]["id"]


def _grouped(config, **changes):
    return dataclasses.replace(
        config,
        packing=False,
        group_by_modality_length=True,
        global_batch_size=GROUPED_BATCH,
        **changes,
    )


def test_dropped_records_do_not_shift_the_grouped_batches(
    config, geometry, tokenizer, grouping_sources, caplog
):
    """3 empty answers (left out before the batches are planned) and a corrupt image (found
    when read: its slot stays, all padding) among 316 records: every batch but each epoch's
    mixed tail is one modality sorted longest first; the batches are those of the usable
    records alone, slot for slot; the drops are counted."""
    clean, with_drops, empty, corrupt = grouping_sources
    grouped = _grouped(config, passes=2)
    with caplog.at_level("WARNING"):
        iterator = make_train_iterator(grouped, geometry, tokenizer, 0, 1, source=with_drops)
        batches = list(iterator)
    table = length_table(grouped, geometry, tokenizer, with_drops)
    assert table.dropped() == {"empty_turn": 3}  # the table decodes no image

    # By the batches' own rows: one modality, longest first, except each epoch's tail (each
    # modality's last mega-batch, mixed, as LLaVA).
    usable = [r for r in clean if from_stored(r).id not in empty]  # the corrupt one readable
    per_epoch = len(usable) // GROUPED_BATCH
    image_count = sum(bool(r["image_bytes"]) for r in usable)
    tail = sum((n - 1) % GROUPED_BATCH + 1 for n in (image_count, len(usable) - image_count))
    assert (len(usable) - tail) // GROUPED_BATCH == per_epoch - 1  # one mixed batch an epoch
    single, ordered = [], []
    for batch in batches:
        real = batch["attention_mask"].any(axis=1)
        has_image = batch["image_mask"][real].any(axis=1)
        lengths = batch["attention_mask"][real].sum(axis=1)
        single.append(bool(has_image.all() or not has_image.any()))
        ordered.append(bool(single[-1] and np.all(np.diff(lengths) <= 0)))
    tails = [per_epoch - 1, 2 * per_epoch - 1]
    assert [i for i, good in enumerate(ordered) if not good] == tails, (
        f"{sum(single)} of {len(batches)} batches single-modality, {sum(ordered)} of them "
        f"sorted; expected all but the tails {tails} of {2 * per_epoch}"
    )

    # Slot for slot the batches of the usable records alone, the corrupt one's slot empty.
    reference = list(make_train_iterator(grouped, geometry, tokenizer, 0, 1, source=usable))
    assert len(batches) == len(reference) == 2 * per_epoch
    corrupt_slots = [0, 0]  # per epoch
    for index, (got, expected) in enumerate(zip(batches, reference, strict=True)):
        assert len(got["ids"]) == GROUPED_BATCH
        for row in range(GROUPED_BATCH):
            if expected["ids"][row] == corrupt:
                corrupt_slots[index // per_epoch] += 1
                assert index not in tails  # the test means it in a sorted batch
                assert got["ids"][row] == ""
                assert not got["loss_mask"][row].any() and not got["attention_mask"][row].any()
                assert not got["image_mask"][row].any() and not got["images"][row].any()
                assert np.all(got["input_ids"][row] == tokenizer.pad_token_id)
                continue
            for key in expected:
                np.testing.assert_array_equal(got[key][row], expected[key][row], err_msg=key)
    assert corrupt_slots == [1, 1]  # read once each epoch
    assert iterator.dropped == {"unreadable_image": 2}
    assert iterator.get_state()["dropped"] == {"unreadable_image": 2}
    assert "3 of 316 records are left out before batching (empty_turn: 3)" in caplog.text
    assert f"Dropped record {corrupt}" in caplog.text and "unreadable_image" in caplog.text
    for epoch in range(2):
        ids = [i for b in batches[epoch * per_epoch : (epoch + 1) * per_epoch] for i in b["ids"]]
        assert len(set(ids)) == len(ids)  # each record once, '' the one empty slot
        assert not set(ids) & {*empty, corrupt}


def test_grouped_batches_with_drops_resume_exactly_on_any_process_count(
    config, geometry, tokenizer, grouping_sources
):
    """With the drops, the grouped batches are the same read by two processes, and a run
    resumed from its iterator state goes on exactly, drop counts included."""
    _, with_drops, _, corrupt = grouping_sources
    grouped = _grouped(config)  # epochs without end
    iterator = make_train_iterator(grouped, geometry, tokenizer, 0, 1, source=with_drops)
    expected = take(iterator, 24)  # into the second epoch
    empty_slots = int(sum((b["ids"] == "").sum() for b in expected))
    assert empty_slots >= 1 and iterator.dropped == {"unreadable_image": empty_slots}
    assert corrupt not in {i for b in expected for i in b["ids"]}
    two = [
        make_train_iterator(grouped, geometry, tokenizer, p, 2, source=with_drops) for p in range(2)
    ]
    for index, whole in enumerate(expected):
        halves = [next(share) for share in two]
        for key, value in whole.items():
            joined = np.concatenate([h[key] for h in halves])
            np.testing.assert_array_equal(joined, value, err_msg=f"batch {index}, {key}")
    assert two[0].dropped + two[1].dropped == iterator.dropped
    iterator = make_train_iterator(grouped, geometry, tokenizer, 0, 1, source=with_drops)
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))  # must survive JSON (Orbax)
    restored = make_train_iterator(grouped, geometry, tokenizer, 0, 1, source=with_drops)
    restored.set_state(state)
    assert_same_batches(take(restored, 21), expected[3:])
    assert restored.dropped == {"unreadable_image": empty_slots}


def test_grouping_says_so_when_no_record_is_usable(config, geometry, tokenizer, records):
    """Every record dropped by the table, or found bad when read, or fewer usable records
    than one global batch: an error that says so, never a wait without end."""
    grouped = dataclasses.replace(_grouped(config), global_batch_size=4)
    empty = [dict(_empty_answer(records[0]), id=f"empty-{i}") for i in range(8)]
    with pytest.raises(NoUsableData, match="empty_turn: 8"):
        make_train_iterator(grouped, geometry, tokenizer, 0, 1, source=empty)
    corrupt = [dict(records[0], id=f"corrupt-{i}", image_bytes=[b"not an image"]) for i in range(8)]
    iterator = make_train_iterator(grouped, geometry, tokenizer, 0, 1, source=corrupt)
    first = next(iterator)  # its 4 slots kept, empty: the run of drops is half a pass
    assert not first["attention_mask"].any() and not first["loss_mask"].any()
    with pytest.raises(NoUsableData, match="unreadable_image: 8"):
        next(iterator)
    with pytest.raises(ValueError, match="3 usable records, fewer than one global batch"):
        make_train_iterator(grouped, geometry, tokenizer, 0, 1, source=[*empty[:5], *records[:3]])


@pytest.mark.parametrize("attention", ["chunked", "dot_product", "splash"])
def test_an_empty_slot_or_an_all_padding_batch_leaves_the_step_finite(attention):
    """An empty slot (all padding: no token, no image, nothing supervised) changes nothing
    in the loss and gradients of its batch, and a batch of them trains on nothing, without
    a NaN (the step divides by max(supervised tokens, 1)). Each implementation CPUs run
    (splash interpreted); cudnn, which takes row lengths, needs a GPU."""
    setup, state, step = build((8, 1, 1), config=dataclasses.replace(TINY, attention=attention))
    batch = make_batch(3)
    emptied = {key: value.copy() for key, value in batch.items()}
    for key in ("input_ids", "loss_mask", "attention_mask", "images", "image_mask"):
        emptied[key][5] = 0  # pad id 0 in these batches
    unsupervised = {key: value.copy() for key, value in batch.items()}
    unsupervised["loss_mask"][5] = 0  # the same row, real but not a target
    _, reference = step(state, Batch.from_arrays(unsupervised))
    fresh = init_train_state(setup, jax.random.key(0), host_params())
    _, metrics = step(fresh, Batch.from_arrays(emptied))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    np.testing.assert_allclose(float(metrics["loss"]), float(reference["loss"]), rtol=1e-6)
    np.testing.assert_allclose(
        float(metrics["grad_norm"]), float(reference["grad_norm"]), rtol=1e-5
    )
    assert float(metrics["examples"]) == 7 and float(metrics["supervised_tokens"]) == float(
        reference["supervised_tokens"]
    )
    fresh = init_train_state(setup, jax.random.key(0), host_params())
    before = flat_params(fresh.params)
    nothing = {key: np.zeros_like(value) for key, value in batch.items()}
    fresh, metrics = step(fresh, Batch.from_arrays(nothing))
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
    after = flat_params(fresh.params)
    assert all(np.isfinite(v).all() for v in after.values())
    assert max_relative(after, before) == 0


@pytest.mark.parametrize("pinpoints", [(), ((28, 28), (28, 56))], ids=["llava-1.5", "next"])
def test_an_empty_grouped_slot_has_the_shapes_of_an_example(
    config, geometry, tokenizer, records, pinpoints
):
    grouped = _grouped(config)
    geometry = ImageTiler(geometry.tile, 7, pinpoints) if pinpoints else geometry
    encoder = ExampleEncoder(grouped, geometry, tokenizer)
    good = encoder(records[0])
    assert good["drop_reason"] == ""
    empty = encoder(dict(records[0], image_bytes=[b"not an image"]))
    assert empty["id"] == "" and empty["drop_reason"] == ""
    assert [d["drop_reason"] for d in empty["dropped"]] == ["unreadable_image"]
    assert empty["dropped"][0]["id"] == from_stored(records[0]).id
    assert "image_layout" in good  # every example's images carry their layouts
    for key in good.keys() - {"id", "ids", "drop_reason"}:
        assert empty[key].shape == good[key].shape and empty[key].dtype == good[key].dtype, key
    assert not empty["attention_mask"].any() and not empty["image_mask"].any()
    assert np.all(empty["image_layout"] == -1)
    plain = ExampleEncoder(
        dataclasses.replace(grouped, group_by_modality_length=False), geometry, tokenizer
    )
    refilled = plain(dict(records[0], image_bytes=[b"not an image"]))
    assert refilled["drop_reason"] == "unreadable_image" and "input_ids" not in refilled


def test_packing_says_so_when_every_record_is_found_bad_when_read(
    config, geometry, tokenizer, records
):
    """Rows whose every record fails when read are empty rows: a whole pass of them ends
    in `NoUsableData`, as the plain stream does, instead of empty batches without end."""
    corrupt = [dict(records[0], id=f"corrupt-{i}", image_bytes=[b"not an image"]) for i in range(8)]
    iterator = make_train_iterator(
        dataclasses.replace(config, global_batch_size=2), geometry, tokenizer, 0, 1, source=corrupt
    )
    with pytest.raises(NoUsableData, match="unreadable_image: 8"):
        take(iterator, 20)
