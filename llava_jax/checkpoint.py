"""Orbax checkpoints: a params checkpoint (weights + model config) for weight exchange.

Layout of a params checkpoint directory:

  model_config.json   `ModelConfig.to_dict()`
  params/             Orbax PyTree of `{'img', 'proj', 'llm'}`
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from llava_jax.models.config import ModelConfig

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_params(directory: str, config: ModelConfig, params: Any) -> None:
    """Write `params` and `config` as a params checkpoint (blocks until written)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()


def load_params(directory: str, target: Any = None) -> tuple[ModelConfig, Any]:
    """Read a params checkpoint. `target`: a tree of arrays or `jax.ShapeDtypeStruct`s with
    shardings to restore onto (default: as saved, on the default device)."""
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, MODEL_CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{directory}: not a params checkpoint (no {MODEL_CONFIG_FILE})")
    with open(config_path) as f:
        config = ModelConfig.from_dict(json.load(f))
    checkpointer = ocp.StandardCheckpointer()
    params_path = os.path.join(directory, PARAMS_DIR)
    if target is None:
        metadata = checkpointer.metadata(params_path).item_metadata.tree
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
            metadata,
            is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"),
        )
    return config, checkpointer.restore(params_path, target)
