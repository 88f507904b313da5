"""How many decode slots of how many tokens a KV cache budget holds (the slot server's
admission by memory, `--kv-cache-gib`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.sharding import Mesh

from llava_jax.hardware import GIB, chip_for
from llava_jax.models.config import ModelConfig
from llava_jax.sharding import data_parallel_size

SLOT_LENGTH_MULTIPLE = 16  # a cache length from a budget is rounded down to this


def kv_bytes_per_token(config: ModelConfig, cache_dtype: Any) -> int:
    """Bytes of keys and values one token takes in the cache: every layer's."""
    text = config.text
    itemsize = np.dtype(cache_dtype).itemsize
    return 2 * text.num_layers * text.num_kv_heads * text.resolved_head_dim * itemsize


def default_kv_cache_bytes(device: Any, params_bytes: int) -> int:
    """What the KV cache may take on `device` when not told: half of its memory left beside
    the parameters, or 2 GiB where its memory is not known (a CPU)."""
    memory = chip_for(device).hbm_bytes
    if memory is None:
        return 2 * GIB
    return max((memory - params_bytes) // 2, 0)


def kv_split(config: ModelConfig, mesh: Mesh | None) -> tuple[int, int]:
    """How a mesh splits the decode slots' KV cache: (slots over the data axes, kv heads
    over `tensor`, where they divide; else each device holds every head)."""
    if mesh is None:
        return 1, 1
    tensor = mesh.shape["tensor"]
    return data_parallel_size(mesh), tensor if config.text.num_kv_heads % tensor == 0 else 1


def slot_layout(
    per_token: int,
    budget: int,
    max_slots: int,
    cache_length: int,
    context: int,
    slot_multiple: int = 1,
) -> tuple[int, int]:
    """`(slots, cache length)` whose KV cache fits `budget` bytes: with a `cache_length`,
    as many slots as fit, at most `max_slots`; without (0), `max_slots` slots of the longest
    length that fits, at most the model's `context`; slots a multiple of `slot_multiple`
    (a mesh's data-parallel size). Raises ValueError naming the budget when not even
    `slot_multiple` slots of the length fit."""
    if cache_length:
        length = cache_length
    else:
        fits = min(context, budget // (per_token * max_slots))
        length = fits // SLOT_LENGTH_MULTIPLE * SLOT_LENGTH_MULTIPLE
    slots = min(max_slots, budget // (per_token * length)) if length > 0 else 0
    slots = slots // slot_multiple * slot_multiple
    if slots < 1:
        wanted = cache_length or SLOT_LENGTH_MULTIPLE
        count = "one slot" if slot_multiple == 1 else f"{slot_multiple} slots (one a data shard)"
        raise ValueError(
            f"a KV cache budget of {budget} bytes does not hold {count} of {wanted} tokens "
            f"({per_token} bytes a token)"
        )
    return slots, length
