"""The run config: one `ml_collections.ConfigDict` with a section per room.

`base_config()` holds every field with a default, typed, so `configs/*.py` only change
what differs and a command-line override of an unknown key or of the wrong type fails
at start-up (the dict is locked). Sections:

  model      ModelConfig fields (architecture and numerics); `vocab_follows_tokenizer`
  init       where the weights start: scratch | hf | towers | checkpoint
  data       DataConfig fields (llava_jax/data/pipeline.py)
  mesh       shape (data, fsdp, tensor), dcn_shape for multi-slice pods, logical rules
  optimizer  AdamW, schedule, clipping, projector learning rate
  train      steps/epochs, micro-batches, what trains, logging/checkpoint/eval cadence
  eval       held-out answer accuracy by greedy decoding
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from llava_jax.data.pipeline import DataConfig
from llava_jax.models.config import ModelConfig
from llava_jax.sharding import DEFAULT_RULES

INIT_MODES = ("scratch", "hf", "towers", "checkpoint")


def _section(values: dict[str, Any], optional: dict[str, type]) -> ml_collections.ConfigDict:
    """A ConfigDict where `None` defaults become typed placeholders (overridable later)."""
    section = ml_collections.ConfigDict()
    for key, value in values.items():
        if value is None:
            section[key] = config_dict.placeholder(optional[key])
        elif isinstance(value, dict):
            section[key] = _section(value, optional)
        else:
            section[key] = value
    return section


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    model = ModelConfig().to_dict()
    model["text"]["eos_token_id"] = 2
    model["text"]["pad_token_id"] = 0
    config.model = _section(model, {"head_dim": int})
    # The embedding table grows to the tokenizer's vocabulary (added <image>, pad)
    # unless pinned, as LLaVA resizes its token embeddings.
    config.model.vocab_follows_tokenizer = True

    config.init = ml_collections.ConfigDict()
    config.init.mode = "scratch"
    config.init.seed = 0
    config.init.hf_path = config_dict.placeholder(str)
    config.init.vision_path = config_dict.placeholder(str)
    config.init.text_path = config_dict.placeholder(str)
    # A training workdir (its newest checkpoint) or a params checkpoint directory.
    config.init.checkpoint_path = config_dict.placeholder(str)

    data = dataclasses.asdict(DataConfig())
    data["image_mean"] = tuple(data["image_mean"])
    data["image_std"] = tuple(data["image_std"])
    optional = {f.name: str for f in dataclasses.fields(DataConfig)}
    optional.update(num_epochs=int)
    config.data = _section(data, optional)

    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    config.mesh.dcn_shape = config_dict.placeholder(tuple)  # multi-slice: e.g. (2, 1, 1)
    config.mesh.rules = DEFAULT_RULES

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 2e-5
    config.optimizer.projector_learning_rate = config_dict.placeholder(float)
    config.optimizer.warmup_ratio = 0.03
    config.optimizer.schedule = "cosine"
    config.optimizer.weight_decay = 0.0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.grad_clip_norm = 1.0

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = config_dict.placeholder(int)  # default: num_epochs of the data
    config.train.num_epochs = 1.0
    config.train.micro_batches = 1
    # Sequences per device in one forward/backward pass; the global batch is accumulated
    # over as many micro-batches as that takes (overrides `micro_batches`; unset: one pass).
    config.train.per_device_batch_size = config_dict.placeholder(int)
    config.train.train_pattern = "proj/.*|llm/.*"  # regex over parameter paths
    config.train.z_loss_weight = 0.0
    # The LM head and the loss run fused in chunks of this many positions, so the float32
    # [B, T, vocab] logits never exist whole; 0 computes the whole logits at once.
    config.train.loss_chunk_size = 128
    config.train.seed = 0
    config.train.log_every = 10
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.eval_every = 0  # 0: only at the end
    # Leave (with a checkpoint) once this step is done; the schedule still spans num_steps.
    # For jobs with a time limit; running again continues.
    config.train.stop_at_step = config_dict.placeholder(int)

    config.eval = ml_collections.ConfigDict()
    config.eval.num_records = 200  # held-out records; each assistant turn is a question
    config.eval.max_new_tokens = 16
    config.eval.batch_size = 32
    config.eval.loss_batches = 4  # held-out batches for the eval loss
    return config


def model_config_from(config: ml_collections.ConfigDict, **replace: Any) -> ModelConfig:
    """The `ModelConfig` a run config describes (`replace`: fields decided at run time)."""
    values = config.model.to_dict()
    values.pop("vocab_follows_tokenizer", None)
    model = ModelConfig.from_dict(values)
    return dataclasses.replace(model, **replace) if replace else model


def micro_batches(config: ml_collections.ConfigDict, data_parallel_size: int) -> int:
    """Micro-batches per step: from `train.per_device_batch_size` where set, else
    `train.micro_batches`. An indivisible combination names the numbers."""
    per_device = config.train.per_device_batch_size
    if per_device is None:
        return config.train.micro_batches
    global_batch = config.data.global_batch_size
    if per_device < 1 or global_batch % (per_device * data_parallel_size):
        raise ValueError(
            f"config.train.per_device_batch_size={per_device}: the global batch "
            f"{global_batch} is not a multiple of {per_device} x {data_parallel_size} "
            "data-parallel devices"
        )
    return global_batch // (per_device * data_parallel_size)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Start-up checks that name the field: paths that must exist, choices, numbers."""
    if config.init.mode not in INIT_MODES:
        raise ValueError(f"config.init.mode={config.init.mode!r} is not one of {INIT_MODES}")
    needed = {
        "hf": ("hf_path",),
        "towers": ("vision_path", "text_path"),
        "checkpoint": ("checkpoint_path",),
    }.get(config.init.mode, ())
    for field in needed:
        path = config.init[field]
        if not path:
            raise ValueError(f"config.init.mode={config.init.mode!r} needs config.init.{field}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"config.init.{field}: {path} does not exist")
    data = config.data
    if data.source == "llava_json":
        for field in ("json_path", "image_dir", "tokenizer_path"):
            if not data[field]:
                raise ValueError(f"config.data.source='llava_json' needs config.data.{field}")
            if not os.path.exists(data[field]):
                raise FileNotFoundError(f"config.data.{field}: {data[field]} does not exist")
    elif data.source != "synthetic":
        raise ValueError(f"config.data.source={data.source!r} is not 'synthetic' or 'llava_json'")
    if data.tokenizer_path and not os.path.exists(data.tokenizer_path):
        raise FileNotFoundError(f"config.data.tokenizer_path: {data.tokenizer_path} does not exist")
    if config.train.loss_chunk_size < 0:
        raise ValueError(
            f"config.train.loss_chunk_size={config.train.loss_chunk_size} must be >= 0 "
            "(0: the whole logits at once)"
        )
    for field in ("log_every", "checkpoint_every", "keep_checkpoints", "micro_batches"):
        if config.train[field] < 1:
            raise ValueError(f"config.train.{field}={config.train[field]} must be >= 1")


# --- LLaVA recipes (configs/llava_v15.py, configs/llava_v1.py) ------------------------------

# CLIP ViT-L/14 at 336 px: 576 image tokens (CLS dropped).
VIT_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_layers=24,
    num_heads=16,
    patch_size=14,
    image_size=336,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
)
VICUNA = {
    "7b": dict(
        hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32
    ),
    "13b": dict(
        hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40
    ),
}
STAGES = {
    # stage: (trains, template, global batch, learning rate, init mode)
    "pretrain": ("proj/.*", "plain", 256, 1e-3, "towers"),
    "finetune": ("proj/.*|llm/.*", "vicuna_v1", 128, 2e-5, "checkpoint"),
}


