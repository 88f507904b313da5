"""LoRA on the parameter tree: the frozen base's storage, merging, and where adapters live.

`Dense` (models/layers.py) creates and applies the factors; this module works on whole
trees. An adapted layer is a node holding `lora_a: [*leading, *contracted, rank]` and
`lora_b: [*leading, rank, *features]` beside its base, `kernel: [*leading, *contracted,
*features]` or (`lora.base_dtype=int8`) `kernel_int8` + `scale: float32[*leading,
*features]`; `leading` is the `layers` axis of a scanned stack (0 or 1 axes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models.config import LoraConfig, ModelConfig
from llava_jax.models.quantize import quantize_abstract_node, quantize_kernel

LORA_FACTORS = ("lora_a", "lora_b")
Params = dict[str, Any]


def is_lora_factor(path: tuple[str, ...]) -> bool:
    return bool(path) and path[-1] in LORA_FACTORS


@dataclasses.dataclass(frozen=True)
class AdaptedLayer:
    """Where an adapted dense layer sits and how its kernel is laid out."""

    path: tuple[str, ...]  # e.g. ("llm", "layers", "attn", "query")
    num_leading: int  # 1 in a scanned stack (the `layers` axis), else 0
    num_contract: int  # input axes of the kernel (2 for the attention output)

    @property
    def module_path(self) -> str:
        return "/".join(self.path)


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "value", leaf).shape)


def adapted_layers(params: Params) -> Iterator[tuple[AdaptedLayer, dict]]:
    """Every node with LoRA factors, in tree order, with its layout."""

    def walk(node: Any, path: tuple[str, ...]):
        if not isinstance(node, dict):
            return
        if "lora_a" in node:
            yield _layer(path, node), node
            return
        for key, child in node.items():
            yield from walk(child, (*path, key))

    yield from walk(params, ())


def _layer(path: tuple[str, ...], node: dict) -> AdaptedLayer:
    leading = 1 if "layers" in path else 0
    return AdaptedLayer(path, leading, len(_shape(node["lora_a"])) - 1 - leading)


def _map_adapted(params: Params, fn: Callable[[AdaptedLayer, dict], dict]) -> Params:
    """A copy of `params` with each adapted node replaced by `fn(layer, dict(node))`."""

    def rebuild(node: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(node, dict):
            return node
        if "lora_a" in node:
            return fn(_layer(path, node), dict(node))
        return {key: rebuild(child, (*path, key)) for key, child in node.items()}

    return rebuild(params, ())


def prepare_base(config: ModelConfig, params: Params) -> Params:
    """The adapted layers' kernels stored as `config.lora.base_dtype` says: unchanged
    (`param`), cast to bfloat16, or int8 per output channel (`kernel_int8` + `scale`).
    Host or device arrays, also under `jax.jit`; an already prepared node stays as it is."""
    base = config.lora.base_dtype
    if not config.lora.enabled or base == "param":
        return params

    def one(layer: AdaptedLayer, node: dict) -> dict:
        if "kernel" not in node:
            return node
        kernel = node.pop("kernel")
        if base == "bfloat16":
            return {"kernel": kernel.astype(jnp.bfloat16), **node}
        q, scale = quantize_kernel(kernel, layer.num_contract, layer.num_leading)
        return {"kernel_int8": q, "scale": scale, **node}

    return _map_adapted(params, one)


def prepare_base_abstract(config: ModelConfig, boxed: Params) -> Params:
    """`prepare_base` on the boxed abstract tree (`nn.Partitioned` of `ShapeDtypeStruct`s):
    an int8 kernel keeps its logical names; its `scale` takes the leading and output axes'."""
    base = config.lora.base_dtype
    if not config.lora.enabled or base == "param":
        return boxed

    def one(layer: AdaptedLayer, node: dict) -> dict:
        if base == "int8":
            return quantize_abstract_node(node, layer.num_contract, layer.num_leading)
        box = node.pop("kernel")
        bf16 = jax.ShapeDtypeStruct(box.value.shape, jnp.bfloat16)
        return {"kernel": box.replace(value=bf16), **node}

    return _map_adapted(boxed, one)


def lora_delta(layer: AdaptedLayer, node: dict, lora: LoraConfig) -> np.ndarray:
    """`(alpha/rank) · A·B` in the kernel's shape `[*leading, *contracted, *features]`."""
    a = np.asarray(node["lora_a"], np.float32)
    b = np.asarray(node["lora_b"], np.float32)
    lead = layer.num_leading
    rank = a.shape[-1]
    in_shape, out_shape = a.shape[lead:-1], b.shape[lead + 1 :]
    lead_shape = a.shape[:lead]
    a2 = a.reshape(*lead_shape, -1, rank)
    b2 = b.reshape(*lead_shape, rank, -1)
    delta = np.matmul(a2, b2) * np.float32(lora.scale)
    return delta.reshape(*lead_shape, *in_shape, *out_shape)


def base_kernel(layer: AdaptedLayer, node: dict) -> np.ndarray:
    """The frozen kernel as float32: the stored one, or the int8 one times its scale."""
    if "kernel" in node:
        return np.asarray(node["kernel"], np.float32)
    q = np.asarray(node["kernel_int8"], np.float32)
    scale = np.asarray(node["scale"], np.float32)
    lead, contract = layer.num_leading, layer.num_contract
    scale = scale.reshape(*scale.shape[:lead], *(1,) * contract, *scale.shape[lead:])
    return q * scale


def merge_lora(config: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """The plain model LoRA stands for: each adapted kernel becomes `W + (alpha/rank)·A·B`
    (in float32, then `model.param_dtype`), the factors are dropped, and the config has no
    LoRA. A model without LoRA is returned as it is."""
    if not config.lora.enabled:
        return config, params
    dtype = np.dtype(jnp.dtype(config.param_dtype))
    params = jax.tree.map(np.asarray, params)

    def one(layer: AdaptedLayer, node: dict) -> dict:
        kernel = base_kernel(layer, node) + lora_delta(layer, node, config.lora)
        rest = {
            k: v
            for k, v in node.items()
            if k not in ("kernel", "kernel_int8", "scale", *LORA_FACTORS)
        }
        return {"kernel": kernel.astype(dtype), **rest}

    merged = _map_adapted(params, one)
    return without_lora(config), merged


def without_lora(config: ModelConfig) -> ModelConfig:
    """The same model with no adapters (the base they were trained on)."""
    return dataclasses.replace(config, lora=LoraConfig())
