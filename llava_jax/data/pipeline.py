"""The grain input pipeline: prepared records -> fixed-shape batches -> global arrays.

Per JAX process: its disjoint shard of the split (``records[process_index::count]``),
shuffled per epoch from ``seed``, decoded and preprocessed in worker processes
(``mp_prefetch``), then filtered and batched in the main process so every dropped
sample is counted. The iterator's state (``get_state``/``set_state``, JSON-serialisable)
restores the exact next batches; it is a ``grain.DatasetIterator``, so
``grain.checkpoint.CheckpointSave/Restore`` checkpoint it with Orbax.

A batch (``B`` = global batch / process count, ``T`` = max_len, ``I`` = max images):

- ``input_ids int32[B, T]``: right-padded with the pad id; each ``<image>`` expanded to
  ``num_image_tokens`` copies of the image token id
- ``loss_mask float32[B, T]``: 1 on assistant answer tokens and their end token
- ``attention_mask int32[B, T]``: the segment of each token, 0 on padding: 1 on every real
  token of an unpacked row; with ``packing``, 1, 2, ... for the conversations of a row
- ``positions int32[B, T]``: each token's position in its conversation (RoPE)
- ``images float32[B, I, H, W, 3]``: normalised; unused slots are zeros
- ``image_mask bool[B, I]``: valid images first
- LLaVA-NeXT (``image_grid_pinpoints``): ``images float32[B, I, T, H, W, 3]``, each image's
  tiles, and ``image_layout int32[B, I, N]`` (data/anyres.py); an image's token count
  depends on its size

With ``packing`` a row holds whole conversations placed first-fit (data/packing.py), ``I``
is ``max_images_per_row`` and the row's images follow its image tokens' order; with
``group_by_modality_length`` the records come in LLaVA's grouped order (planned over the
records the length table keeps; one dropped when read leaves its slot all padding, so no
later batch shifts). Both keep the iterator's state an index, so resume stays exact.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Sequence

import grain
import jax
import numpy as np
from absl import flags

from llava_jax.data import datasets, packing
from llava_jax.data.config import DataConfig
from llava_jax.data.conversation import (
    IMAGE_PLACEHOLDER,
    DroppedExample,
    TokenizedConversation,
    skip_leading_answer,
    tokenize_conversation,
)
from llava_jax.data.datasets.record import Record, from_stored
from llava_jax.data.image import decode_image, decoded_size, load_and_preprocess
from llava_jax.data.prompt import prompt_ids
from llava_jax.data.tokenizer import LoadedTokenizer, load_tokenizer, tokenizer_fingerprint
from llava_jax.models.inputs import Batch
from llava_jax.sharding import batch_sharding

BATCH_KEYS = Batch.fields()  # a host batch's arrays: the model's input contract


def tokenizer_for(config: DataConfig) -> LoadedTokenizer:
    """The configured tokenizer; for 'synthetic' without a path, the built-in one
    (built once under ``data_dir/synthetic_tokenizer-<vocabulary hash>``)."""
    path = config.tokenizer_path
    if path is None:
        if config.source != "synthetic":
            raise ValueError("tokenizer_path is required for source 'llava_json'")
        from llava_jax.data.datasets.synthetic import build_tokenizer, tokenizer_name

        path = os.path.join(os.path.expanduser(config.data_dir), tokenizer_name())
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            build_tokenizer(path)
    return load_tokenizer(path)


class ExampleEncoder:
    """Stored record -> one fixed-shape example (runs in grain workers).

    Returns the example dict with ``input_ids int32[T]``, ``loss_mask float32[T]``,
    ``attention_mask int32[T]``, ``images float32[I, H, W, 3]``, ``image_mask bool[I]``,
    ``id`` and ``drop_reason == ''``; or, for a sample that must not be trained on,
    only ``id``, ``file``, ``detail`` and a non-empty ``drop_reason``.
    """

    def __init__(self, config: DataConfig, tokenizer: LoadedTokenizer):
        self.config = config
        self.template = config.conversation_template
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.image_token_id
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, stored: dict) -> dict:
        """The record's example, or, for a record dropped here (e.g. an unreadable image),
        its drop report: ``id``, ``drop_reason``, ``detail``, ``file``; ``BatchIterator``
        fills its place from the stream. Under ``group_by_modality_length`` the place is a
        slot of a planned batch and stays: an all-padding example (``input_ids`` the pad id,
        ``loss_mask``, ``attention_mask`` 0, no image; ``id`` '') with the report in
        ``dropped``, as a packed row reports a record it leaves out."""
        record = from_stored(stored)
        try:
            return self.encode(record)
        except DroppedExample as error:
            report = {
                "id": record.id,
                "drop_reason": error.reason,
                "detail": error.detail,
                "file": error.file,
            }
        if not self.config.group_by_modality_length:
            return report
        # Refilling the slot would shift every later batch across mega-batch boundaries.
        return {**self.empty_example(self.config.max_images_per_sample), "dropped": [report]}

    def empty_example(self, slots: int) -> dict:
        """An example of the batch's shapes holding nothing: every token the pad id, no
        segment, no target, `slots` empty image slots (a NeXT layout all -1)."""
        c, geometry = self.config, self.config.anyres
        tiles = () if geometry is None else (geometry.max_tiles,)
        example = {
            "id": "",
            "drop_reason": "",
            "input_ids": np.full((c.max_len,), self.pad_token_id, np.int32),
            "loss_mask": np.zeros((c.max_len,), np.float32),
            "attention_mask": np.zeros((c.max_len,), np.int32),
            "positions": np.zeros((c.max_len,), np.int32),
            "images": np.zeros((slots, *tiles, c.image_size, c.image_size, 3), np.float32),
            "image_mask": np.zeros((slots,), bool),
        }
        if geometry is not None:
            example["image_layout"] = np.full((slots, geometry.max_tokens), -1, np.int32)
        return example

    def _too_many_images(self, record: Record) -> str:
        """The drop detail when the record has more images than a sample may, else ''."""
        count, most = len(record.image_bytes), self.config.max_images_per_sample
        return f"{count} > {most}" if count > most else ""

    @staticmethod
    def _unreadable(record: Record, index: int, error: ValueError) -> DroppedExample:
        paths = record.image_paths
        file = paths[index] if index < len(paths) else ""
        return DroppedExample("unreadable_image", str(error), file)

    def images(self, record: Record) -> tuple[np.ndarray, np.ndarray]:
        """``float32[I, H, W, 3]`` and ``bool[I]`` for the record's images."""
        c = self.config
        if detail := self._too_many_images(record):
            raise DroppedExample("too_many_images", detail)
        images = np.zeros((c.max_images_per_sample, c.image_size, c.image_size, 3), np.float32)
        mask = np.zeros((c.max_images_per_sample,), bool)
        for index, data in enumerate(record.image_bytes):
            try:
                images[index] = load_and_preprocess(
                    data, c.image_size, c.image_aspect, c.image_mean, c.image_std
                )
            except ValueError as error:  # ImageDecodeError: corrupt bytes
                raise self._unreadable(record, index, error) from error
            mask[index] = True
        return images, mask

    def anyres_images(self, record: Record) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """LLaVA-NeXT (data/anyres.py): each image's tiles ``float32[I, T, S, S, 3]``,
        ``bool[I]``, its feature layout ``int32[I, N]`` and its number of image tokens."""
        c, geometry = self.config, self.config.anyres
        if detail := self._too_many_images(record):
            raise DroppedExample("too_many_images", detail)
        slots = c.max_images_per_sample
        tiles = np.zeros((slots, geometry.max_tiles, c.image_size, c.image_size, 3), np.float32)
        mask = np.zeros((slots,), bool)
        layout = np.full((slots, geometry.max_tokens), -1, np.int32)
        counts = []
        for index, data in enumerate(record.image_bytes):
            try:
                image = decode_image(data)
                measured = decoded_size(data)
            except ValueError as error:  # ImageDecodeError: corrupt bytes
                raise self._unreadable(record, index, error) from error
            if image.size != measured:  # a format that settles its size on load (ICO)
                raise DroppedExample(
                    "image_size_changed",
                    f"image {index}: header {measured}, decoded {image.size} (width, height)",
                    record.image_paths[index] if index < len(record.image_paths) else "",
                )
            tiles[index], layout[index], count = geometry.encode(image, c.image_mean, c.image_std)
            counts.append(count)
            mask[index] = True
        return tiles, mask, layout, counts

    def image_tokens(self, record: Record) -> list[int] | None:
        """LLaVA-NeXT: each image's number of image tokens, from its header (nothing
        decoded; raises ``DroppedExample`` for an unreadable one); None otherwise."""
        geometry = self.config.anyres
        if geometry is None:
            return None
        counts = []
        for index, data in enumerate(record.image_bytes):
            try:
                width, height = decoded_size(data)
            except ValueError as error:
                raise self._unreadable(record, index, error) from error
            counts.append(geometry.num_tokens(height, width))
        return counts

    def tokenize(self, record: Record, image_tokens: list | None = None) -> TokenizedConversation:
        """The record's tokens, unpadded (raises ``DroppedExample``); `image_tokens`: each
        image's token count (LLaVA-NeXT), else `num_image_tokens` each."""
        return tokenize_conversation(
            record.conversations,
            self.tokenizer,
            self.template,
            num_images=len(record.image_bytes),
            num_image_tokens=self.config.num_image_tokens if image_tokens is None else image_tokens,
            max_len=self.config.max_len,
        )

    def measure(self, stored: dict) -> tuple[int, int, str]:
        """(tokens, images, drop reason or '') of a stored record, no image decoded (a NeXT
        image's token count comes from its header's size)."""
        record = from_stored(stored)
        images = len(record.image_bytes)
        if self._too_many_images(record):
            return 0, images, "too_many_images"  # as `images` would drop it
        try:
            return len(self.tokenize(record, self.image_tokens(record)).input_ids), images, ""
        except DroppedExample as error:
            return 0, images, error.reason

    def encode(self, record: Record) -> dict:
        c = self.config
        layout = None
        if c.anyres is not None:  # the image sizes set the token counts: images first
            images, image_mask, layout, counts = self.anyres_images(record)
            tokens = self.tokenize(record, counts)
        else:
            tokens = self.tokenize(record)
            images, image_mask = self.images(record)
        length = len(tokens.input_ids)
        input_ids = np.full((c.max_len,), self.pad_token_id, np.int32)
        input_ids[:length] = tokens.input_ids
        loss_mask = np.zeros((c.max_len,), np.float32)
        loss_mask[:length] = tokens.loss_mask
        attention_mask = np.zeros((c.max_len,), np.int32)
        attention_mask[:length] = 1
        example = {
            "id": record.id,
            "drop_reason": "",
            "input_ids": input_ids,
            "loss_mask": loss_mask,
            "attention_mask": attention_mask,
            "positions": np.arange(c.max_len, dtype=np.int32),
            "images": images,
            "image_mask": image_mask,
        }
        if layout is not None:
            example["image_layout"] = layout
        return example


