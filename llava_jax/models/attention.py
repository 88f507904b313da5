"""Attention implementations behind one switch, `ModelConfig.attention`.

All take `q: [B, T, H, D]`, `k, v: [B, S, K, D]` (H a multiple of K: query head h reads KV
head h // (H/K)) and return `[B, T, H, D]`; the softmax runs in float32.

  xla          the reference: grouped einsums over a dense mask
  chunked      the same arithmetic in query blocks; a causal block skips the keys after it
               (about half the work at long lengths; the fastest on CPU)
  dot_product  `jax.nn.dot_product_attention` (XLA)
  cudnn        `jax.nn.dot_product_attention(implementation="cudnn")`: GPU, bf16/fp16,
               right-padded batches (its padding is given as sequence lengths; no packing)
  splash       Pallas splash attention: TPU (interpret mode elsewhere, for tests); padding
               and packed sequences as segment ids
  auto         splash on TPU, cudnn on GPU in bf16/fp16, chunked otherwise

Kernels apply to a whole sequence at once (training, evaluation, the vision tower). A step
over a KV cache (prefill, decoding) always runs `xla`, whose dense mask knows each query's
slot in the cache. Padded query rows are not specified: implementations may give them
different values, and nothing reads them (their keys are masked for every real query and
their loss weight is 0).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from llava_jax.models.config import ATTENTION_IMPLEMENTATIONS

Array = jax.Array

CHUNK = 128  # query block of `chunked`, and splash's block size
_NEG = float(np.finfo(np.float32).min)


def resolve(name: str, platform: str, dtype: Any) -> str:
    """The implementation `name` stands for on `platform` (`auto` chooses one)."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={name!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if name != "auto":
        return name
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "chunked"


def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    implementation: str,
    causal: bool,
    segment_ids: Array | None = None,
) -> Array:
    """Self-attention over a whole sequence (T == S), with the implementation resolved for
    the platform compiled for. segment_ids: int32[B, T], 0 = padding (None: no padding);
    several segments in a row (packed sequences) never attend to each other, except under
    `cudnn`, which takes only each row's length (the trainer refuses packing with it)."""
    platform = target_platform()
    name = resolve(implementation, platform, q.dtype)
    if name == "splash":
        return splash_attention(
            q, k, v, causal=causal, segment_ids=segment_ids, interpret=platform != "tpu"
        )
    if name == "cudnn":
        if platform != "gpu":
            raise ValueError(
                f"attention='cudnn' runs on a GPU; this program is for {platform!r} "
                "(attention='auto' picks the best implementation for the platform)"
            )
        lengths = None
        if segment_ids is not None:
            # at least 1: an all-padding row (a grouped batch's slot for a record found bad
            # when read) has length 0, which cuDNN reports as an error or NaNs
            lengths = jnp.maximum(jnp.sum(segment_ids > 0, axis=1), 1)
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            is_causal=causal,
            query_seq_lengths=lengths,
            key_value_seq_lengths=lengths,
            implementation="cudnn",
        )
    mask = self_attention_mask(q.shape[1], causal, segment_ids)
    if name == "dot_product":
        return jax.nn.dot_product_attention(
            q, k, v, mask=None if mask is None else mask[:, None], implementation="xla"
        )
    if name == "chunked":
        return chunked_attention(q, k, v, mask, causal=causal)
    return reference_attention(q, k, v, mask)


def target_platform() -> str:
    """The platform being compiled for: the current mesh's devices (which may be a TPU
    topology compiled ahead of time on a CPU machine), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def self_attention_mask(length: int, causal: bool, segment_ids: Array | None) -> Array | None:
    """bool[B or 1, T, T]: causal (if asked), and a query sees only keys of its own segment,
    never a padded one (segment 0); None when nothing is masked."""
    mask = None
    if causal:
        positions = jnp.arange(length)
        mask = (positions[None, :] <= positions[:, None])[None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        visible = same & (segment_ids > 0)[:, None, :]
        mask = visible if mask is None else mask & visible
    return mask


def reference_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """Grouped-query attention with float32 softmax; mask: bool[B, T, S], True = may attend."""
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    grouped = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32
    ) / np.float32(math.sqrt(head_dim))
    if mask is not None:
        scores = jnp.where(mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, length, num_heads, head_dim)


def cache_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """`reference_attention` over a heads-major KV cache as `init_cache` stores it:
    `q: [B, T, H, D]`, keys transposed `k: [B, K, D, S]`, values `v: [B, K, S, D]`,
    `mask: bool[B, T, S]` -> `[B, T, H, D]`.

    The queries of one KV head's group (and all T positions) are stacked, so both matmuls
    are plain `[M, D] x [D, S]` and `[M, S] x [S, D]` products batched over (B, K), reading
    the cache in its layout: nothing the size of the cache is transposed or copied (only q
    and the output, T tokens, move). Decode (T = 1) is `[B, K, G, D] x [B, K, D, S]`. (On
    XLA:CPU, a `[M, D] x [S, D]^T` form of the scores, keys stored `[B, K, S, D]`, ran
    6-8x slower than this.)
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads, slots = k.shape[1], k.shape[3]
    group = num_heads // num_kv_heads
    qh = q.reshape(batch, length, num_kv_heads, group, head_dim)
    if length > 1:
        qh = jnp.transpose(qh, (0, 2, 3, 1, 4))  # [B, K, G, T, D]
    qh = qh.reshape(batch, num_kv_heads, group * length, head_dim)
    scores = jnp.einsum("bkqd,bkds->bkqs", qh, k, preferred_element_type=jnp.float32)
    scores = scores * np.float32(1.0 / math.sqrt(head_dim))
    if mask is not None:
        scores = scores.reshape(batch, num_kv_heads, group, length, slots)
        scores = jnp.where(mask[:, None, None], scores, _NEG)
        scores = scores.reshape(batch, num_kv_heads, group * length, slots)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)  # [B, K, G*T, D]
    out = out.reshape(batch, num_kv_heads, group, length, head_dim)
    if length > 1:
        out = jnp.transpose(out, (0, 3, 1, 2, 4))
    return out.reshape(batch, length, num_heads, head_dim)


