"""Pieces shared by the vision tower and the decoder.

Every parameter carries logical axis names from a small vocabulary (docs/design.md, Sharding):
`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`, `layers`; activations use
`batch`, `length`, `embed`. The rules that map them onto mesh axes live in the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llava_jax.models.attention import attend, cache_attention
from llava_jax.models.config import REMAT_POLICIES, LoraConfig, RopeConfig

Dtype = Any
Array = jax.Array

default_kernel_init = nn.initializers.normal(stddev=0.02)

# Named activations (`checkpoint_name`) that remat policies may keep, as maxtext names them:
# the q/k/v projections, the attention output before its projection ("context"), the
# output projection, the MLP's input projections ("mlpwi", gate and up) and its output.
SAVED_BY_POLICY: dict[str, tuple[str, ...]] = {
    "minimal": ("query_proj", "key_proj", "value_proj", "out_proj", "mlpwi", "mlpwo"),
    "minimal_with_context": (
        "query_proj",
        "key_proj",
        "value_proj",
        "context",
        "out_proj",
        "mlpwi",
        "mlpwo",
    ),
    "save_dot_with_context_except_mlp": (
        "query_proj",
        "key_proj",
        "value_proj",
        "context",
        "out_proj",
    ),
    "save_dot_except_mlpwi": ("query_proj", "key_proj", "value_proj", "out_proj", "mlpwo"),
    "save_dot_except_mlp": ("query_proj", "key_proj", "value_proj", "out_proj"),
    "save_qkv_proj": ("query_proj", "key_proj", "value_proj"),
    "save_out_proj": ("out_proj",),
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function that a transformers `hidden_act` string names."""
    table = {
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "relu": jax.nn.relu,
    }
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported (supported: {sorted(table)})")
    return table[name]


def remat_policy(name: str) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy a config name stands for; None means no remat at all."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {REMAT_POLICIES}")
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint_policies.save_only_these_names(*SAVED_BY_POLICY[name])


def matmul(x: Array, kernel: Array, num_contract: int = 1) -> Array:
    """`tensordot(x, kernel, num_contract)` computed as one 2-D matrix product.

    x: [*lead, *contracted]; kernel: [*contracted, *features] -> [*lead, *features]. The
    reshapes are free, and XLA:CPU runs the 2-D form and its gradients as plain GEMMs,
    where the 3-D form costs transposed copies (about 1.4x slower for a SwiGLU MLP).
    """
    lead = x.shape[: x.ndim - num_contract]
    features = kernel.shape[num_contract:]
    contracted = math.prod(kernel.shape[:num_contract])
    y = jnp.dot(x.reshape(-1, contracted), kernel.reshape(contracted, -1))
    return y.reshape(*lead, *features)