class RowEncoder:
    """A packed row's stored records -> one example of the shapes ``ExampleEncoder`` gives
    (``I`` = ``max_images_per_row``), conversation k of the row as segment k + 1 with
    positions from 0. A record that fails here (an unreadable image) leaves its place
    empty and is reported in ``dropped``; the row itself is never dropped, so every
    process keeps the same rows."""

    def __init__(self, config: DataConfig, tokenizer: LoadedTokenizer):
        self.config = config
        self.encoder = ExampleEncoder(config, tokenizer)

    def __call__(self, row: dict) -> dict:
        c = self.config
        example = self.encoder.empty_example(c.max_images_per_row)
        input_ids, loss_mask = example["input_ids"], example["loss_mask"]
        segments, positions = example["attention_mask"], example["positions"]
        images, image_mask = example["images"], example["image_mask"]
        layouts = example.get("image_layout")
        geometry = c.anyres
        ids, dropped = [], []
        start, image_slot = 0, 0
        for stored in row["records"]:
            record = from_stored(stored)
            try:
                if geometry is None:
                    tokens = self.encoder.tokenize(record)
                    pictures, valid = self.encoder.images(record)
                else:
                    pictures, valid, layout, counts = self.encoder.anyres_images(record)
                    tokens = self.encoder.tokenize(record, counts)
            except DroppedExample as error:
                dropped.append(
                    {
                        "id": record.id,
                        "drop_reason": error.reason,
                        "detail": error.detail,
                        "file": error.file,
                    }
                )
                continue
            end = start + len(tokens.input_ids)
            count = int(valid.sum())
            if end > c.max_len or image_slot + count > c.max_images_per_row:
                raise RuntimeError(  # the length table and this encoder disagree: a bug
                    f"record {record.id} does not fit its packed row ({end} tokens, "
                    f"{image_slot + count} images)"
                )
            input_ids[start:end] = tokens.input_ids
            loss_mask[start:end] = tokens.loss_mask
            # Position `start` is predicted from the previous conversation's last token:
            # never a target, as a row's first token never is.
            loss_mask[start] = 0.0
            segments[start:end] = len(ids) + 1
            positions[start:end] = np.arange(end - start)
            images[image_slot : image_slot + count] = pictures[valid]
            image_mask[image_slot : image_slot + count] = True
            if layouts is not None:
                layouts[image_slot : image_slot + count] = layout[valid]
            ids.append(record.id)
            start, image_slot = end, image_slot + count
        return {**example, "id": ",".join(ids), "dropped": dropped}  # (filled in place)


