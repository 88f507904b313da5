"""Hugging Face LLaVA / CLIP / LLaMA safetensors <-> llava_jax parameter trees (numpy, no torch).

Configs are read and written with transformers' config classes (plain JSON, no model code);
weights with safetensors. Which HF key each of our leaves has, and its layout there:
convert/hf_keys.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from llava_jax.convert.hf_keys import (
    HF_FAMILIES,
    IGNORED_SUFFIXES,
    LM_HEAD_KEYS,
    PROJECTOR_PREFIXES,
    SIGLIP_IGNORED_PREFIX,
    TEXT_PREFIXES,
    VISION_PREFIXES,
    Rule,
    hf_family,
    hf_shape,
    projector_rules,
    text_rules,
    to_hf,
    to_ours,
    vision_probe_key,
    vision_rules,
)
from llava_jax.convert.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors
from llava_jax.models.config import ModelConfig, RopeConfig, TextConfig, VisionConfig
from llava_jax.models.layers import activation
from llava_jax.models.llava import abstract_params, init_params, to_scan_layout
from llava_jax.models.llava import to_unscanned_layout as _unscan
from llava_jax.models.lora import merge_lora as merged_lora_model

Params = dict[str, Any]


# --- configs --------------------------------------------------------------------------------


def _check(value: Any, supported: tuple, field: str) -> None:
    if value not in supported:
        raise CheckpointError(
            f"unsupported architecture: {field}={value!r} (supported: "
            f"{', '.join(map(repr, supported))})"
        )


def _check_activation(name: str, field: str) -> None:
    try:
        activation(name)
    except ValueError as err:
        raise CheckpointError(f"unsupported architecture: {field}={name!r} ({err})") from None


VISION_HF_MODEL_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


def vision_config_from_hf(hf: Any, field: str = "vision_config") -> VisionConfig:
    """A transformers `CLIPVisionConfig` or `SiglipVisionConfig` -> our `VisionConfig`."""
    _check(hf.model_type, tuple(VISION_HF_MODEL_TYPES), f"{field}.model_type")
    _check_activation(hf.hidden_act, f"{field}.hidden_act")
    return VisionConfig(
        model_type=VISION_HF_MODEL_TYPES[hf.model_type],
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        patch_size=hf.patch_size,
        image_size=hf.image_size,
        num_channels=hf.num_channels,
        layer_norm_eps=hf.layer_norm_eps,
        hidden_act=hf.hidden_act,
    )


def text_config_from_hf(hf: Any, field: str = "text_config") -> TextConfig:
    _check(hf.model_type, ("llama", "mistral", "qwen2"), f"{field}.model_type")
    qwen2 = hf.model_type == "qwen2"
    if qwen2 and getattr(hf, "use_sliding_window", False):
        raise CheckpointError(
            f"{field}.use_sliding_window=True: sliding-window attention is not supported "
            "(LLaVA-OneVision's Qwen2 decoders have use_sliding_window false)"
        )
    window = None if qwen2 else getattr(hf, "sliding_window", None)
    if window is not None and window < hf.max_position_embeddings:
        raise CheckpointError(
            f"{field}.sliding_window={window} < max_position_embeddings="
            f"{hf.max_position_embeddings}: sliding-window attention is not supported "
            "(LLaVA-NeXT's Mistral-7B-Instruct-v0.2 has none)"
        )
    _check_activation(hf.hidden_act, f"{field}.hidden_act")
    rope = dict(hf.rope_parameters or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _check(rope_type, ("default", "linear", "llama3"), f"{field}.rope_parameters.rope_type")
    partial = rope.get("partial_rotary_factor", 1.0)
    _check(partial, (1.0,), f"{field}.rope_parameters.partial_rotary_factor")
    rope_config = RopeConfig(
        theta=float(rope.get("rope_theta", 10000.0)),
        type=rope_type,
        factor=float(rope.get("factor", 1.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings") or hf.max_position_embeddings
        ),
    )
    eos = hf.eos_token_id
    return TextConfig(
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None),
        rms_norm_eps=hf.rms_norm_eps,
        rope=rope_config,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        hidden_act=hf.hidden_act,
        attention_bias=bool(getattr(hf, "attention_bias", False)),
        qkv_bias=qwen2,  # Qwen2's q/k/v projections always have biases, its o_proj none
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        bos_token_id=hf.bos_token_id,
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.pad_token_id,
    )


def model_config_from_hf(hf: Any, **numerics: Any) -> ModelConfig:
    """A transformers `LlavaConfig`, `LlavaNextConfig` or `LlavaOnevisionConfig` -> our
    `ModelConfig` (numerics: dtype, scan_layers, …)."""
    _check(hf.model_type, tuple(HF_FAMILIES), "model_type")
    family = HF_FAMILIES[hf.model_type]
    _check_activation(hf.projector_hidden_act, "projector_hidden_act")
    text = text_config_from_hf(hf.text_config)
    if hf.tie_word_embeddings and not text.tie_word_embeddings:
        text = dataclasses.replace(text, tie_word_embeddings=True)
    layer = hf.vision_feature_layer
    vision = vision_config_from_hf(hf.vision_config)
    if not vision.has_class_token and hf.vision_feature_select_strategy == "default":
        raise CheckpointError(  # "default" drops a class token, which SigLIP has none of
            "unsupported architecture: vision_feature_select_strategy='default' with a "
            f"{vision.model_type} vision tower, which has no class token to drop (use 'full')"
        )
    return ModelConfig(
        vision=vision,
        text=text,
        projector="mlp2x_gelu",
        projector_bias=bool(hf.multimodal_projector_bias),
        projector_act=hf.projector_hidden_act,
        vision_feature_layer=tuple(layer) if isinstance(layer, list | tuple) else int(layer),
        vision_feature_select_strategy=hf.vision_feature_select_strategy,
        image_token_id=hf.image_token_id,
        **{name: _tuples(getattr(hf, name, None) or ()) for name in family.config_fields},
        **numerics,
    )


def model_config_to_hf(config: ModelConfig) -> Any:
    """Our `ModelConfig` -> a transformers `LlavaConfig`, or `LlavaNextConfig` for an
    anyres model (for config.json)."""
    from transformers import (
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    if config.projector != "mlp2x_gelu":
        raise CheckpointError(
            f"projector={config.projector!r} cannot be written for transformers' "
            "LlavaForConditionalGeneration, whose projector is always two layers (mlp2x_gelu)"
        )
    vision, text = config.vision, config.text
    rope: dict[str, Any] = {"rope_type": text.rope.type, "rope_theta": text.rope.theta}
    if text.rope.type in ("linear", "llama3"):
        rope["factor"] = text.rope.factor
    if text.rope.type == "llama3":
        rope.update(
            low_freq_factor=text.rope.low_freq_factor,
            high_freq_factor=text.rope.high_freq_factor,
            original_max_position_embeddings=text.rope.original_max_position_embeddings,
        )
    eos = text.eos_token_id
    if text.model_type == "mistral":
        if text.attention_bias or text.mlp_bias:
            raise CheckpointError("a Mistral text model has no attention or MLP biases")
        family, extra = MistralConfig, {"sliding_window": None}
    elif text.model_type == "qwen2":
        if text.attention_bias or text.mlp_bias or not text.qkv_bias:
            raise CheckpointError(
                "a Qwen2 text model has biases on q/k/v only (qkv_bias=True, "
                "attention_bias=False, mlp_bias=False)"
            )
        family, extra = Qwen2Config, {"use_sliding_window": False, "sliding_window": None}
    else:
        if text.qkv_bias and not text.attention_bias:
            raise CheckpointError(
                f"a {text.model_type} text model cannot hold biases on q/k/v alone "
                "(qkv_bias); transformers' Qwen2 (text.model_type='qwen2') does"
            )
        family = LlamaConfig
        extra = {"attention_bias": text.attention_bias, "mlp_bias": text.mlp_bias}
    text_config = family(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads,
        head_dim=text.resolved_head_dim,
        rms_norm_eps=text.rms_norm_eps,
        rope_parameters=rope,
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=text.tie_word_embeddings,
        hidden_act=text.hidden_act,
        bos_token_id=text.bos_token_id,
        eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
        pad_token_id=text.pad_token_id,
        **extra,
    )
    vision_config = vision_config_to_hf(vision)
    layer = config.vision_feature_layer
    family = hf_family(config)
    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=config.image_token_id,
        projector_hidden_act=config.projector_act,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_feature_layer=list(layer) if isinstance(layer, tuple) else layer,
        multimodal_projector_bias=config.projector_bias,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    if family.model_type != "llava_onevision":  # OneVision's counts depend on the image
        common["image_seq_length"] = config.num_image_tokens
    config_class = getattr(importlib.import_module("transformers"), family.config_class)
    fields = {name: _lists(getattr(config, name)) for name in family.config_fields}
    return config_class(**fields, **common)


def vision_config_to_hf(vision: VisionConfig) -> Any:
    """Our `VisionConfig` -> a transformers `CLIPVisionConfig` or `SiglipVisionConfig` (the
    latter without its pooling head, which LLaVA does not use and is not written)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    fields = dict(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        patch_size=vision.patch_size,
        image_size=vision.image_size,
        num_channels=vision.num_channels,
        layer_norm_eps=vision.layer_norm_eps,
        hidden_act=vision.hidden_act,
    )
    if vision.model_type == "siglip":
        return SiglipVisionConfig(**fields, vision_use_head=False)
    return CLIPVisionConfig(**fields)


