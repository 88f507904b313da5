"""Reading and writing safetensors checkpoints with numpy: one file or an indexed set of shards.

No torch, no pickle. bfloat16 tensors come back as `ml_dtypes.bfloat16` numpy arrays.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.bin",
    "model.pt",
    "model.pth",
    "model.ckpt",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and the key."""


def open_safetensors(path: str):
    """`safe_open(path)` for numpy. A file that is not a whole safetensors file (cut short by
    a download or a copy, or something else saved under that name) raises `CheckpointError`
    naming it, its size and what to do."""
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as err:
        size = os.path.getsize(path)
        raise CheckpointError(
            f"{path} ({size} bytes) is truncated or damaged: not a whole safetensors file "
            f"({err}); download it again, or export it again from where it came from"
        ) from None


class SafetensorsReader(Mapping[str, np.ndarray]):
    """Lazy mapping from tensor name to numpy array over a directory's safetensors files."""

    def __init__(self, directory: str):
        self.directory = directory
        self._file_of = _weight_map(directory)
        self._handles: dict[str, object] = {}

    def _handle(self, key: str):
        filename = self._file_of[key]
        if filename not in self._handles:
            self._handles[filename] = open_safetensors(os.path.join(self.directory, filename))
        return self._handles[filename]

    def __getitem__(self, key: str) -> np.ndarray:
        return self._handle(key).get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def _weight_map(directory: str) -> dict[str, str]:
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no 'weight_map' object")
        for filename in sorted(set(weight_map.values())):
            if not os.path.exists(os.path.join(directory, filename)):
                raise CheckpointError(f"{index_path} names shard {filename!r}, which is missing")
        return weight_map
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.exists(single):
        with open_safetensors(single) as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    pickled = [
        name
        for name in os.listdir(directory)
        if name in PICKLE_FILES or name.endswith((".bin", ".pt", ".pth", ".ckpt"))
    ]
    if pickled:
        raise CheckpointError(
            f"{directory} holds a pickle checkpoint ({', '.join(sorted(pickled))}); llava_jax "
            "never unpickles weights. Convert it once to safetensors where you trust the file, "
            'e.g. python -c "import torch; from safetensors.torch import save_file; '
            f"save_file(torch.load('{os.path.join(directory, sorted(pickled)[0])}', "
            f"weights_only=True), '{single}')\""
        )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def write_safetensors(
    tensors: dict[str, np.ndarray], directory: str, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Write `tensors` as one file, or as shards plus an index when larger than a shard.

    Weights files of an earlier export in `directory` (`model.safetensors`, an index,
    `model-NNNNN-of-NNNNN.safetensors` shards) that this one does not write are removed
    afterwards: a stale index or shard would otherwise be read instead of, or beside, the
    new weights.
    """
    os.makedirs(directory, exist_ok=True)
    written = _write_safetensors(tensors, directory, max_shard_bytes)
    keep = set(written) | ({INDEX_FILE} if len(written) > 1 else set())
    for name in os.listdir(directory):
        stale = name in (SINGLE_FILE, INDEX_FILE) or SHARD_PATTERN.fullmatch(name)
        if stale and name not in keep:
            os.remove(os.path.join(directory, name))
    return written


def _write_safetensors(
    tensors: dict[str, np.ndarray], directory: str, max_shard_bytes: int
) -> list[str]:
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for key in sorted(tensors):
        size = tensors[key].nbytes
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = np.ascontiguousarray(tensors[key])
        shard_bytes += size
    metadata = {"format": "pt"}  # transformers requires this tag to load safetensors
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE_FILE), metadata=metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(directory, name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