class NoUsableData(RuntimeError):
    """Every record of a whole pass over the data was dropped: training would wait forever."""


class BatchIterator(grain.DatasetIterator):
    """Filters dropped samples (counting them by reason) and stacks ``batch_size``
    examples into a batch (see the module docstring for shapes). An example that keeps its
    place while records are left out of it (``dropped``: a packed row's, or a grouped
    batch's slot, then all padding) is batched, and those records counted and logged alike.

    ``records_per_pass``: this process's records in one pass over the data; when that many
    in a row are dropped (with no real token batched between), no record is usable and
    ``NoUsableData`` says why, instead of spinning forever.

    ``get_state()`` is a JSON-serialisable dict: the grain state after the last
    example used, plus the drop counters.
    """

    def __init__(
        self,
        parent: grain.DatasetIterator,
        batch_size: int,
        max_logged: int = 20,
        records_per_pass: int | None = None,
    ):
        super().__init__(parent)
        self.batch_size = batch_size
        self.dropped: collections.Counter = collections.Counter()
        self.examples_seen = 0
        self.max_logged = max_logged
        self.records_per_pass = records_per_pass
        self._dropped_in_a_row: collections.Counter = collections.Counter()

    def _check_progress(self) -> None:
        run = sum(self._dropped_in_a_row.values())
        if self.records_per_pass is not None and run >= max(self.records_per_pass, 1):
            reasons = ", ".join(f"{k}: {v}" for k, v in self._dropped_in_a_row.most_common())
            raise NoUsableData(
                f"no usable example: all of the last {run} records (a whole pass over the "
                f"data) were dropped ({reasons}); see the warnings above for examples"
            )

    def __next__(self) -> dict[str, np.ndarray]:
        kept = []
        while len(kept) < self.batch_size:
            example = next(self._parent)  # StopIteration ends the data (partial batch dropped)
            self.examples_seen += 1
            reason = example["drop_reason"]
            if reason:
                self._dropped_in_a_row[reason] += 1
                self._check_progress()
                self.dropped[reason] += 1
                self._log_drop(example)
                continue
            for part in example.get("dropped", ()):  # left out of a packed row or grouped slot
                self._dropped_in_a_row[part["drop_reason"]] += 1
                self.dropped[part["drop_reason"]] += 1
                self._log_drop(part)
            if example["attention_mask"].any():  # something to train on: the data is usable
                self._dropped_in_a_row.clear()
            else:  # an empty slot or row: its drops count towards a pass of them
                self._check_progress()
            kept.append(example)
        keys = [key for key in BATCH_KEYS if key in kept[0]]
        return {key: np.stack([example[key] for example in kept]) for key in keys}

    def _log_drop(self, example: dict) -> None:
        if sum(self.dropped.values()) <= self.max_logged:
            logging.warning(
                "Dropped record %s%s: %s (%s)",
                example["id"],
                f" file {example['file']}" if example.get("file") else "",
                example["drop_reason"],
                example.get("detail", ""),
            )

    def get_state(self) -> dict:
        return {
            "grain": self._parent.get_state(),
            "dropped": dict(self.dropped),
            "examples_seen": self.examples_seen,
        }

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["grain"])
        self.dropped = collections.Counter(state["dropped"])
        self.examples_seen = int(state["examples_seen"])

    def close(self) -> None:
        self._parent.close()


