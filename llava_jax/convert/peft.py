"""LoRA adapters in Hugging Face PEFT's layout, out and in.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose
keys name the adapted `nn.Linear` of `LlavaForConditionalGeneration` as transformers holds
it in memory, under PEFT's wrapper:

    base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight  [r, in]
    base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight  [out, r]

so that `peft.PeftModel.from_pretrained(base, folder)` applies `W + (alpha/r)·B·A`. Ours
are `lora_a: [*in, r]` and `lora_b: [r, *out]` (models/lora.py); the input and output
axes flatten in the order the kernels' own exchange uses (convert/hf.py).

The vision tower's modules are named differently by transformers 4.52–4.57
(`model.vision_tower.vision_model.encoder.layers.0.…`) and 5.x (`model.vision_tower.encoder.
layers.0.…`, CLIPVisionModel without its `vision_model` wrapper). PEFT matches names
against the model in memory and skips, without a word, keys that name no module: an
export writes the installed transformers' names; an import reads either.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import safe_open
from safetensors.numpy import save_file

from llava_jax.convert.hf import projector_rules, text_rules, vision_rules
from llava_jax.convert.safetensors_io import CheckpointError
from llava_jax.models.config import LoraConfig, ModelConfig
from llava_jax.models.llava import to_scan_layout, to_unscanned_layout
from llava_jax.models.lora import LORA_FACTORS, adapted_layers

Params = dict[str, Any]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Where each tower's modules sit in transformers' in-memory LlavaForConditionalGeneration
# (and LlavaNextForConditionalGeneration), by transformers' major version (module docstring).
VISION_PREFIXES = {4: "model.vision_tower.vision_model.", 5: "model.vision_tower."}
PROJECTOR_PREFIX = "model.multi_modal_projector."
TEXT_PREFIX = "model.language_model."
_LAYER = re.compile(r"^layers_(\d+)$")


def module_prefixes(transformers_version: str | None = None) -> dict[str, str]:
    """`{tower: module-name prefix}` in the layout of `transformers_version` (default: the
    installed transformers'): `img` is `model.vision_tower.` from 5.0 on, else
    `model.vision_tower.vision_model.`."""
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    major = int(transformers_version.split(".")[0])
    vision = VISION_PREFIXES[5] if major >= 5 else VISION_PREFIXES[4]
    return {"img": vision, "proj": PROJECTOR_PREFIX, "llm": TEXT_PREFIX}


@dataclasses.dataclass(frozen=True)
class _Linear:
    node: tuple[str, ...]  # our unscanned path, e.g. ("llm", "layers_0", "attn", "query")
    module: str  # transformers' module name, e.g. "model.language_model.layers.0.self_attn.q_proj"
    num_in: int  # leading input axes of our kernel (2 for the attention output)


def linear_modules(config: ModelConfig, transformers_version: str | None = None) -> list[_Linear]:
    """Every dense layer of the model, our node and transformers' module name (in the layout
    of `transformers_version`, default the installed one)."""
    prefixes = module_prefixes(transformers_version)
    towers = (
        ("img", vision_rules(config.vision)),
        ("proj", projector_rules(config)),
        ("llm", text_rules(config.text)),
    )
    found = []
    for tower, rules in towers:
        for rule in rules:
            if rule.kind == "linear" and rule.path[-1] == "kernel":
                module = prefixes[tower] + rule.key.removesuffix(".weight")
                found.append(_Linear((tower, *rule.path[:-1]), module, rule.num_in))
    return found


def base_model_class(config: ModelConfig) -> dict[str, str]:
    """PEFT's `auto_mapping`: the transformers class `AutoPeftModel.from_pretrained`
    imports to load the base model (LLaVA-NeXT's for an anyres model, whose checkpoint
    `save_hf` writes as `LlavaNextForConditionalGeneration`'s)."""
    if config.image_grid_pinpoints:
        return {
            "base_model_class": "LlavaNextForConditionalGeneration",
            "parent_library": "transformers.models.llava_next.modeling_llava_next",
        }
    return {
        "base_model_class": "LlavaForConditionalGeneration",
        "parent_library": "transformers.models.llava.modeling_llava",
    }


def export_peft_adapter(
    config: ModelConfig,
    params: Params,
    out_dir: str,
    *,
    base_model_name_or_path: str | None = None,
) -> list[str]:
    """Write the LoRA factors of `params` as a PEFT adapter folder; returns the adapted
    module names, in the installed transformers' layout (the module docstring). `config`
    must be a LoRA model."""
    if not config.lora.enabled:
        raise ValueError("export_peft_adapter: the model has no LoRA adapters (lora.rank=0)")
    flat = flatten_dict(to_unscanned_layout(jax.tree.map(np.asarray, params), config))
    by_node = {linear.node: linear.module for linear in linear_modules(config)}
    tensors, modules = {}, []
    for layer, node in adapted_layers(unflatten_dict(flat)):
        if layer.path not in by_node:
            raise ValueError(f"{layer.module_path}: LoRA on a layer transformers has no Linear for")
        module = by_node[layer.path]
        a = np.asarray(node["lora_a"], np.float32)
        b = np.asarray(node["lora_b"], np.float32)
        rank = a.shape[-1]
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.reshape(-1, rank).T.copy()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.reshape(rank, -1).T.copy()
        modules.append(module)
    if not modules:
        raise ValueError("export_peft_adapter: the parameters hold no lora_a/lora_b factors")
    lora = config.lora
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        # A regex PEFT matches against whole module names: exactly the adapted ones.
        "target_modules": "^(" + "|".join(re.escape(m) for m in modules) + ")$",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "auto_mapping": base_model_class(config),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config, f, indent=2)
    # transformers and PEFT require the "pt" format tag to load safetensors
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return modules


