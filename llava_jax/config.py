"""The run config: one section per room, each declared once as a typed dataclass.

    model      ModelConfig      llava_jax/models/config.py   architecture and numerics
    init       InitConfig       llava_jax/train/config.py    where the weights start
    data       DataConfig       llava_jax/data/config.py     records, template, images, batch
    mesh       MeshConfig       llava_jax/sharding.py        devices and logical axis rules
    optimizer  OptimizerConfig  llava_jax/train/optimizer.py AdamW, schedule, clipping
    train      TrainConfig      llava_jax/train/config.py    the loop
    eval       EvalConfig       llava_jax/train/config.py    held-out evaluation

`base_config()` is the command-line form (an `ml_collections.ConfigDict` built from the
dataclasses' defaults, which `configs/*.py` change and `--config.a.b=value` overrides);
`RunConfig.from_config(config)` reads it back typed and checked. Adding a field is one line
in its section's dataclass, where the code that uses it can read it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from llava_jax.data.config import DataConfig
from llava_jax.models.config import ModelConfig
from llava_jax.sharding import MeshConfig
from llava_jax.train.config import EvalConfig, InitConfig, TrainConfig
from llava_jax.train.optimizer import OptimizerConfig

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "init": InitConfig,
    "data": DataConfig,
    "mesh": MeshConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole run, typed: what `python -m llava_jax.main` trains."""

    model: ModelConfig
    init: InitConfig
    data: DataConfig
    mesh: MeshConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    eval: EvalConfig

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | dict) -> RunConfig:
        """Each section through its class; errors name the section and field."""
        unknown = sorted(set(config.keys()) - set(SECTIONS))
        if unknown:
            raise ValueError(f"config: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
        return cls(
            **{
                name: section.from_section(config[name], f"config.{name}")
                for name, section in SECTIONS.items()
            }
        )

    def check_sources(self) -> None:
        """Start-up checks of what a training run reads: paths given and existing."""
        self.init.check_paths()
        data = self.data
        if data.source == "llava_json":
            for field in ("json_path", "image_dir", "tokenizer_path"):
                if not getattr(data, field):
                    raise ValueError(f"config.data.source='llava_json' needs config.data.{field}")
        for field in ("json_path", "image_dir", "tokenizer_path"):
            path = getattr(data, field)
            if path and not os.path.exists(path):
                raise FileNotFoundError(f"config.data.{field}: {path} does not exist")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in SECTIONS}


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default, typed; `configs/*.py` change what differs."""
    config = ml_collections.ConfigDict()
    for name, section in SECTIONS.items():
        config[name] = section().to_section()
    return config
