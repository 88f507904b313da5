"""Which conversations go together: sequence packing and LLaVA's modality-length grouping.

Both read one table per split, `LengthTable`: every record's token count after the
pipeline's own tokenization (truncation and drops included) and its image count. It is
computed once (one pass of the tokenizer over the split, no image decoded) and kept beside
the prepared shards as `.npz`, keyed by everything the count depends on.

- `PackedRows`: each epoch's shuffled stream (the same permutation as unpacked training)
  placed first-fit into rows of `max_len` tokens and `max_images_per_row` images, whole
  conversations only; a row is a random-access element, so grain's iterator state (an
  index) resumes it exactly, and `ProcessShare` splits rows like records: the global
  batches do not depend on the number of processes.
- `ModalityLengthOrder`: LLaVA's `get_modality_length_grouped_indices` per epoch: image and
  text-only conversations apart, shuffled, cut into mega-batches of one global batch, each
  sorted by length (longest first); mega-batches in a shuffled order; each modality's last
  mega-batch, mixed together, last; an epoch is whole global batches (drop_last). Only the
  records the table keeps are planned; one found bad only when read keeps its slot (an
  all-padding example, encode.ExampleEncoder), so no later batch shifts.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence

import grain
import numpy as np

EPOCHS_CACHED = 2  # plans kept in memory: the current epoch and the one before


@dataclasses.dataclass(frozen=True)
class LengthTable:
    """Per record of a split: `lengths int32[N]` tokens (0: the record is dropped before
    any image is read, e.g. too long for its image), `num_images int32[N]`, and
    `drop_reasons str[N]` ('' where kept)."""

    lengths: np.ndarray
    num_images: np.ndarray
    drop_reasons: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def dropped(self) -> collections.Counter:
        return collections.Counter(r for r in self.drop_reasons.tolist() if r)


def measure_lengths(
    source: Sequence,
    measure: Callable[[dict], tuple[int, int, str]],
    cache_path: str | None = None,
) -> LengthTable:
    """`measure(stored_record) -> (tokens, images, drop reason)` over `source`, read from
    (or saved to) `cache_path` when given."""
    if cache_path and os.path.exists(cache_path):
        with np.load(cache_path, allow_pickle=False) as saved:
            table = LengthTable(saved["lengths"], saved["num_images"], saved["drop_reasons"])
        if len(table) == len(source):
            return table
        logging.warning(
            "Length table %s has %d records, not %d: measuring again",
            cache_path,
            len(table),
            len(source),
        )
    from tqdm import tqdm

    count = len(source)
    lengths = np.zeros(count, np.int32)
    num_images = np.zeros(count, np.int32)
    reasons = []
    for index in tqdm(
        range(count), desc="conversation lengths", unit="rec", disable=count < 10_000
    ):
        lengths[index], num_images[index], reason = measure(source[index])
        reasons.append(reason)
    table = LengthTable(lengths, num_images, np.asarray(reasons, dtype="<U32"))
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        partial = f"{cache_path}.{os.getpid()}.tmp.npz"
        np.savez(partial, lengths=lengths, num_images=num_images, drop_reasons=table.drop_reasons)
        os.replace(partial, cache_path)  # atomic: processes may race to write it
    return table


def cache_key(*parts: object) -> str:
    """A short hash of what a length table depends on."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def first_fit(
    order: np.ndarray,
    table: LengthTable,
    max_len: int,
    max_images: int,
    window: int,
) -> list[np.ndarray]:
    """Rows of record indices: each record of `order` (dropped ones skipped) goes into the
    first of up to `window` open rows with room for its tokens and images, or opens a new
    row; when `window` rows are open, the oldest is closed first. Rows come out in the order
    they close (then the open ones, oldest first): deterministic, and the stream's order is
    kept within `window` rows.

    The open rows are kept oldest first, so the first fit is the first row with room; the
    arrays hold at most twice the rows open at once (never more than the records), and each
    record looks at the open rows only (config.data.packing_window bounds them)."""
    capacity = 2 * max(1, min(window, len(order)))
    space = np.zeros(capacity, np.int64)  # tokens left in each open row
    images = np.zeros(capacity, np.int64)
    members: list[list[int]] = [[] for _ in range(capacity)]
    head = tail = 0  # the open rows are [head, tail), oldest first
    rows: list[np.ndarray] = []
    for index in order.tolist():
        tokens, pictures = int(table.lengths[index]), int(table.num_images[index])
        if tokens == 0:
            continue
        if pictures > max_images:
            raise ValueError(
                f"a record has {pictures} images but config.data.max_images_per_row is {max_images}"
            )
        slot = -1
        if tail > head:
            fits = space[head:tail] >= tokens
            if pictures:
                fits &= images[head:tail] >= pictures
            first = int(fits.argmax())
            if fits[first]:
                slot = head + first  # the oldest row it fits: first fit
        if slot < 0:
            if tail - head == window:  # the oldest row closes
                rows.append(np.asarray(members[head], np.int64))
                head += 1
            if tail == capacity:  # move the open rows to the front
                count = tail - head
                space[:count], images[:count] = space[head:tail], images[head:tail]
                members[:count] = members[head:tail]
                head, tail = 0, count
            slot, tail = tail, tail + 1
            space[slot], images[slot], members[slot] = max_len, max_images, []
        members[slot].append(index)
        space[slot] -= tokens
        images[slot] -= pictures
    rows.extend(np.asarray(members[slot], np.int64) for slot in range(head, tail))
    return rows


