"""Weight-only int8 for inference: the decoder's dense layers, per output channel.

`quantize_params(config, params)` replaces the `kernel` of each attention projection
(`attn/{query,key,value,out}`) and MLP projection (`gate`, `up`, `down`) of every LLaMA
decoder layer by

    {"kernel_int8": int8[*contracted, *features], "scale": float32[*features]}

(with the leading `layers` axis when the layers are scanned), symmetric per output channel:
`scale = max|kernel| over the contracted axes / 127`, `kernel_int8 = round(kernel / scale)`.
`Dense` (models/layers.py) reads either form: with `kernel_int8` it converts the int8 weight
to the compute dtype inside the matmul and multiplies the output by `scale`. Biases, the
embedding, norms, the LM head, the projector and the vision tower stay as they were.

Those layers' parameters take 1 byte per weight plus 4 per output channel: about 1/4 of
float32 and 1/2 of bfloat16. `quantize_abstract` does the same to the boxed abstract tree
(`nn.Partitioned` leaves from `llava.abstract_params`), so the quantized tree has logical
axes and shardings: `kernel_int8` keeps the kernel's names, `scale` its output axes' names.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models.config import ModelConfig

QUANTIZE_MODES = ("none", "int8")
INT8_MAX = 127
Array = jax.Array

# The decoder layer's dense layers, by their path inside a layer, with how many leading
# kernel axes they contract (the attention output contracts heads and head_dim).
DECODER_DENSE: dict[tuple[str, ...], int] = {
    ("attn", "query"): 1,
    ("attn", "key"): 1,
    ("attn", "value"): 1,
    ("attn", "out"): 2,
    ("gate",): 1,
    ("up",): 1,
    ("down",): 1,
}


def check_mode(mode: str | None) -> str | None:
    """`None`/"none" -> None; "int8" -> "int8"; anything else: ValueError naming the choices."""
    if mode is None or mode == "none":
        return None
    if mode not in QUANTIZE_MODES:
        raise ValueError(
            f"unknown quantization {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}"
        )
    return mode


def quantize_kernel(kernel: Any, num_contract: int, num_leading: int = 0) -> tuple[Array, Array]:
    """`kernel: [*leading, *contracted, *features]` -> (int8 kernel, float32 scale
    `[*leading, *features]`): symmetric, per output channel, absmax / 127 (an all-zero
    channel gets scale 1, so it stays exactly zero)."""
    kernel = jnp.asarray(kernel, jnp.float32)
    axes = tuple(range(num_leading, num_leading + num_contract))
    absmax = jnp.max(jnp.abs(kernel), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(kernel / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis=axes)


def _layer_trees(llm: dict) -> list[tuple[str, int]]:
    """(key, leading axes) of each decoder layer subtree: `layers` (scanned) or `layers_i`."""
    if "layers" in llm:
        return [("layers", 1)]
    found = [key for key in llm if key.startswith("layers_") and key[7:].isdigit()]
    return [(key, 0) for key in sorted(found, key=lambda k: int(k[7:]))]


def _map_decoder_dense(config: ModelConfig, params: dict, fn) -> dict:
    """A copy of `params` with `fn(node, num_contract, num_leading)` applied to each decoder
    dense layer's node (`{"kernel", ["bias"]}`)."""
    del config  # the tree says which layout it has
    if "llm" not in params:
        raise ValueError("quantize: the parameter tree has no 'llm' (decoder) tower")
    out = dict(params)
    llm = dict(out["llm"])
    layer_trees = _layer_trees(llm)
    if not layer_trees:
        raise ValueError("quantize: the decoder has no layers ('llm/layers' or 'llm/layers_0')")
    for key, leading in layer_trees:
        layer = _copy_dicts(llm[key])
        for path, num_contract in DECODER_DENSE.items():
            parent = layer
            for name in path[:-1]:
                parent = parent[name]
            parent[path[-1]] = fn(dict(parent[path[-1]]), num_contract, leading)
        llm[key] = layer
    out["llm"] = llm
    return out


def _copy_dicts(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    return tree


def quantize_params(config: ModelConfig, params: dict) -> dict:
    """`params` with the decoder's dense kernels in int8 (see the module docstring).

    Works on host or device arrays, unscanned or scanned, and under `jax.jit` (give the
    result `out_shardings` from `quantize_abstract` to place it on a mesh). A tree that is
    already quantized is returned as it is.
    """

    def one(node: dict, num_contract: int, leading: int) -> dict:
        if "kernel_int8" in node:
            return node
        q, scale = quantize_kernel(node.pop("kernel"), num_contract, leading)
        return {"kernel_int8": q, "scale": scale, **node}

    return _map_decoder_dense(config, params, one)


def quantize_abstract(config: ModelConfig, boxed: dict) -> dict:
    """The boxed abstract tree (`nn.Partitioned` of `ShapeDtypeStruct`s, as
    `llava.abstract_params` gives) of `quantize_params(config, params)`: `kernel_int8` keeps
    the kernel's logical names, `scale` takes the leading and output axes' names."""

    def one(node: dict, num_contract: int, leading: int) -> dict:
        if "kernel_int8" in node:  # already int8 (a LoRA model's int8 base)
            return node
        return quantize_abstract_node(node, num_contract, leading)

    return _map_decoder_dense(config, boxed, one)


def quantize_abstract_node(node: dict, num_contract: int, leading: int) -> dict:
    """A boxed dense node `{"kernel", …}` -> `{"kernel_int8", "scale", …}` as
    `quantize_kernel` would make them: the int8 kernel keeps the kernel's logical names,
    the scale takes the leading and output axes' names."""
    node = dict(node)
    box = node.pop("kernel")
    value, names = box.value, tuple(box.names)
    kept = list(range(leading)) + list(range(leading + num_contract, len(value.shape)))
    q = box.replace(value=jax.ShapeDtypeStruct(value.shape, jnp.int8))
    scale = box.replace(
        value=jax.ShapeDtypeStruct(tuple(value.shape[i] for i in kept), jnp.float32),
        names=tuple(names[i] for i in kept),
    )
    return {"kernel_int8": q, "scale": scale, **node}


def is_quantized(params: dict) -> bool:
    """Whether any decoder dense layer of `params` holds an int8 kernel."""
    return any(
        path and getattr(path[-1], "key", None) == "kernel_int8"
        for path, _ in jax.tree_util.tree_flatten_with_path(params.get("llm", {}))[0]
    )


def nbytes(tree: Any) -> int:
    """Bytes of the arrays (or `ShapeDtypeStruct`s) of a tree."""
    leaves = jax.tree.leaves(nn.meta.unbox(tree))
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in leaves))


def decoder_dense_bytes(params: dict) -> int:
    """Bytes of the decoder's attention and MLP projections (kernels or int8 kernels and
    scales, biases included): the part `quantize_params` changes."""
    total = 0

    def count(node: dict, num_contract: int, leading: int) -> dict:
        nonlocal total
        total += nbytes(node)
        return node

    _map_decoder_dense(None, params, count)
    return total