def chunked_attention(
    q: Array, k: Array, v: Array, mask: Array | None, *, causal: bool, chunk: int = CHUNK
) -> Array:
    """`reference_attention` computed per block of `chunk` queries, heads-major.

    Under a causal mask, the block of queries [i*c, (i+1)*c) needs only keys [0, (i+1)*c):
    the blocks above the diagonal, whose scores are all masked, are never computed.
    Queries of one KV head's group are stacked, so each block is one batched matmul.
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    qh = jnp.transpose(q.reshape(batch, length, num_kv_heads, group, head_dim), (0, 2, 3, 1, 4))
    kh = jnp.transpose(k, (0, 2, 1, 3))  # [B, K, S, D]
    vh = jnp.transpose(v, (0, 2, 1, 3))
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, length, k.shape[1]))
    starts = list(range(0, length, chunk)) if causal else [0]
    outputs = []
    for start in starts:
        end = min(start + chunk, length) if causal else length
        keys = end if causal else k.shape[1]
        block = end - start
        q_block = qh[:, :, :, start:end].reshape(batch, num_kv_heads, group * block, head_dim)
        scores = jnp.einsum(
            "bkqd,bksd->bkqs", q_block, kh[:, :, :keys], preferred_element_type=jnp.float32
        )
        scores = scores.reshape(batch, num_kv_heads, group, block, keys) * scale
        if mask is not None:
            scores = jnp.where(mask[:, None, None, start:end, :keys], scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        probs = probs.reshape(batch, num_kv_heads, group * block, keys)
        out = jnp.einsum("bkqs,bksd->bkqd", probs, vh[:, :, :keys])
        outputs.append(out.reshape(batch, num_kv_heads, group, block, head_dim))
    out = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=3)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, length, num_heads, head_dim)


def splash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool,
    segment_ids: Array | None,
    interpret: bool = False,
) -> Array:
    """Pallas splash attention: the TPU kernel, or `interpret` it (any backend, slowly).

    The sequence is padded to a multiple of the 128-token block with segment id 0. Under a
    mesh, the kernel runs per shard (`shard_map`): batch over (data, fsdp), heads over
    tensor where both head counts divide.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as mask_lib,
    )

    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    padded = -(-length // CHUNK) * CHUNK
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    # Heads-major, as the kernel takes them; the scale goes on q (the kernel has none).
    qh = jnp.transpose(q * np.float32(1.0 / math.sqrt(head_dim)).astype(q.dtype), (0, 2, 1, 3))
    kh, vh = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
    if padded != length:
        pad = ((0, 0), (0, 0), (0, padded - length), (0, 0))
        qh, kh, vh = (jnp.pad(x, pad) for x in (qh, kh, vh))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - length)))

    def per_shard(qh: Array, kh: Array, vh: Array, segment_ids: Array) -> Array:
        heads = qh.shape[1]
        shape = (padded, padded)
        one = mask_lib.CausalMask(shape) if causal else mask_lib.FullMask(shape)
        kernel = kernel_lib.make_splash_mha(
            mask_lib.MultiHeadMask([one] * heads),
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )
        segments = kernel_lib.SegmentIds(q=segment_ids, kv=segment_ids)
        return jax.vmap(kernel)(qh, kh, vh, segment_ids=segments)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        out = per_shard(qh, kh, vh, segment_ids)
    else:
        batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape)
        batch_spec = (
            batch_axes if batch % math.prod(mesh.shape[a] for a in batch_axes) == 0 else None
        )
        tensor = mesh.shape.get("tensor", 1)
        heads_spec = "tensor" if num_heads % tensor == 0 and num_kv_heads % tensor == 0 else None
        spec = P(batch_spec, heads_spec, None, None)
        out = jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(spec, spec, spec, P(batch_spec, None)),
            out_specs=spec,
            check_vma=False,
        )(qh, kh, vh, segment_ids)
    return jnp.transpose(out[:, :, :length], (0, 2, 1, 3))
