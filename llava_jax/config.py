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
    config.train.train_pattern = "proj/.*|llm/.*"  # regex over parameter paths
    config.train.z_loss_weight = 0.0
    config.train.seed = 0
    config.train.log_every = 10
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.eval_every = 0  # 0: only at the end

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
    for field in ("log_every", "checkpoint_every", "keep_checkpoints", "micro_batches"):
        if config.train[field] < 1:
            raise ValueError(f"config.train.{field}={config.train[field]} must be >= 1")