def _tuples(value: Any) -> Any:
    """Lists (as JSON holds them) -> tuples, nested (as our configs hold them)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _lists(value: Any) -> Any:
    """Tuples -> lists, nested (as transformers' configs hold them)."""
    return [_lists(v) for v in value] if isinstance(value, list | tuple) else value


def _read_hf_config(path: str) -> Any:
    from transformers import AutoConfig

    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path}: no config.json")
    with open(config_path) as f:
        raw = json.load(f)
    known = (
        "llava",
        "llava_next",
        "llava_onevision",
        "clip",
        "clip_vision_model",
        "llama",
        "mistral",
        "qwen2",
    )
    known += ("siglip", "siglip_vision_model")  # SigLIP (LLaVA-OneVision's vision tower)
    _check(raw.get("model_type"), known, f"{config_path}: model_type")
    return AutoConfig.from_pretrained(path)


# --- reading --------------------------------------------------------------------------------


def _find_prefix(reader: SafetensorsReader, prefixes: tuple[str, ...], probe: str) -> str | None:
    for prefix in prefixes:
        if prefix + probe in reader:
            return prefix
    return None


def _read_tower(
    reader: SafetensorsReader,
    prefix: str,
    rules: list[Rule],
    shapes: dict[tuple[str, ...], Any],
    dtype: Any,
    used: set[str],
) -> Params:
    flat = {}
    for rule in rules:
        key = prefix + rule.key
        if key not in reader:
            raise CheckpointError(
                f"{reader.directory}: missing key {key!r} (for parameter {'/'.join(rule.path)})"
            )
        expected = tuple(shapes[rule.path].shape)
        found = reader.shape(key)
        if found != hf_shape(rule, expected):
            raise CheckpointError(
                f"{reader.directory}: key {key!r} has shape {found}, but the config implies "
                f"{hf_shape(rule, expected)} (parameter {'/'.join(rule.path)} {expected})"
            )
        flat[rule.path] = to_ours(rule, reader[key], expected).astype(dtype)
        used.add(key)
    return unflatten_dict(flat)


