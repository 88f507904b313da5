"""Which Hugging Face key each of our parameters has, and how its values are laid out there:
the towers' key prefixes in the files transformers writes, and one `Rule` per leaf (our
path, its HF key, its layout):

  linear  torch `[out, in]` <-> our `[*in_dims, *out_dims]` kernel (transpose + reshape)
  conv    torch `[D, C, p, p]` <-> our `[p, p, C, D]`
  plain   same values, possibly reshaped (biases of split heads, norms, embeddings)

Reading and writing the files: convert/hf.py; PEFT adapters: convert/peft.py.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from llava_jax.models.config import ModelConfig, TextConfig, VisionConfig
from llava_jax.models.inputs import ImageGeometry

# Where each tower sits in the files transformers writes (older layout first, then the
# in-memory layout of transformers 5). CLIP vision weights may or may not sit under
# `vision_model.`.
VISION_PREFIXES = (
    "vision_tower.vision_model.",
    "vision_tower.",
    "model.vision_tower.vision_model.",
    "model.vision_tower.",
)
TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
LM_HEAD_KEYS = ("language_model.lm_head.weight", "lm_head.weight")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
NEWLINE_KEYS = ("image_newline", "model.image_newline")  # LLaVA-NeXT; ours: proj/image_newline
# Buffers some exports carry; they are recomputed, never parameters.
IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class HfFamily:
    """How transformers names one kind of LLaVA: its `model_type`, config and model classes
    (and the module defining the model), the config fields beyond LLaVA's, and the
    projector's parameters beyond the three towers' rules: `(our path under proj, its keys,
    the first written)`."""

    model_type: str
    config_class: str
    model_class: str
    module: str
    config_fields: tuple[str, ...] = ()
    extra_params: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()


LLAVA = HfFamily(
    "llava",
    "LlavaConfig",
    "LlavaForConditionalGeneration",
    "transformers.models.llava.modeling_llava",
)
LLAVA_NEXT = HfFamily(
    "llava_next",
    "LlavaNextConfig",
    "LlavaNextForConditionalGeneration",
    "transformers.models.llava_next.modeling_llava_next",
    config_fields=("image_grid_pinpoints",),
    extra_params=((("image_newline",), NEWLINE_KEYS),),
)
LLAVA_ONEVISION = HfFamily(
    "llava_onevision",
    "LlavaOnevisionConfig",
    "LlavaOnevisionForConditionalGeneration",
    "transformers.models.llava_onevision.modeling_llava_onevision",
    config_fields=("image_grid_pinpoints", "vision_aspect_ratio", "video_token_id"),
    extra_params=((("image_newline",), NEWLINE_KEYS),),
)
HF_FAMILIES = {family.model_type: family for family in (LLAVA, LLAVA_NEXT, LLAVA_ONEVISION)}


def hf_family(config: ModelConfig) -> HfFamily:
    """The transformers family that holds `config`: LLaVA-OneVision's for `anyres_max`
    images, LLaVA-NeXT's for tiled images (its grids, its `image_newline`), LLaVA's for one
    square image."""
    geometry = ImageGeometry.of(config)
    if geometry.blended:
        return LLAVA_ONEVISION
    return LLAVA_NEXT if geometry.tiled else LLAVA


@dataclasses.dataclass(frozen=True)
class Rule:
    """One leaf: our path, its HF key (after the tower prefix), and the layout rule."""

    path: tuple[str, ...]
    key: str
    kind: str  # linear | conv | plain
    num_in: int = 1  # linear: how many leading axes of our kernel are input axes


# --- key maps -------------------------------------------------------------------------------


def _attention_rules(prefix: str, hf: str, names: dict[str, str], bias: bool) -> list[Rule]:
    rules = []
    for ours, theirs in names.items():
        num_in = 2 if ours == "out" else 1
        rules.append(
            Rule((*prefix, "attn", ours, "kernel"), f"{hf}{theirs}.weight", "linear", num_in)
        )
        if bias:
            rules.append(Rule((*prefix, "attn", ours, "bias"), f"{hf}{theirs}.bias", "plain"))
    return rules


def _dense_rules(path: tuple[str, ...], key: str, bias: bool) -> list[Rule]:
    rules = [Rule((*path, "kernel"), f"{key}.weight", "linear")]
    if bias:
        rules.append(Rule((*path, "bias"), f"{key}.bias", "plain"))
    return rules


# SigLIP's attention-pooling head (`head.*`), which LLaVA never reads: skipped on load,
# never written.
SIGLIP_IGNORED_PREFIX = "head."


def vision_probe_key(config: VisionConfig) -> str:
    """A key every checkpoint of this vision tower holds (to find its prefix)."""
    if config.has_class_token:
        return "embeddings.class_embedding"
    return "embeddings.patch_embedding.weight"


def vision_rules(config: VisionConfig) -> list[Rule]:
    """Rules for the `img` tower, HF keys relative to the CLIP (or SigLIP) vision model."""
    patch = "embeddings.patch_embedding"
    rules = [Rule(("embedding", "patch", "kernel"), f"{patch}.weight", "conv")]
    norms = [("post_norm", "post_layernorm")]
    if config.has_class_token:  # CLIP
        rules.append(Rule(("embedding", "cls"), "embeddings.class_embedding", "plain"))
        norms.insert(0, ("pre_norm", "pre_layrnorm"))
    else:  # SigLIP: a conv bias, no class token, no pre-norm
        rules.append(Rule(("embedding", "patch", "bias"), f"{patch}.bias", "plain"))
    rules.append(Rule(("embedding", "pos"), "embeddings.position_embedding.weight", "plain"))
    for ours, theirs in norms:
        rules += [
            Rule((ours, "scale"), f"{theirs}.weight", "plain"),
            Rule((ours, "bias"), f"{theirs}.bias", "plain"),
        ]
    attn = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}
    for i in range(config.num_layers):
        layer, hf = (f"layers_{i}",), f"encoder.layers.{i}."
        for ours, theirs in (("attn_norm", "layer_norm1"), ("mlp_norm", "layer_norm2")):
            rules += [
                Rule((*layer, ours, "scale"), f"{hf}{theirs}.weight", "plain"),
                Rule((*layer, ours, "bias"), f"{hf}{theirs}.bias", "plain"),
            ]
        rules += _attention_rules(layer, f"{hf}self_attn.", attn, bias=True)
        rules += _dense_rules((*layer, "fc1"), f"{hf}mlp.fc1", bias=True)
        rules += _dense_rules((*layer, "fc2"), f"{hf}mlp.fc2", bias=True)
    return rules


def text_rules(config: TextConfig) -> list[Rule]:
    """Rules for the `llm` tower, HF keys relative to the LLaMA base model (lm_head apart)."""
    rules = [
        Rule(("embed", "embedding"), "embed_tokens.weight", "plain"),
        Rule(("final_norm", "scale"), "norm.weight", "plain"),
    ]
    attn = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj"}
    for i in range(config.num_layers):
        layer, hf = (f"layers_{i}",), f"layers.{i}."
        rules += [
            Rule((*layer, "attn_norm", "scale"), f"{hf}input_layernorm.weight", "plain"),
            Rule((*layer, "mlp_norm", "scale"), f"{hf}post_attention_layernorm.weight", "plain"),
        ]
        rules += _attention_rules(layer, f"{hf}self_attn.", attn, bias=config.attention_bias)
        if config.qkv_bias and not config.attention_bias:  # Qwen2: q/k/v biases, none on o
            rules += [
                Rule((*layer, "attn", ours, "bias"), f"{hf}self_attn.{attn[ours]}.bias", "plain")
                for ours in ("query", "key", "value")
            ]
        for ours in ("gate", "up", "down"):
            rules += _dense_rules((*layer, ours), f"{hf}mlp.{ours}_proj", bias=config.mlp_bias)
    return rules


def projector_rules(config: ModelConfig) -> list[Rule]:
    rules = []
    for i in (1, 2):
        rules += _dense_rules((f"fc{i}",), f"linear_{i}", bias=config.projector_bias)
    return rules


# --- layout rules ---------------------------------------------------------------------------


def to_ours(rule: Rule, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if rule.kind == "linear":
        return value.T.reshape(shape)
    if rule.kind == "conv":
        return value.transpose(2, 3, 1, 0)
    return value.reshape(shape)


def to_hf(rule: Rule, value: np.ndarray) -> np.ndarray:
    if rule.kind == "linear":
        in_size = math.prod(value.shape[: rule.num_in])
        return value.reshape(in_size, -1).T
    if rule.kind == "conv":
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2 and rule.path[-1] == "bias":  # split-head bias [H, Dh] -> [H * Dh]
        return value.reshape(-1)
    return value


def hf_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    if rule.kind == "linear":
        return (math.prod(shape[rule.num_in :]), math.prod(shape[: rule.num_in]))
    if rule.kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if rule.path[-1] == "bias":
        return (math.prod(shape),)
    return shape