class ProcessShare(grain.MapDataset):
    """This process's rows of every global batch of one global, shuffled stream.

    Global batch b is stream elements ``[b * B, (b + 1) * B)``; process p reads its block
    ``[b * B + p * B/P, b * B + (p + 1) * B/P)``, the rows its devices hold in the global
    array. So the batches, and a run's numbers, do not depend on how many processes read
    them, and the processes' shares are disjoint. A last partial global batch is left out.
    """

    def __init__(
        self,
        parent: grain.MapDataset,
        local_batch_size: int,
        process_index: int,
        process_count: int,
    ):
        super().__init__(parent)
        self._local = local_batch_size
        self._index = process_index
        self._count = process_count
        self._length = len(parent) // (local_batch_size * process_count) * local_batch_size

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        block, offset = divmod(index, self._local)
        return (block * self._count + self._index) * self._local + offset

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"ProcessShare(process {self._index} of {self._count}, {self._local} rows)"


def _process_index_and_count(process_index, process_count) -> tuple[int, int]:
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def length_table(
    config: DataConfig,
    tokenizer: LoadedTokenizer,
    source: Sequence,
    split: str | None = None,
) -> packing.LengthTable:
    """Every record's token and image counts (data/packing.py), measured with this
    pipeline's tokenization; kept beside the prepared `split` when one is named (a given
    in-memory source is measured each time)."""
    encoder = ExampleEncoder(config, tokenizer)
    cache_path = None
    if split is not None:
        key = packing.cache_key(
            tokenizer_fingerprint(tokenizer.tokenizer),
            tokenizer.image_token_id,
            config.template,
            config.template_version,
            config.max_len,
            config.num_image_tokens,
            config.max_images_per_sample,
            len(source),
            config.anyres,
        )
        directory = datasets.builder_for(config).data_dir
        cache_path = os.path.join(directory, "llava_jax_lengths", f"{split}-{key}.npz")
    table = packing.measure_lengths(source, encoder.measure, cache_path)
    dropped = table.dropped()
    if len(table) and sum(dropped.values()) == len(table):
        reasons = ", ".join(f"{k}: {v}" for k, v in dropped.most_common())
        raise NoUsableData(f"no usable example: all {len(table)} records are dropped ({reasons})")
    if dropped:
        first = np.flatnonzero(table.drop_reasons != "")[:5].tolist()
        logging.warning(
            "%d of %d records are left out before batching (%s), e.g. %s",
            sum(dropped.values()),
            len(table),
            ", ".join(f"{k}: {v}" for k, v in dropped.most_common()),
            ", ".join(from_stored(source[i]).id for i in first),
        )
    return table