def _check_all_used(reader: SafetensorsReader, used: set[str], ignore: tuple[str, ...]) -> None:
    unexpected = sorted(
        k for k in reader if k not in used and not k.endswith(IGNORED_SUFFIXES + ignore)
    )
    if unexpected:
        shown = ", ".join(repr(k) for k in unexpected[:10])
        more = f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""
        raise CheckpointError(f"{reader.directory}: unexpected key(s) {shown}{more}")


def _shapes(config: ModelConfig) -> dict[tuple[str, ...], Any]:
    unscanned = dataclasses.replace(config, scan_layers=False)
    return flatten_dict(nn.meta.unbox(abstract_params(unscanned)))


def _tower_shapes(shapes: dict, tower: str) -> dict:
    return {path[1:]: s for path, s in shapes.items() if path[0] == tower}


def _finish(params: Params, config: ModelConfig) -> Params:
    return to_scan_layout(params, config) if config.scan_layers else params


def load_hf(
    path: str,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    scan_layers: bool = True,
    remat_policy: str = "none",
    attention: str = "auto",
) -> tuple[ModelConfig, Params]:
    """Read a transformers LLaVA directory (config.json + safetensors) into numpy params.

    Accepts single-file and sharded safetensors, the layout transformers writes
    (`language_model.model.*`, `vision_tower.*`, …) and the in-memory one (`model.*`), in
    float32, bfloat16 or float16. Returns `(config, params)` with params
    `{'img', 'proj', 'llm'}` in `param_dtype`, scanned when `scan_layers`.
    """
    config = model_config_from_hf(
        _read_hf_config(path),
        dtype=dtype,
        param_dtype=param_dtype,
        scan_layers=scan_layers,
        remat_policy=remat_policy,
        attention=attention,
    )
    reader = SafetensorsReader(path)
    shapes = _shapes(config)
    used: set[str] = set()
    np_dtype = np.dtype(jax.numpy.dtype(param_dtype))

    def prefix_of(prefixes: tuple[str, ...], probe: str, what: str) -> str:
        prefix = _find_prefix(reader, prefixes, probe)
        if prefix is None:
            raise CheckpointError(
                f"{path}: missing key for the {what}: none of "
                f"{', '.join(repr(p + probe) for p in prefixes)}"
            )
        return prefix

    vision_prefix = prefix_of(VISION_PREFIXES, vision_probe_key(config.vision), "vision tower")
    text_prefix = prefix_of(TEXT_PREFIXES, "embed_tokens.weight", "language model")
    proj_prefix = prefix_of(PROJECTOR_PREFIXES, "linear_1.weight", "projector")
    params = {
        "img": _read_tower(
            reader,
            vision_prefix,
            vision_rules(config.vision),
            _tower_shapes(shapes, "img"),
            np_dtype,
            used,
        ),
        "proj": _read_tower(
            reader,
            proj_prefix,
            projector_rules(config),
            _tower_shapes(shapes, "proj"),
            np_dtype,
            used,
        ),
        "llm": _read_tower(
            reader,
            text_prefix,
            text_rules(config.text),
            _tower_shapes(shapes, "llm"),
            np_dtype,
            used,
        ),
    }
    if not config.vision.has_class_token:  # SigLIP's pooling head: not used by LLaVA
        used.update(k for k in reader if k.startswith(vision_prefix + SIGLIP_IGNORED_PREFIX))
    family = hf_family(config)
    for leaf, keys in family.extra_params:
        key = next((k for k in keys if k in reader), None)
        if key is None:
            raise CheckpointError(f"{path}: missing key {keys[0]!r} ({family.model_class})")
        rule = Rule(leaf, key, "plain")
        params["proj"].update(
            _read_tower(reader, "", [rule], _tower_shapes(shapes, "proj"), np_dtype, used)
        )
    lm_head_rule = Rule(("lm_head", "kernel"), "", "linear")
    head_key = next((k for k in LM_HEAD_KEYS if k in reader), None)
    if config.text.tie_word_embeddings:
        ignore = LM_HEAD_KEYS  # a tied head, when saved, is a copy of the embedding
    else:
        if head_key is None:
            raise CheckpointError(f"{path}: missing key {LM_HEAD_KEYS[0]!r} (untied LM head)")
        params["llm"].update(
            _read_tower(
                reader,
                "",
                [dataclasses.replace(lm_head_rule, key=head_key)],
                _tower_shapes(shapes, "llm"),
                np_dtype,
                used,
            )
        )
        ignore = ()
    _check_all_used(reader, used, ignore)
    return config, _finish(params, config)


