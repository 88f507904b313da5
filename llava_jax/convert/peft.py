"""LoRA adapters in Hugging Face PEFT's layout, out and in.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose
keys name the adapted `nn.Linear` of `LlavaForConditionalGeneration` as transformers holds
it in memory, under PEFT's wrapper:

    base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight  [r, in]
    base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight  [out, r]

so that `peft.PeftModel.from_pretrained(base, folder)` applies `W + (alpha/r)·B·A`. Ours
are `lora_a: [*in, r]` and `lora_b: [r, *out]` (models/lora.py); the input and output
axes flatten in the order the kernels' own exchange uses (convert/hf_keys.py).

The vision tower's modules are named differently by transformers 4.52–4.57
(`model.vision_tower.vision_model.encoder.layers.0.…`) and 5.x (`model.vision_tower.encoder.
layers.0.…`, CLIPVisionModel without its `vision_model` wrapper). PEFT matches names
against the model in memory and skips, without a word, keys that name no module: an
export writes the installed transformers' names; an import reads either.

An import adapts exactly the modules `PeftModel.from_pretrained` would: those the config's
`target_modules` (`exclude_modules`, `layers_to_transform`) selects, as PEFT matches them
(`PeftSelection`), that the file holds factors for. A tensor PEFT would not load, a
selection PEFT refuses, a scale `lora_alpha / r` that is not finite and factors holding NaN
are refused, naming the setting or the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file

from llava_jax.convert.hf_keys import hf_family, projector_rules, text_rules, vision_rules
from llava_jax.convert.safetensors_io import CheckpointError, open_safetensors
from llava_jax.json_input import JSONInputError, loads
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
    imports to load the base model: the family `save_hf` writes it as (convert/hf_keys.py)."""
    family = hf_family(config)
    return {"base_model_class": family.model_class, "parent_library": family.module}


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


# Settings of PEFT's LoRA that change the arithmetic or the base model, or carry weights
# other than LoRA factors; an adapter that sets any of them is refused.
_UNSUPPORTED = (
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "lora_bias",
    "use_bdlora",
    "arrow_config",
    "velora_config",
    "kasa_config",
    "monteclora_config",
)
# `init_lora_weights` values with which PEFT starts lora_B at zero: a module it adapts but
# the file holds no factors for stays the base. `false` gives such a module random factors;
# every other value (pissa, olora, corda, loftq, ...) rewrites the base weights on loading.
_ZERO_B_INITS = (True, "gaussian", "eva")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every nn.Linear but the output layer


def _unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