def epoch_order(num_records: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s permutation of the records: grain's `shuffle(seed)`, the same one
    unpacked training reads (pipeline.make_dataset)."""
    shuffled = grain.MapDataset.range(num_records).shuffle(seed=seed)
    start = epoch * num_records
    return np.asarray([shuffled[start + i] for i in range(num_records)], np.int64)


class _PerEpoch(grain.MapDataset):
    """A MapDataset built epoch by epoch from a per-epoch plan (a list of elements), with
    `num_epochs` epochs (None: forever). Plans are computed on demand, in order, and only
    the counts of old ones are kept."""

    def __init__(self, parent: grain.MapDataset, num_epochs: int | None):
        super().__init__(parent)
        self._num_epochs = num_epochs
        self._ends: list[int] = []  # cumulative element counts of epochs planned so far
        self._plans: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.RLock()  # grain reads elements from several threads

    def plan(self, epoch: int) -> list:
        raise NotImplementedError

    def _cached_plan(self, epoch: int) -> list:
        with self._lock:
            if epoch not in self._plans:
                self._plans[epoch] = self.plan(epoch)
                while len(self._plans) > EPOCHS_CACHED:
                    self._plans.popitem(last=False)
            return self._plans[epoch]

    def _count_through(self, epoch: int) -> None:
        with self._lock:
            while len(self._ends) <= epoch:
                previous = self._ends[-1] if self._ends else 0
                self._ends.append(previous + len(self._cached_plan(len(self._ends))))

    def __len__(self) -> int:
        if self._num_epochs is None:
            return sys.maxsize
        self._count_through(self._num_epochs - 1)
        return self._ends[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, position within it) of element `index`."""
        epoch = 0
        while True:
            self._count_through(epoch)
            if index < self._ends[epoch]:
                start = self._ends[epoch - 1] if epoch else 0
                return epoch, index - start
            epoch += 1
            if self._num_epochs is not None and epoch >= self._num_epochs:
                raise IndexError(f"element {index} is past the last epoch")

    def __getstate__(self):  # sent to grain workers without the cached plans and lock
        state = dict(self.__dict__)
        state["_plans"] = collections.OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()


class PackedRows(_PerEpoch):
    """Element r: the stored records of packed row r, `{"records": [dict, ...]}`."""

    def __init__(
        self,
        parent: grain.MapDataset,
        table: LengthTable,
        *,
        seed: int,
        max_len: int,
        max_images: int,
        window: int,
        num_epochs: int | None,
    ):
        super().__init__(parent, num_epochs)
        self._table = table
        self._seed, self._max_len, self._max_images, self._window = (
            seed,
            max_len,
            max_images,
            window,
        )

    def plan(self, epoch: int) -> list[np.ndarray]:
        order = epoch_order(len(self._table), self._seed, epoch)
        return first_fit(order, self._table, self._max_len, self._max_images, self._window)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, row = self.locate(index)
        members = self._cached_plan(epoch)[row]
        return {"records": [self._parent[int(i)] for i in members]}

    def __str__(self) -> str:
        return (
            f"PackedRows(max_len {self._max_len}, {self._max_images} images, window {self._window})"
        )


def modality_length_order(table: LengthTable, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """LLaVA's modality-length grouped order of one epoch (see the module docstring):
    `int64[E]` record indices, `E` a multiple of `batch_size`.

    A record's length for sorting is its token count. The records the table drops
    (`drop_reasons != ''`: an empty answer, an image truncated, roles out of order) are left
    out before the mega-batches are cut, so those hold usable records only and the order is
    the one the usable records alone would give. A record found bad only when it is read (a
    corrupt image) is in the order: its slot stays, as padding, so no later batch shifts.
    """
    rng = np.random.default_rng([seed, epoch])
    has_image = table.num_images > 0
    # Left out here, not when read: a record dropped when read is refilled from the next
    # one of the stream, which would shift every later batch across mega-batch boundaries.
    usable = table.drop_reasons == ""
    groups, leftovers = [], []
    for modality in (np.flatnonzero(usable & has_image), np.flatnonzero(usable & ~has_image)):
        shuffled = rng.permutation(modality)
        megas = [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
        # As LLaVA: each modality's last mega-batch (full or not) joins the mixed leftovers.
        for mega in megas[:-1]:
            groups.append(mega[np.argsort(-table.lengths[mega], kind="stable")])
        if megas:
            leftovers.extend(megas[-1].tolist())
    order = [groups[i] for i in rng.permutation(len(groups))]
    if leftovers:
        order.append(np.asarray(sorted(leftovers), np.int64))
    order = np.concatenate(order) if order else np.zeros(0, np.int64)
    # Whole global batches only, so the next epoch's mega-batches start on a batch boundary
    # (a data loader's drop_last; the few left out are in the mixed tail, other ones each
    # epoch). Otherwise every batch of the next epoch would straddle two mega-batches.
    return order[: len(order) // batch_size * batch_size]


class ModalityLengthOrder(_PerEpoch):
    """The records of `parent` in `modality_length_order`, epoch after epoch."""

    def __init__(
        self,
        parent: grain.MapDataset,
        table: LengthTable,
        *,
        batch_size: int,
        seed: int,
        num_epochs: int | None,
    ):
        super().__init__(parent, num_epochs)
        self._table, self._batch_size, self._seed = table, batch_size, seed
        usable = int(np.sum(table.drop_reasons == ""))
        if usable < batch_size:  # every epoch would be empty: `locate` would search forever
            raise ValueError(
                f"{usable} usable records, fewer than one global batch ({batch_size}): "
                "group_by_modality_length gives no batch"
            )

    def plan(self, epoch: int) -> np.ndarray:
        return modality_length_order(self._table, self._batch_size, self._seed, epoch)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = self.locate(index)
        return self._parent[int(self._cached_plan(epoch)[position])]

    def __str__(self) -> str:
        return f"ModalityLengthOrder(mega-batches of {self._batch_size})"