def load_towers(
    vision_path: str,
    text_path: str,
    *,
    rng: jax.Array | None = None,
    **model_fields: Any,
) -> tuple[ModelConfig, Params]:
    """Compose a LLaVA as stage 1 starts: a CLIP or SigLIP vision checkpoint, a LLaMA
    (Mistral, Qwen2) causal LM, and a freshly initialised projector (from `rng`).
    `model_fields` set the rest of `ModelConfig` (projector, vision_feature_layer,
    image_token_id, dtype, scan_layers, …).
    """
    vision_hf = _read_hf_config(vision_path)
    if vision_hf.model_type in ("clip", "siglip"):  # a whole CLIP/SigLIP: its vision half
        vision_hf = vision_hf.vision_config
    text_hf = _read_hf_config(text_path)
    config = ModelConfig(
        vision=vision_config_from_hf(vision_hf, "vision config"),
        text=text_config_from_hf(text_hf, "text config"),
        **model_fields,
    )
    shapes = _shapes(config)
    np_dtype = np.dtype(jax.numpy.dtype(config.param_dtype))

    vision_reader = SafetensorsReader(vision_path)
    probe = vision_probe_key(config.vision)
    prefix = _find_prefix(vision_reader, ("vision_model.", ""), probe)
    if prefix is None:
        raise CheckpointError(
            f"{vision_path}: missing key 'vision_model.{probe}' (not a "
            f"{config.vision.model_type} vision checkpoint)"
        )
    used: set[str] = set()
    img = _read_tower(
        vision_reader,
        prefix,
        vision_rules(config.vision),
        _tower_shapes(shapes, "img"),
        np_dtype,
        used,
    )
    # A full CLIP checkpoint also holds the text tower and projections; only vision is taken.
    # SigLIP's: its logit bias, and the vision tower's pooling head (LLaVA never reads it).
    vision_extra = ("logit_scale", "logit_bias", "text_projection.weight")
    vision_extra += ("visual_projection.weight",)
    unexpected = [
        k
        for k in vision_reader
        if k not in used
        and not k.startswith(("text_model.", prefix + SIGLIP_IGNORED_PREFIX))
        and not k.endswith(IGNORED_SUFFIXES + vision_extra)
    ]
    if unexpected:
        raise CheckpointError(f"{vision_path}: unexpected key(s) {unexpected[:10]}")

    text_reader = SafetensorsReader(text_path)
    used = set()
    llm_rules = text_rules(config.text)
    llm = _read_tower(
        text_reader, "model.", llm_rules, _tower_shapes(shapes, "llm"), np_dtype, used
    )
    if not config.text.tie_word_embeddings:
        head = Rule(("lm_head", "kernel"), "lm_head.weight", "linear")
        llm.update(
            _read_tower(text_reader, "", [head], _tower_shapes(shapes, "llm"), np_dtype, used)
        )
    _check_all_used(text_reader, used, ("lm_head.weight",))

    fresh = init_params(
        dataclasses.replace(config, scan_layers=False),
        rng if rng is not None else jax.random.key(0),
    )
    proj = jax.tree.map(lambda x: np.asarray(x, np_dtype), fresh["proj"])
    return config, _finish({"img": img, "proj": proj, "llm": llm}, config)