@dataclasses.dataclass(frozen=True)
class PeftSelection:
    """The modules PEFT adapts, from `adapter_config.json`: peft's
    `check_target_module_exists` (tuners/tuners_utils.py) for a plain LoRA. A string is a
    regex fullmatched against the module name (`all-linear`: every linear layer but the LM
    head); a list selects a name equal to an entry or ending in "." + entry, then (list only)
    keeps those in `layers_to_transform`; `exclude_modules` (the same two forms) wins."""

    target_modules: str | frozenset[str]
    exclude_modules: str | frozenset[str] | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, raw: dict, path: str) -> PeftSelection:
        """The selection `raw` (adapter_config.json at `path`) names; refuses what PEFT's
        `LoraConfig` refuses, and values it cannot match with."""
        target = raw.get("target_modules")
        if _unset(target):
            raise CheckpointError(
                f"{path}: target_modules is missing or empty: PEFT has no default for LLaVA "
                'and refuses the adapter too; name the adapted modules, e.g. ["q_proj", "v_proj"]'
            )
        for key in ("target_modules", "exclude_modules"):
            value = raw.get(key)
            if not (_unset(value) or isinstance(value, str) or _strings(value)):
                raise CheckpointError(f"{path}: {key}={value!r} is not a regex or a list of names")
            if isinstance(value, str) and value.lower() != ALL_LINEAR:
                _check_regex(path, key, value)
        layers, pattern = raw.get("layers_to_transform"), raw.get("layers_pattern")
        if isinstance(target, str) and (layers is not None or pattern is not None):
            raise CheckpointError(
                f"{path}: layers_to_transform/layers_pattern with a regex target_modules "
                f"{target!r}: PEFT refuses that; put the layers in the regex"
            )
        if not _unset(pattern) and layers is None:
            raise CheckpointError(
                f"{path}: layers_pattern={pattern!r} without layers_to_transform: PEFT refuses that"
            )
        integer = isinstance(layers, int) and not isinstance(layers, bool)
        many = isinstance(layers, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers
        )
        if not (layers is None or integer or many):
            raise CheckpointError(
                f"{path}: layers_to_transform={layers!r} is not a layer index or a list of them"
            )
        if not (_unset(pattern) or isinstance(pattern, str) or _strings(pattern)):
            raise CheckpointError(f"{path}: layers_pattern={pattern!r} is not a name or a list")
        patterns = (pattern,) if isinstance(pattern, str) and pattern else tuple(pattern or ())
        for each in patterns:
            _check_regex(path, "layers_pattern", each)
        exclude = raw.get("exclude_modules")
        return cls(
            target_modules=target if isinstance(target, str) else frozenset(target),
            exclude_modules=None
            if _unset(exclude)
            else (exclude if isinstance(exclude, str) else frozenset(exclude)),
            layers_to_transform=layers if integer or not layers else tuple(layers),
            layers_pattern=patterns,
        )

    def selects(self, name: str, linear: frozenset[str]) -> bool:
        """Whether PEFT adapts the module `name` of a model whose linear layers (but the LM
        head) are `linear`."""
        exclude = self.exclude_modules
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif exclude and (name in exclude or any(name.endswith(f".{e}") for e in exclude)):
            return False
        target = self.target_modules
        if isinstance(target, str):
            if target.lower() != ALL_LINEAR:
                return re.fullmatch(target, name) is not None
            target = linear  # PEFT turns the shorthand into the set of names
        if name in target:
            return True  # (PEFT checks layers only for the "." + entry matches)
        if not any(name.endswith(f".{t}") for t in target):
            return False
        layers = self.layers_to_transform
        if layers is None:
            return True
        match = None
        if not self.layers_pattern:  # the first numbered segment after a named one
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        for pattern in self.layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == layers if isinstance(layers, int) else index in layers

    def describe(self) -> str:
        """The settings as adapter_config.json writes them (those that are set)."""

        def shown(value: Any) -> str:
            return json.dumps(sorted(value) if isinstance(value, frozenset) else value)

        parts = [f"target_modules={shown(self.target_modules)}"]
        if self.exclude_modules is not None:
            parts.append(f"exclude_modules={shown(self.exclude_modules)}")
        if self.layers_to_transform is not None:
            parts.append(f"layers_to_transform={shown(self.layers_to_transform)}")
        if self.layers_pattern:
            parts.append(f"layers_pattern={shown(list(self.layers_pattern))}")
        return ", ".join(parts)


