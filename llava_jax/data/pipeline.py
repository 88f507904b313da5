"""The grain input pipeline: prepared records -> fixed-shape batches -> global arrays.

Per JAX process: its disjoint shard of the split (``records[process_index::count]``),
shuffled per epoch from ``seed``, decoded and preprocessed in worker processes
(``mp_prefetch``), then filtered and batched in the main process so every dropped
sample is counted. The iterator's state (``get_state``/``set_state``, JSON-serialisable)
restores the exact next batches; it is a ``grain.DatasetIterator``, so
``grain.checkpoint.CheckpointSave/Restore`` checkpoint it with Orbax.

A batch (``B`` = global batch / process count, ``T`` = max_len, ``I`` = max images):

- ``input_ids int32[B, T]``: right-padded with the pad id; each ``<image>`` expanded to
  its image's tokens (copies of the image token id)
- ``loss_mask float32[B, T]``: 1 on assistant answer tokens and their end token
- ``attention_mask int32[B, T]``: the segment of each token, 0 on padding: 1 on every real
  token of an unpacked row; with ``packing``, 1, 2, ... for the conversations of a row
- ``positions int32[B, T]``: each token's position in its conversation (RoPE)
- ``images float32[B, I, T, H, W, 3]``: each image's tiles, normalised (data/image_tiles.py:
  a square image is one tile); unused slots are zeros
- ``image_mask bool[B, I]``: valid images first
- ``image_layout int32[B, I, N]``: each image token's feature (``ImageGeometry``); a tiled
  (LLaVA-NeXT) image's token count depends on its size

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
from llava_jax.data.datasets.record import from_stored
from llava_jax.data.encode import ExampleEncoder, RowEncoder
from llava_jax.data.tokenizer import LoadedTokenizer, load_tokenizer, tokenizer_fingerprint
from llava_jax.models.inputs import Batch, ImageGeometry
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
    geometry: ImageGeometry,
    tokenizer: LoadedTokenizer,
    source: Sequence,
    split: str | None = None,
) -> packing.LengthTable:
    """Every record's token and image counts (data/packing.py), measured with this
    pipeline's tokenization; kept beside the prepared `split` when one is named (a given
    in-memory source is measured each time)."""
    encoder = ExampleEncoder(config, geometry, tokenizer)
    cache_path = None
    if split is not None:
        key = packing.cache_key(
            tokenizer_fingerprint(tokenizer.tokenizer),
            tokenizer.image_token_id,
            config.template,
            config.template_version,
            config.max_len,
            config.max_images_per_sample,
            len(source),
            dataclasses.astuple(geometry),  # the image token counts follow it
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


def train_sequences(
    config: DataConfig, geometry: ImageGeometry, tokenizer: LoadedTokenizer, num_epochs: float
) -> int:
    """Rows the train split gives in `num_epochs` epochs: its records (grouped: whole
    global batches of the records the length table keeps), or with `packing` the packed
    rows of those epochs (a fraction of an epoch counts that part of its rows)."""
    source = datasets.open_split(config, "train")
    if config.group_by_modality_length:  # each epoch is whole global batches
        batch = config.global_batch_size
        table = length_table(config, geometry, tokenizer, source, "train")
        usable = int(np.sum(table.drop_reasons == ""))
        return int(usable // batch * batch * num_epochs)
    if not config.packing:
        return int(len(source) * num_epochs)
    rows = packed_rows(
        config,
        grain.MapDataset.source(source),
        length_table(config, geometry, tokenizer, source, "train"),
    )
    whole, part = divmod(num_epochs, 1)
    total = sum(len(rows.plan(epoch)) for epoch in range(int(whole)))
    if part:
        total += part * len(rows.plan(int(whole)))
    return int(total)


def make_dataset(
    config: DataConfig,
    geometry: ImageGeometry,
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
    encoder = ExampleEncoder(config, geometry, tokenizer)
    if config.packing or config.group_by_modality_length:
        table = length_table(config, geometry, tokenizer, source, split if prepared else None)
    if config.packing:
        dataset = packed_rows(config, dataset, table, config.passes)
        encoder = RowEncoder(config, geometry, tokenizer)
    elif config.group_by_modality_length:
        # Planned over the records the table keeps; one dropped when read keeps its slot
        # (ExampleEncoder), so the batches stay LLaVA's mega-batches.
        dataset = packing.ModalityLengthOrder(
            dataset,
            table,
            batch_size=config.global_batch_size,
            seed=config.seed,
            num_epochs=config.passes,
        )
    else:
        # shuffle before repeat: the epoch number is folded into the seed, so every epoch
        # is a different permutation
        dataset = dataset.shuffle(seed=config.seed).repeat(config.passes)
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
    geometry: ImageGeometry,
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
    dataset = make_dataset(config, geometry, tokenizer, process_index, process_count, split, source)
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