# --- writing --------------------------------------------------------------------------------


def to_hf_tensors(config: ModelConfig, params: Params, dtype: Any = None) -> dict[str, np.ndarray]:
    """Our params -> `{hf_key: array}` in the layout transformers writes."""
    flat = flatten_dict(_unscan(jax.tree.map(np.asarray, params), config))
    towers = (
        ("img", "vision_tower.vision_model.", vision_rules(config.vision)),
        ("proj", "multi_modal_projector.", projector_rules(config)),
        ("llm", "language_model.model.", text_rules(config.text)),
    )
    tensors = {}
    for tower, prefix, rules in towers:
        for rule in rules:
            tensors[prefix + rule.key] = to_hf(rule, flat[(tower, *rule.path)])
    if not config.text.tie_word_embeddings:
        head = Rule(("lm_head", "kernel"), "", "linear")
        tensors["language_model.lm_head.weight"] = to_hf(head, flat[("llm", "lm_head", "kernel")])
    for leaf, keys in hf_family(config).extra_params:
        tensors[keys[0]] = flat[("proj", *leaf)]
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    return tensors


def save_hf(
    model_config: ModelConfig,
    params: Params,
    out_dir: str,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
    merge_lora: bool = False,
) -> None:
    """Write config.json + safetensors that `LlavaForConditionalGeneration.from_pretrained`
    (`LlavaNextForConditionalGeneration` for an anyres model) loads. `dtype` (e.g.
    `ml_dtypes.bfloat16`) casts the weights; default keeps theirs.

    A LoRA model is written merged (`merge_lora=True`: each adapted kernel becomes
    `W + (alpha/rank)·A·B`); without it, it is refused rather than written without its
    adapters. Its adapters alone travel as a PEFT adapter (convert/peft.py)."""
    if model_config.lora.enabled:
        if not merge_lora:
            raise ValueError(
                "save_hf: this is a LoRA model; pass merge_lora=True to write the merged "
                "weights (or export the adapter with convert.peft.export_peft_adapter)"
            )
        model_config, params = merged_lora_model(model_config, params)
    hf_config = model_config_to_hf(model_config)
    tensors = to_hf_tensors(model_config, params, dtype)
    os.makedirs(out_dir, exist_ok=True)
    hf_config.save_pretrained(out_dir)
    write_safetensors(tensors, out_dir, max_shard_bytes=max_shard_bytes)