def _check_regex(path: str, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise CheckpointError(f"{path}: {key}={pattern!r} is not a regex ({err})") from None


def read_adapter_config(adapter_dir: str) -> dict:
    """`adapter_config.json`, checked to be a plain LoRA this model can run, with `r` a
    positive integer and `lora_alpha` a finite number (PEFT scales by `lora_alpha / r`; a
    zero or negative alpha is a valid, if odd, adapter and is kept)."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        with open(path, "rb") as f:
            raw = loads(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"{adapter_dir}: not a PEFT adapter (no {ADAPTER_CONFIG})") from None
    except JSONInputError as err:
        raise CheckpointError(f"{path}: not JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type={raw.get('peft_type')!r}; only LORA is read")
    for key in _UNSUPPORTED:
        if not _unset(raw.get(key)):
            raise CheckpointError(
                f"{path}: {key}={raw[key]!r} is not supported: only plain LoRA is read "
                f"(leave {key} unset)"
            )
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias={raw['bias']!r} is not supported (only 'none')")
    init = raw.get("init_lora_weights", True)
    if (init.lower() if isinstance(init, str) else init) not in (*_ZERO_B_INITS, False):
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r}: PEFT changes the base model's weights when "
            "it loads such an adapter; save it converted to plain LoRA (PEFT's save_pretrained("
            "path_initial_model_for_weight_conversion=...)), whose config says "
            "init_lora_weights: true"
        )
    rank = raw.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        shown = " is missing" if "r" not in raw else f"={rank!r} is not a positive integer"
        raise CheckpointError(
            f"{path}: r{shown}: it is the adapters' rank, the first axis of each "
            "lora_A.weight (PEFT refuses such an adapter too)"
        )
    alpha = raw.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        shown = " is missing" if "lora_alpha" not in raw else f"={alpha!r} is not a finite number"
        raise CheckpointError(
            f"{path}: lora_alpha{shown}: PEFT scales each adapter by lora_alpha / r, so "
            "every adapted layer would give NaN or infinity; set the lora_alpha it was trained with"
        )
    dropout = raw.get("lora_dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise CheckpointError(f"{path}: lora_dropout={dropout!r} is not a probability in [0, 1)")
    return raw


def import_peft_adapter(
    config: ModelConfig, params: Params, adapter_dir: str
) -> tuple[ModelConfig, Params]:
    """A PEFT adapter on top of the base `params` -> (LoRA config, params with factors).

    Exactly the modules `peft.PeftModel.from_pretrained` would adapt are adapted: those the
    config's `target_modules` selects (`PeftSelection`) that the file holds factors for (a
    selected module without factors starts at lora_B = 0 in PEFT: the base). Refused, naming
    the setting or tensor: a selection of no linear layer (PEFT's NoMatchingPeftModuleError)
    or of a module that is no linear layer; a tensor for a module it does not select (PEFT
    would not load it), for a layer this model lacks, or of another shape (an adapter for
    another base model); NaN or infinite values.

    The config's `lora.target` names exactly the adapted layers (scan-agnostic: a layer
    kind must be adapted in every layer of its stack, as a scanned model needs).
    Vision-tower modules may be named as transformers 4.52–4.57 or 5.x names them.
    """
    raw = read_adapter_config(adapter_dir)
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    selection = PeftSelection.from_config(raw, config_path)
    rank, alpha = int(raw["r"]), float(raw["lora_alpha"])
    # The two layouts differ only in the vision prefix, and neither's names are the other's.
    newer = module_prefixes()["img"] == VISION_PREFIXES[5]
    versions = ("5.0", "4.57") if newer else ("4.57", "5.0")  # the installed one first
    layouts = {version: linear_modules(config, version) for version in versions}
    names = {v: frozenset(linear.module for linear in found) for v, found in layouts.items()}
    by_module = {linear.module: linear for found in layouts.values() for linear in found}
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(weights):
        raise CheckpointError(
            f"{adapter_dir}: no {ADAPTER_WEIGHTS} (PEFT's pickle file is not read)"
        )
    try:
        with open_safetensors(weights) as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises several types on bad files
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from None
    modules = {}
    for key in sorted(tensors):
        match = re.fullmatch(
            r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key
        )
        if match is None:
            raise CheckpointError(f"{adapter_dir}: tensor {key!r} is not a LoRA factor")
        if match.group(1) not in by_module:
            raise CheckpointError(
                f"{adapter_dir}: tensor {key!r} adapts {match.group(1)!r}, which this model "
                "does not have"
            )
        modules[key] = match.groups()
    # The layouts the file is in: the one its vision-tower names use, both if it names none.
    vision = {v: {m for m in names[v] if by_module[m].node[0] == "img"} for v in names}
    named = {module for module, _ in modules.values()}
    layouts_used = [v for v in names if named & vision[v]] or list(names)
    _check_selection(selection, config_path, [names[v] for v in layouts_used])

    base = flatten_dict(to_unscanned_layout(jax.tree.map(np.asarray, params), config))
    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    made_for = raw.get("base_model_name_or_path")
    factors: dict[tuple[str, ...], np.ndarray] = {}
    for key, (module, which) in modules.items():
        layout = next(names[v] for v in names if module in names[v])
        if not selection.selects(module, layout):
            raise CheckpointError(
                f"{weights}: tensor {key!r} adapts {module}, which {config_path} does not "
                f"select ({selection.describe()}): PEFT would not load it, so the model would "
                "not be PEFT's. Add the module to target_modules, or remove the tensor"
            )
        node, num_in = by_module[module].node, by_module[module].num_in
        name = "lora_a" if which == "A" else "lora_b"
        if (*node, name) in factors:  # the same layer under both layouts' names
            raise CheckpointError(f"{adapter_dir}: {'/'.join(node)} has two lora_{which} tensors")
        kernel = base.get((*node, "kernel"))
        if kernel is None:
            raise CheckpointError(f"{adapter_dir}: {'/'.join(node)} has no float kernel to adapt")
        in_shape, out_shape = kernel.shape[:num_in], kernel.shape[num_in:]
        n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
        value = tensors[key]
        _check_shape(key, value, which, (n_in, n_out), rank, module, weights, made_for)
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(value, np.float32))))
        if bad:
            raise CheckpointError(
                f"{weights}: tensor {key!r} holds {bad} NaN or infinite value(s) of "
                f"{value.size}: every output of {module} would be NaN. The adapter is damaged "
                "or its training diverged: export it again from a good checkpoint"
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
    init = raw.get("init_lora_weights", True)
    if (init.lower() if isinstance(init, str) else init) not in _ZERO_B_INITS:
        for version in layouts_used:
            for linear in layouts[version]:
                if linear.node not in nodes and selection.selects(linear.module, names[version]):
                    raise CheckpointError(
                        f"{config_path}: {selection.describe()} selects {linear.module}, which "
                        f"{weights} holds no factors for: with init_lora_weights={init!r} PEFT "
                        "gives it random ones. Select only the adapted modules"
                    )
    target = _target_regex(config, nodes)
    lora = LoraConfig(
        rank=rank, alpha=alpha, dropout=float(raw.get("lora_dropout") or 0.0), target=target
    )
    merged = unflatten_dict({**base, **factors})
    if config.scan_layers:
        merged = to_scan_layout(merged, config)
    return dataclasses.replace(config, lora=lora), merged


def _check_selection(selection: PeftSelection, path: str, layouts: list[frozenset[str]]) -> None:
    """Refuses a selection PEFT refuses on every layout in `layouts` (the linear layers'
    names): one that selects a module holding others (PEFT cannot adapt it), or none of the
    linear layers (PEFT's NoMatchingPeftModuleError)."""
    for linear in layouts:
        holders = {
            ".".join(name.split(".")[:depth])
            for name in linear
            for depth in range(1, name.count(".") + 1)
        }
        for name in sorted(holders - linear):
            if selection.selects(name, linear):
                raise CheckpointError(
                    f"{path}: {selection.describe()} selects {name}, which is no linear layer "
                    "but holds several (PEFT refuses it too: it cannot adapt such a module). "
                    "Select linear layers only, e.g. q_proj"
                )
    if not any(selection.selects(name, linear) for linear in layouts for name in linear):
        raise CheckpointError(
            f"{path}: {selection.describe()} selects none of this model's linear layers "
            "(PEFT refuses it too: NoMatchingPeftModuleError). They are named like "
            "model.language_model.layers.0.self_attn.q_proj or "
            "model.multi_modal_projector.linear_1"
        )


def _check_shape(
    key: str,
    value: np.ndarray,
    which: str,
    sizes: tuple[int, int],
    rank: int,
    module: str,
    weights: str,
    made_for: str | None,
) -> None:
    """Refuses a factor whose shape is not PEFT's `[r, in]` (A) or `[out, r]` (B) for
    `module` (`sizes`: its inputs and outputs), saying whether `r` or the model differs."""
    n_in, n_out = sizes
    expected = (rank, n_in) if which == "A" else (n_out, rank)
    shape = tuple(value.shape)
    if shape == expected:
        return
    rank_axis = 0 if which == "A" else 1
    if len(shape) == 2 and shape[1 - rank_axis] == expected[1 - rank_axis]:
        raise CheckpointError(
            f"{weights}: tensor {key!r} has shape {shape}, rank {shape[rank_axis]}, but "
            f"{ADAPTER_CONFIG} says r={rank}: the file and its config disagree; set r to "
            "the rank the adapter was trained with"
        )
    origin = f" ({made_for})" if made_for else ""
    raise CheckpointError(
        f"{weights}: tensor {key!r} has shape {shape}, but {module} of this base model "
        f"takes {n_in} inputs to {n_out} outputs (its lora_{which} would be {expected}): "
        f"the adapter was made for another base model{origin}. Put it on the checkpoint "
        "of the model it was trained on"
    )


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
