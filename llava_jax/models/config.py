"""Architecture of a LLaVA model: frozen dataclasses, hashable, so Flax modules can hold them.

`ModelConfig` is what `load_hf` returns and what `Llava(config)` takes. It holds the
architecture (vision tower, projector, decoder, how they are joined) and the numerics
that change how the same weights are run (compute dtype, parameter dtype, scan, remat).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from llava_jax.models.inputs import ImageGeometry
from llava_jax.section import Section

# Remat policies as maxtext names them (models/layers.py says what each keeps): from
# `none` (keep every activation) through `minimal` (keep every projection) to `full`
# (keep only each layer's input).
REMAT_POLICIES = (
    "none",
    "minimal",
    "minimal_with_context",
    "save_dot_with_context_except_mlp",
    "save_dot_except_mlpwi",
    "save_dot_except_mlp",
    "save_qkv_proj",
    "save_out_proj",
    "full",
)
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "dot_product", "cudnn", "splash")
ROPE_TYPES = ("default", "linear", "llama3")
FEATURE_SELECT_STRATEGIES = ("default", "full")
VISION_MODEL_TYPES = ("clip", "siglip")
LORA_BASE_DTYPES = ("param", "bfloat16", "int8")
_MLP_PROJECTOR = re.compile(r"^mlp(\d+)x_gelu$")
_ANYRES_MAX = re.compile(r"^anyres_max_([1-9]\d*)$")


@dataclasses.dataclass(frozen=True)
class VisionConfig(Section):
    """CLIP vision transformer (defaults: ViT-L/14 at 336 pixels, as in LLaVA-1.5).

    `model_type`: "clip" (a class token, a conv without bias, a pre-norm) or "siglip"
    (SigLIP, as in LLaVA-OneVision: no class token, a conv with bias, positions for the
    patches only, no pre-norm; the same layers)."""

    model_type: str = "clip"  # clip | siglip
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 336
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        if self.model_type not in VISION_MODEL_TYPES:
            raise ValueError(
                f"vision.model_type={self.model_type!r} is not one of {VISION_MODEL_TYPES}"
            )

    @property
    def has_class_token(self) -> bool:
        """CLIP's hidden states start with a class token; SigLIP's are the patches only."""
        return self.model_type == "clip"

    @property
    def num_tokens(self) -> int:
        """Tokens of each hidden state: the patches, and CLIP's class token."""
        return self.num_patches + int(self.has_class_token)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class RopeConfig(Section):
    """Rotary embedding, as transformers' `rope_parameters` describes it."""

    theta: float = 10000.0
    type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class TextConfig(Section):
    """LLaMA-family decoder (defaults: LLaMA/Vicuna-7B). `model_type`: the checkpoint
    family it reads and writes as; a Mistral is LLaMA's decoder (with full attention:
    sliding-window attention is not built); a Qwen2 is LLaMA's decoder with biases on the
    q/k/v projections only (`qkv_bias`). `attention_bias`: biases on all four attention
    projections (LLaMA's `attention_bias`); `qkv_bias`: on q, k and v (not the output)."""

    model_type: str = "llama"  # llama | mistral | qwen2
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in TEXT_MODEL_TYPES:
            raise ValueError(
                f"text.model_type={self.model_type!r} is not one of {TEXT_MODEL_TYPES}"
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class LoraConfig(Section):
    """Low-rank adapters (`config.model.lora`, models/lora.py): rank 0 = none.

    Each dense layer whose path (`llm/layers/attn/query`, scanned, or `llm/layers_3/…`)
    fully matches `target` gets `lora_a: [*contracted, rank]` (random) and
    `lora_b: [rank, *features]` (zeros) and computes `x·W + (alpha/rank)·(dropout(x)·A)·B`.
    The default targets every dense layer of the decoder's blocks, as LLaVA's
    `find_all_linear_names` does (not the LM head, projector or vision tower).
    base_dtype: how the adapted (frozen) kernels are stored: `param` (model.param_dtype),
    `bfloat16`, or `int8` (per output channel, models/quantize.py; QLoRA's idea).
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = r"llm/layers(_\d+)?/.*"
    base_dtype: str = "param"

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank} must be >= 0 (0: no LoRA)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if not math.isfinite(self.alpha):  # alpha/rank scales every adapter's output
            raise ValueError(f"lora.alpha={self.alpha} is not a finite number")
        if self.base_dtype not in LORA_BASE_DTYPES:
            raise ValueError(
                f"lora.base_dtype={self.base_dtype!r} is not one of {LORA_BASE_DTYPES}"
            )
        try:
            re.compile(self.target)
        except re.error as err:
            raise ValueError(f"lora.target={self.target!r} is not a regex: {err}") from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank, PEFT's scaling (without rsLoRA)."""
        return self.alpha / self.rank

    def adapts(self, path: tuple[str, ...] | str) -> bool:
        """Whether the dense layer at module `path` gets adapters."""
        if not self.enabled:
            return False
        name = path if isinstance(path, str) else "/".join(path)
        return re.fullmatch(self.target, name) is not None


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """A whole LLaVA: vision tower, projector, decoder, and the numerics to run them."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    projector: str = "mlp2x_gelu"  # linear | mlp{N}x_gelu | identity
    projector_bias: bool = True
    projector_act: str = "gelu"
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"  # default: drop CLS | full (SigLIP)
    image_token_id: int = 32000
    # LLaVA-NeXT ("anyres"): grid resolutions (height, width), multiples of the vision
    # tower's image size; empty for LLaVA-1.5's single square image (models/inputs.py).
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # LLaVA-OneVision: "anyres_max_N" caps a lone image's grid features near N tiles' worth
    # (downsampled bilinearly beyond 10% more), gives each image of a several-image prompt
    # one square tile and a newline, and takes videos; "" for LLaVA-1.5 and LLaVA-NeXT.
    vision_aspect_ratio: str = ""
    video_token_id: int | None = None  # OneVision's `<video>` (None: no video)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"  # REMAT_POLICIES
    attention: str = "auto"  # ATTENTION_IMPLEMENTATIONS (models/attention.py)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    def __post_init__(self):
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        pinpoints = tuple(tuple(int(v) for v in p) for p in self.image_grid_pinpoints)
        object.__setattr__(self, "image_grid_pinpoints", pinpoints)
        self.validate()

    # Fields that say how the same weights are run, not what the architecture is.
    NUMERICS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention")

    def numerics(self) -> dict[str, Any]:
        """`{dtype, param_dtype, scan_layers, remat_policy, attention}` of this config."""
        return {name: getattr(self, name) for name in self.NUMERICS}

    # --- derived sizes -------------------------------------------------------------------
    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else tuple(layer)

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image becomes in the sequence (576 for ViT-L/14-336, CLS dropped;
        SigLIP's patches, with no class token, under `full`)."""
        if self.vision_feature_select_strategy == "default":
            return self.vision.num_patches
        return self.vision.num_tokens

    @property
    def max_grid_features(self) -> int | None:
        """OneVision's N of `anyres_max_N` (None: grids are never downsampled)."""
        match = _ANYRES_MAX.match(self.vision_aspect_ratio)
        return int(match.group(1)) if match else None

    @property
    def media_token_ids(self) -> tuple[int, ...]:
        """The ids whose positions take image features: `<image>`'s, and `<video>`'s."""
        video = () if self.video_token_id is None else (self.video_token_id,)
        return (self.image_token_id, *video)

    @property
    def projector_depth(self) -> int:
        """Number of dense layers in the projector (0 for identity)."""
        if self.projector == "identity":
            return 0
        if self.projector == "linear":
            return 1
        return int(_MLP_PROJECTOR.match(self.projector).group(1))

    def validate(self) -> None:
        """Raise ValueError naming the field and value that cannot be run."""
        num_states = self.vision.num_layers + 1  # embeddings, then each layer's output
        for layer in self.feature_layers:
            if not isinstance(layer, int) or not -num_states <= layer < num_states:
                raise ValueError(
                    f"vision_feature_layer={self.vision_feature_layer!r}: {layer!r} is not a "
                    f"hidden-state index of a {self.vision.num_layers}-layer vision tower "
                    f"(valid: {-num_states}..{num_states - 1})"
                )
        if self.vision_feature_select_strategy not in FEATURE_SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r} "
                f"is not one of {FEATURE_SELECT_STRATEGIES}"
            )
        if self.vision_feature_select_strategy == "default" and not self.vision.has_class_token:
            raise ValueError(
                f"vision_feature_select_strategy='default' drops the class token, which a "
                f"vision.model_type={self.vision.model_type!r} tower has none of: use 'full'"
            )
        if self.projector not in ("linear", "identity") and not _MLP_PROJECTOR.match(
            self.projector
        ):
            raise ValueError(
                f"projector={self.projector!r} is not one of linear, mlp{{N}}x_gelu, identity"
            )
        if self.projector == "identity":
            width = self.vision.hidden_size * len(self.feature_layers)
            if width != self.text.hidden_size:
                raise ValueError(
                    f"projector='identity' needs vision features ({width}) as wide as "
                    f"text.hidden_size ({self.text.hidden_size})"
                )
        if self.vision_aspect_ratio and not (
            _ANYRES_MAX.match(self.vision_aspect_ratio) and self.image_grid_pinpoints
        ):
            raise ValueError(
                f"vision_aspect_ratio={self.vision_aspect_ratio!r} is not 'anyres_max_N' (N >= "
                "1) with image_grid_pinpoints (OneVision), nor '' (LLaVA-1.5 and NeXT)"
            )
        if self.video_token_id is not None and (
            not self.vision_aspect_ratio or self.video_token_id == self.image_token_id
        ):
            raise ValueError(
                f"video_token_id={self.video_token_id} needs a OneVision model "
                "(vision_aspect_ratio='anyres_max_N') and an id other than image_token_id"
            )
        ImageGeometry.of(self)  # the grids, and the feature strategy tiles need
        if self.lora.adapts("llm/lm_head"):
            raise ValueError(
                f"lora.target={self.lora.target!r} adapts the LM head (llm/lm_head), which the "
                "fused loss reads as a plain kernel: leave it out of the target"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention={self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
            )
        if self.text.rope.type not in ROPE_TYPES:
            raise ValueError(f"text.rope.type={self.text.rope.type!r} is not one of {ROPE_TYPES}")
        if self.text.num_heads % self.text.num_kv_heads:
            raise ValueError(
                f"text.num_heads={self.text.num_heads} is not a multiple of "
                f"text.num_kv_heads={self.text.num_kv_heads}"
            )
        if self.vision.hidden_size % self.vision.num_heads:
            raise ValueError(
                f"vision.hidden_size={self.vision.hidden_size} is not a multiple of "
                f"vision.num_heads={self.vision.num_heads}"
            )