def packed_rows(
    config: DataConfig,
    records: grain.MapDataset,
    table: packing.LengthTable,
    num_epochs: int | None = None,
) -> packing.PackedRows:
    """`records` packed into rows as `config` says, over `num_epochs` (None: forever)."""
    return packing.PackedRows(
        records,
        table,
        seed=config.seed,
        max_len=config.max_len,
        max_images=config.max_images_per_row,
        window=config.packing_window,
        num_epochs=num_epochs,
    )


def train_sequences(config: DataConfig, tokenizer: LoadedTokenizer, num_epochs: float) -> int:
    """Rows the train split gives in `num_epochs` epochs: its records (grouped: whole
    global batches of the records the length table keeps), or with `packing` the packed
    rows of those epochs (a fraction of an epoch counts that part of its rows)."""
    source = datasets.open_split(config, "train")
    if config.group_by_modality_length:  # each epoch is whole global batches
        batch = config.global_batch_size
        table = length_table(config, tokenizer, source, "train")
        usable = int(np.sum(table.drop_reasons == ""))
        return int(usable // batch * batch * num_epochs)
    if not config.packing:
        return int(len(source) * num_epochs)
    rows = packed_rows(
        config, grain.MapDataset.source(source), length_table(config, tokenizer, source, "train")
    )
    whole, part = divmod(num_epochs, 1)
    total = sum(len(rows.plan(epoch)) for epoch in range(int(whole)))
    if part:
        total += part * len(rows.plan(int(whole)))
    return int(total)


def make_dataset(
    config: DataConfig,
    tokenizer: LoadedTokenizer,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str = "train",
    source: Sequence | None = None,
) -> grain.IterDataset:
    """The per-example grain dataset of this process (before filtering/batching).

    ``source`` overrides the prepared TFDS split (any random-access sequence of stored
    record dicts).
    """
    process_index, process_count = _process_index_and_count(process_index, process_count)
    prepared = source is None
    if source is None:
        source = datasets.open_split(config, split)
    dataset = grain.MapDataset.source(source)
    encoder = ExampleEncoder(config, tokenizer)
    if config.packing or config.group_by_modality_length:
        table = length_table(config, tokenizer, source, split if prepared else None)
    if config.packing:
        dataset = packed_rows(config, dataset, table, config.num_epochs)
        encoder = RowEncoder(config, tokenizer)
    elif config.group_by_modality_length:
        # Planned over the records the table keeps; one dropped when read keeps its slot
        # (ExampleEncoder), so the batches stay LLaVA's mega-batches.
        dataset = packing.ModalityLengthOrder(
            dataset,
            table,
            batch_size=config.global_batch_size,
            seed=config.seed,
            num_epochs=config.num_epochs,
        )
    else:
        # shuffle before repeat: the epoch number is folded into the seed, so every epoch
        # is a different permutation
        dataset = dataset.shuffle(seed=config.seed).repeat(config.num_epochs)
    if config.global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by "
            f"{process_count} processes"
        )
    dataset = ProcessShare(
        dataset, config.global_batch_size // process_count, process_index, process_count
    )
    dataset = dataset.map(encoder)
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=0 if config.num_workers else 2, prefetch_buffer_size=16)
    )
    if config.num_workers > 0:
        # grain's workers read absl flags; outside an absl app nobody parsed them
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.num_workers,
                per_worker_buffer_size=config.worker_buffer_size,
            )
        )
    return iter_dataset