def parse_recipe_arg(arg: str | None, default: str = "7b,pretrain") -> tuple[str, str]:
    size, _, stage = (arg or default).partition(",")
    if size not in VICUNA or stage not in STAGES:
        raise ValueError(
            f"config argument {arg!r}: expected SIZE,STAGE with SIZE in {sorted(VICUNA)} "
            f"and STAGE in {sorted(STAGES)}, e.g. configs/llava_v15.py:7b,pretrain"
        )
    return size, stage


def apply_recipe(config, size: str, stage: str, projector: str) -> None:
    """The LLaVA model and stage settings shared by LLaVA-1 and LLaVA-1.5."""
    trains, template, batch, lr, init_mode = STAGES[stage]
    model = config.model
    model.vision.update(VIT_L_336)
    model.text.update(VICUNA[size])
    model.text.update(vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096)
    model.projector = projector
    model.vision_feature_layer = -2
    model.vision_feature_select_strategy = "default"
    model.dtype = "bfloat16"
    model.param_dtype = "float32"
    model.scan_layers = True
    # Fits a 16 GiB v5e chip and a 32 GiB v4 chip at LLaVA's global batch, as
    # `python -m llava_jax.plan` shows: 2 sequences per device per pass; 7B keeps every
    # projection for the backward pass, 13B recomputes each layer.
    model.remat_policy = "minimal" if size == "7b" else "full"
    config.train.per_device_batch_size = 2

    config.init.mode = init_mode
    config.data.source = "llava_json"
    config.data.template = template
    config.data.image_aspect = "pad"
    config.data.max_len = 2048
    config.data.global_batch_size = batch
    config.data.num_workers = 8

    config.optimizer.learning_rate = lr
    config.optimizer.warmup_ratio = 0.03
    config.optimizer.schedule = "cosine"
    config.optimizer.weight_decay = 0.0
    config.train.train_pattern = trains
    config.train.num_epochs = 1.0
    config.train.log_every = 10
    config.train.checkpoint_every = 500
    config.mesh.shape = (1, -1, 1)  # FSDP over every device