# Settings of PEFT's LoRA that change the arithmetic; an adapter using any is refused.
_UNSUPPORTED = {
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layers_to_transform": None,
}


def read_adapter_config(adapter_dir: str) -> dict:
    """`adapter_config.json`, checked to be a plain LoRA this model can run."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{adapter_dir}: not a PEFT adapter (no {ADAPTER_CONFIG})") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not JSON ({err})") from None
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type={raw.get('peft_type')!r}; only LORA is read")
    for key, plain in _UNSUPPORTED.items():
        if raw.get(key) not in (plain, None) and raw.get(key) != plain:
            raise CheckpointError(f"{path}: {key}={raw[key]!r} is not supported (only {plain!r})")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias={raw['bias']!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha"):
        if not isinstance(raw.get(key), (int, float)):
            raise CheckpointError(f"{path}: {key} is missing or not a number")
    return raw


def import_peft_adapter(
    config: ModelConfig, params: Params, adapter_dir: str
) -> tuple[ModelConfig, Params]:
    """A PEFT adapter on top of the base `params` -> (LoRA config, params with factors).

    The config's `lora.target` names exactly the adapted layers (scan-agnostic: a layer
    kind must be adapted in every layer of its stack, as a scanned model needs). Every
    tensor of the adapter must map to a dense layer of this model; shapes must match.
    Vision-tower modules may be named as transformers 4.52–4.57 or 5.x names them.
    """
    raw = read_adapter_config(adapter_dir)
    rank, alpha = int(raw["r"]), float(raw["lora_alpha"])
    # The two layouts differ only in the vision prefix, and neither's names are the other's.
    by_module = {
        linear.module: linear
        for version in ("4.57", "5.0")
        for linear in linear_modules(config, version)
    }
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(weights):
        raise CheckpointError(
            f"{adapter_dir}: no {ADAPTER_WEIGHTS} (PEFT's pickle file is not read)"
        )
    try:
        with safe_open(weights, framework="numpy") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as err:  # noqa: BLE001 - safetensors raises several types on bad files
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from None
    base = flatten_dict(to_unscanned_layout(jax.tree.map(np.asarray, params), config))
    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    factors: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in sorted(tensors.items()):
        match = re.fullmatch(
            r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key
        )
        if match is None:
            raise CheckpointError(f"{adapter_dir}: tensor {key!r} is not a LoRA factor")
        module, which = match.groups()
        if module not in by_module:
            raise CheckpointError(
                f"{adapter_dir}: tensor {key!r} adapts {module!r}, which this model does not have"
            )
        node, num_in = by_module[module].node, by_module[module].num_in
        name = "lora_a" if which == "A" else "lora_b"
        if (*node, name) in factors:  # the same layer under both layouts' names
            raise CheckpointError(f"{adapter_dir}: {'/'.join(node)} has two lora_{which} tensors")
        kernel = base.get((*node, "kernel"))
        if kernel is None:
            raise CheckpointError(f"{adapter_dir}: {'/'.join(node)} has no float kernel to adapt")
        in_shape, out_shape = kernel.shape[:num_in], kernel.shape[num_in:]
        expected = (
            (rank, int(np.prod(in_shape))) if which == "A" else (int(np.prod(out_shape)), rank)
        )
        if tuple(value.shape) != expected:
            raise CheckpointError(
                f"{adapter_dir}: {key} has shape {tuple(value.shape)}, expected {expected} "
                f"for {'/'.join(node)} at rank {rank}"
            )
        if which == "A":
            factors[(*node, name)] = value.T.reshape(*in_shape, rank).astype(dtype)
        else:
            factors[(*node, name)] = value.T.reshape(rank, *out_shape).astype(dtype)
    nodes = {path[:-1] for path in factors}
    for node in nodes:
        for name in LORA_FACTORS:
            if (*node, name) not in factors:
                raise CheckpointError(f"{adapter_dir}: {'/'.join(node)} lacks its {name}")
    if not nodes:
        raise CheckpointError(f"{adapter_dir}: the adapter holds no LoRA factors")
    target = _target_regex(config, nodes)
    lora = LoraConfig(
        rank=rank, alpha=alpha, dropout=float(raw.get("lora_dropout") or 0.0), target=target
    )
    merged = unflatten_dict({**base, **factors})
    if config.scan_layers:
        merged = to_scan_layout(merged, config)
    return dataclasses.replace(config, lora=lora), merged


def _target_regex(config: ModelConfig, nodes: set[tuple[str, ...]]) -> str:
    """A `lora.target` matching exactly `nodes` in both layouts (`layers/…`, `layers_i/…`)."""
    counts = {"img": config.vision.num_layers, "llm": config.text.num_layers}
    per_kind: dict[tuple[str, tuple[str, ...]], set[int]] = {}
    plain = []
    for node in nodes:
        layer = _LAYER.match(node[1]) if len(node) > 1 else None
        if layer is None:
            plain.append(re.escape("/".join(node)))
            continue
        per_kind.setdefault((node[0], node[2:]), set()).add(int(layer.group(1)))
    alternatives = sorted(plain)
    for (tower, inner), layers in sorted(per_kind.items()):
        if len(layers) != counts[tower]:
            raise CheckpointError(
                f"the adapter adapts {'/'.join(inner)} in {len(layers)} of the "
                f"{counts[tower]} layers of {tower}: only every layer or none is supported"
            )
        alternatives.append(f"{tower}/layers(_\\d+)?/" + re.escape("/".join(inner)))
    return "(" + "|".join(alternatives) + ")"