def make_train_iterator(
    config: DataConfig,
    tokenizer: LoadedTokenizer,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str = "train",
    source: Sequence | None = None,
) -> BatchIterator:
    """Batches of this process: ``global_batch_size // process_count`` examples each.

    ``it.get_state()`` / ``it.set_state(state)`` save and restore the position exactly.
    """
    process_index, process_count = _process_index_and_count(process_index, process_count)
    if source is None:
        source = datasets.open_split(config, split)
    dataset = make_dataset(config, tokenizer, process_index, process_count, split, source)
    return BatchIterator(
        iter(dataset),
        config.global_batch_size // process_count,
        records_per_pass=len(source) // process_count,
    )


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> Batch:
    """Each process's ``[B_local, ...]`` arrays -> the global `Batch` of
    ``[B_local * processes, ...]`` ``jax.Array``s, the leading axis split over the mesh's
    (data, fsdp) axes."""
    sharding = batch_sharding(mesh)
    return Batch.from_arrays(
        {
            key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()
        }
    )


@dataclasses.dataclass(frozen=True)
class EvalQuestion:
    """One assistant turn to answer by greedy decoding.

    ``prompt_ids int32[L]``: the conversation up to this answer (earlier reference answers
    included), image tokens expanded; ``images float32[I, H, W, 3]``, ``image_mask bool[I]``;
    ``answer``: the reference text. ``stop``: the template's end-of-answer string.
    LLaVA-NeXT: ``images float32[I, T, H, W, 3]`` (tiles) and ``image_layout int32[I, N]``.
    """

    record_id: str
    turn: int
    prompt_ids: np.ndarray
    images: np.ndarray
    image_mask: np.ndarray
    answer: str
    stop: str
    image_layout: np.ndarray | None = None


def make_eval_questions(
    config: DataConfig,
    tokenizer: LoadedTokenizer,
    split: str = "test",
    limit: int | None = None,
    source: Sequence | None = None,
) -> list[EvalQuestion]:
    """Every assistant turn of the first ``limit`` records of ``split`` as a question
    (records with unreadable images are left out, and logged)."""
    if source is None:
        source = datasets.open_split(config, split)
    encoder = ExampleEncoder(config, tokenizer)
    template = config.conversation_template
    questions = []
    # the TFDS source order is a fixed hash order, the same on every run
    for index in range(len(source) if limit is None else min(limit, len(source))):
        record = from_stored(source[index])
        layout, counts = None, None
        try:
            if config.anyres is not None:
                images, image_mask, layout, counts = encoder.anyres_images(record)
            else:
                images, image_mask = encoder.images(record)
        except DroppedExample as error:
            logging.warning("Eval record %s left out: %s", record.id, error)
            continue
        turns = skip_leading_answer(record.conversations)
        for turn in range(1, len(turns), 2):
            image_tokens = config.num_image_tokens
            if counts is not None:  # the images the prompt so far shows
                shown = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns[:turn])
                image_tokens = counts[:shown]
            questions.append(
                EvalQuestion(
                    record_id=record.id,
                    turn=turn,
                    prompt_ids=prompt_ids(turns[:turn], template, tokenizer, image_tokens),
                    images=images,
                    image_mask=image_mask,
                    answer=turns[turn]["value"],
                    stop=template.end,
                    image_layout=layout,
                )
            )
    return questions