class Dense(nn.Module):
    """`y = x · kernel (+ bias)`, contracting the last `num_contract` axes of x with the
    leading axes of a kernel shaped `[*contracted, *features]` with logical `axes`.

    Unlike `nn.DenseGeneral`, the kernel is created in its final shape, so its logical
    sharding constraint holds when Flax re-applies it under a mesh.

    Applied to weight-only int8 parameters (`kernel_int8: int8[*contracted, *features]`,
    `scale: float32[*features]`, from models/quantize.py) instead of `kernel`, the int8
    weight is converted to the compute dtype inside the matmul and the output multiplied
    by the per-channel scale.

    Where `lora` adapts this layer's path (models/lora.py), it also holds
    `lora_a: [*contracted, rank]` and `lora_b: [rank, *features]` and adds
    `(alpha/rank) · (dropout(x) · lora_a) · lora_b`; dropout runs only when the caller
    passes a `dropout` rng (training), so inference needs no flag. The path decides where
    `init` creates the factors (and a missing factor there is an error); once they exist,
    a layer holding them runs them whatever its path: a block applied outside its tree
    (vit.py runs slices of the scanned stack through a free-standing block, whose paths
    lack `img/layers/`) still gets its adapters, without threading path prefixes through.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    num_contract: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        contracted = x.shape[x.ndim - self.num_contract :]
        shape = (*contracted, *self.features)
        if self.has_variable("params", "kernel_int8"):
            kernel = self.get_variable("params", "kernel_int8")
            scale = self.get_variable("params", "scale")
            if kernel.shape != shape or scale.shape != self.features:
                raise ValueError(
                    f"{self.name}: int8 kernel {kernel.shape} / scale {scale.shape} do not fit "
                    f"inputs contracting {contracted} into {self.features}"
                )
            y = matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.num_contract)
            y = y * scale.astype(self.dtype)
        else:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(default_kernel_init, self.axes),
                shape,
                self.param_dtype,
            )
            y = matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.num_contract)
        # By path (init, and a loud error if the factors are missing), or by the factors the
        # params hold: a free-standing block's paths lack their tree's prefix (vit.py).
        if self.lora is not None and (
            self.lora.adapts(self.path) or self.has_variable("params", "lora_a")
        ):
            y = y + self._low_rank(x, contracted)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(
                    nn.initializers.zeros, self.axes[-len(self.features) :]
                ),
                self.features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y

    def _low_rank(self, x: Array, contracted: tuple[int, ...]) -> Array:
        """`scale · (dropout(x) · lora_a) · lora_b`; the factors carry the kernel's logical
        names on their kernel-side axes (so they shard like it) and `lora_rank` on the rank
        (sharded over a mesh axis the other axis leaves free)."""
        lora = self.lora
        fan_in = math.prod(contracted)
        # PEFT's A: kaiming-uniform(a=sqrt(5)), i.e. uniform(±1/sqrt(fan_in)); B: zeros, so
        # a fresh adapter changes nothing.
        bound = 1 / math.sqrt(fan_in)

        def a_init(rng: Array, shape: tuple[int, ...], dtype: Dtype) -> Array:
            return jax.random.uniform(rng, shape, dtype, -bound, bound)

        lora_a = self.param(
            "lora_a",
            nn.with_logical_partitioning(a_init, (*self.axes[: self.num_contract], "lora_rank")),
            (*contracted, lora.rank),
            self.param_dtype,
        )
        lora_b = self.param(
            "lora_b",
            nn.with_logical_partitioning(
                nn.initializers.zeros, ("lora_rank", *self.axes[self.num_contract :])
            ),
            (lora.rank, *self.features),
            self.param_dtype,
        )
        if lora.dropout > 0 and self.has_rng("dropout"):
            x = nn.Dropout(lora.dropout, deterministic=False, name="lora_dropout")(x)
        h = matmul(x.astype(self.dtype), lora_a.astype(self.dtype), self.num_contract)
        out = matmul(h, lora_b.astype(self.dtype), 1)
        return out * jnp.asarray(lora.scale, self.dtype)


def dense(
    features: int | tuple[int, ...],
    axes: tuple[str | None, ...],
    *,
    name: str | None = None,
    num_contract: int = 1,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    lora: LoraConfig | None = None,
) -> Dense:
    """A `Dense` whose kernel carries logical `axes` (contracted axes, then output axes)."""
    return Dense(
        features=(features,) if isinstance(features, int) else tuple(features),
        axes=axes,
        num_contract=num_contract,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        lora=lora,
        name=name,
    )


def layer_norm(
    eps: float, *, name: str | None = None, dtype: Dtype, param_dtype: Dtype
) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class RMSNorm(nn.Module):
    """RMSNorm as LLaMA computes it: statistics in float32, scale applied in compute dtype."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


# --- rotary embeddings ----------------------------------------------------------------------


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """float32[head_dim // 2] inverse frequencies, with `linear` or `llama3` scaling."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (rope.theta**exponents)).astype(np.float32)
    if rope.type == "linear":
        return (inv_freq / rope.factor).astype(np.float32)
    if rope.type == "llama3":
        low_freq_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_freq_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    if rope.type != "default":
        raise ValueError(f"rope type {rope.type!r} is not supported")
    return inv_freq


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate `x: [B, T, H, D]` by `positions: int32[B, T]` (rotate-half convention)."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# --- attention ------------------------------------------------------------------------------


def update_kv_cache(
    cache: dict[str, Any], layer: Array | int, index: Array, k: Array, v: Array
) -> tuple[dict[str, Any], Array, Array]:
    """Write `k, v: [B, T, K, D]` into layer `layer` of the heads-major cache at token slot
    `index` and read the layer back -> (new cache, keys `[B, K, D, S]`, values
    `[B, K, S, D]`), the operands of `cache_attention`.

    `cache['k'|'v']` is either one stacked buffer `[L, B, K, D, S]` / `[L, B, K, S, D]`
    (scanned layers: `layer` may be traced) or a tuple of L per-layer buffers (unscanned:
    `layer` is a Python or numpy int). One `dynamic_update_slice` of T tokens per buffer
    (XLA updates it in place: the old buffer is not used afterwards); no `.at[].set`, no
    concatenation, nothing the size of the whole cache. Per layer, the attention's matmuls
    read the updated buffer itself; stacked, XLA:CPU materialises the layer's slice (a
    temporary of one layer's size). Neither needs a transposed copy.
    """
    index = jnp.asarray(index, jnp.int32)
    if index.ndim == 1:  # each row its own slot (a decode state of independent slots)
        return _update_kv_cache_per_row(cache, layer, index, k, v)
    new_cache, layers = {}, []
    zero = jnp.zeros((), jnp.int32)
    # The T new tokens (small) in the cache's layouts: keys [B, K, D, T], values [B, K, T, D].
    new = {"k": jnp.transpose(k, (0, 2, 3, 1)), "v": jnp.swapaxes(v, 1, 2)}
    starts = {"k": (zero, zero, zero, index), "v": (zero, zero, index, zero)}
    for name in ("k", "v"):
        buffers, value, start = cache[name], new[name], starts[name]
        if isinstance(buffers, (tuple, list)):
            if not isinstance(layer, (int, np.integer)):
                raise TypeError(f"a per-layer cache needs a static layer index, got {layer!r}")
            i = int(layer)
            buffer = jax.lax.dynamic_update_slice(buffers[i], value.astype(buffers[i].dtype), start)
            new_cache[name] = (*buffers[:i], buffer, *buffers[i + 1 :])
            layers.append(buffer)
            continue
        start = (jnp.asarray(layer, jnp.int32), *start)
        buffers = jax.lax.dynamic_update_slice(buffers, value[None].astype(buffers.dtype), start)
        new_cache[name] = buffers
        layers.append(jax.lax.dynamic_index_in_dim(buffers, layer, axis=0, keepdims=False))
    return new_cache, layers[0], layers[1]


def _update_kv_cache_per_row(
    cache: dict[str, Any], layer: Array | int, index: Array, k: Array, v: Array
) -> tuple[dict[str, Any], Array, Array]:
    """`update_kv_cache` with `index: int32[B]`, row b's T tokens written at its own slot
    `index[b]` (one `dynamic_update_slice` a row, batched: a scatter XLA does in place)."""
    new = {"k": jnp.transpose(k, (0, 2, 3, 1)), "v": jnp.swapaxes(v, 1, 2)}
    # Per row: keys [K, D, S] take [K, D, T] at (0, 0, i); values [K, S, D] at (0, i, 0).
    starts = {"k": lambda i: (0, 0, i), "v": lambda i: (0, i, 0)}
    new_cache, layers = {}, []
    for name in ("k", "v"):
        buffers, start = cache[name], starts[name]

        def write(row: Array, value: Array, i: Array, start=start) -> Array:
            return jax.lax.dynamic_update_slice(row, value.astype(row.dtype), start(i))

        rows = jax.vmap(write)
        if isinstance(buffers, (tuple, list)):
            if not isinstance(layer, (int, np.integer)):
                raise TypeError(f"a per-layer cache needs a static layer index, got {layer!r}")
            i = int(layer)
            buffer = rows(buffers[i], new[name], index)
            new_cache[name] = (*buffers[:i], buffer, *buffers[i + 1 :])
            layers.append(buffer)
            continue
        current = jax.lax.dynamic_index_in_dim(buffers, layer, axis=0, keepdims=False)
        buffer = rows(current, new[name], index)
        new_cache[name] = jax.lax.dynamic_update_index_in_dim(buffers, buffer, layer, axis=0)
        layers.append(buffer)
    return new_cache, layers[0], layers[1]


class Attention(nn.Module):
    """Multi-head self-attention with optional RoPE, GQA and a KV cache.

    Over a whole sequence, `segment_ids: int32[B, T]` (0 = padding) marks the tokens and the
    `implementation` (models/attention.py) computes it. With a cache (`{'k','v'}`, every
    layer's: stacked `[L, ...]` or a tuple of L buffers, see `update_kv_cache`),
    this is layer `cache_layer` (an int or int32[]): its new keys and values are written
    into its buffers at token slot `cache_index` with
    `dynamic_update_slice` (in place when the buffers are a donated argument or a loop
    carry: nothing else holds them), its slice is read back, and attention runs over it
    under `cache_mask: bool[B, T, S]` (`cache_attention`). Returns the output and the
    updated stacked cache.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    use_bias: bool = False  # biases on all four projections
    qkv_bias: bool = False  # biases on query, key and value only (Qwen2)
    rope: RopeConfig | None = None
    implementation: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        cache: dict[str, Array] | None = None,
        cache_index: Array | None = None,
        cache_mask: Array | None = None,
        cache_layer: Array | int = 0,
    ) -> tuple[Array, dict[str, Array] | None]:
        common = dict(
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora
        )
        qkv = {**common, "use_bias": self.use_bias or self.qkv_bias}
        q = dense(
            (self.num_heads, self.head_dim), ("embed", "heads", "head_dim"), name="query", **qkv
        )(x)
        kv_axes = ("embed", "kv_heads", "head_dim")
        k = dense((self.num_kv_heads, self.head_dim), kv_axes, name="key", **qkv)(x)
        v = dense((self.num_kv_heads, self.head_dim), kv_axes, name="value", **qkv)(x)
        q = checkpoint_name(q, "query_proj")
        k = checkpoint_name(k, "key_proj")
        v = checkpoint_name(v, "value_proj")
        if self.rope is not None:
            inv_freq = rope_inverse_frequencies(self.rope, self.head_dim)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
        new_cache = None
        if cache is not None:
            new_cache, k, v = update_kv_cache(cache, cache_layer, cache_index, k, v)
            out = cache_attention(q, k.astype(self.dtype), v.astype(self.dtype), cache_mask)
        else:
            with jax.named_scope("attention"):
                out = attend(
                    q,
                    k,
                    v,
                    implementation=self.implementation,
                    causal=self.causal,
                    segment_ids=segment_ids,
                )
        out = checkpoint_name(out, "context")
        out = dense(
            x.shape[-1], ("heads", "head_dim", "embed"), num_contract=2, name="out", **common
        )(out)
        return checkpoint_name(out, "out_proj"), new_cache


# --- stacks of layers -----------------------------------------------------------------------


def make_layer_stack(
    block: type[nn.Module],
    *,
    num_layers: int,
    scan: bool,
    remat: str,
    num_broadcast: int,
    **block_kwargs: Any,
) -> nn.Module | list[nn.Module]:
    """`num_layers` blocks, to assign to `self.layers` in a `setup`; run with `run_layer_stack`.

    Scanned, they are one module whose parameters get a leading `layers` axis; unscanned, a
    list that Linen names `layers_0 … layers_{n-1}`. Each block maps
    `(x, per_layer, *broadcast) -> (x, y)`.
    """
    policy = remat_policy(remat)
    if policy is not None:
        block = nn.remat(block, policy=policy, prevent_cse=not scan)
    if scan:
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0,) + (nn.broadcast,) * num_broadcast,
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return scanned(**block_kwargs)
    return [block(**block_kwargs) for _ in range(num_layers)]


def run_layer_stack(
    stack: nn.Module | list[nn.Module], x: Array, per_layer: Any, *broadcast: Any
) -> tuple[Array, Any]:
    """Run the blocks in order; returns the final x and the per-layer ys stacked on axis 0.

    `per_layer` is a tree with a leading layer axis (or None), sliced one layer per block.
    """
    if not isinstance(stack, (list, tuple)):
        return stack(x, per_layer, *broadcast)
    ys = []
    for i, layer in enumerate(stack):
        x, y = layer(x, jax.tree.map(lambda a, i=i: a[i], per_layer), *broadcast)
        ys.append(y)
    return x, jax.tree.map(lambda *leaves: jnp.stack(leaves), *ys)


def stack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Turn `layers_0 … layers_{n-1}` subtrees into one `layers` subtree (scan layout)."""
    params = dict(params)
    per_layer = [params.pop(f"layers_{i}") for i in range(num_layers)]
    params["layers"] = jax.tree.map(lambda *leaves: np.stack(leaves), *per_layer)
    return params


def unstack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Inverse of `stack_layers`: split the leading layer axis into `layers_{i}` subtrees."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    return params
