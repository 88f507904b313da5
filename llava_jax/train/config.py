"""The trainer's sections of the run config (`init`, `train`, `eval`) and the run config
itself: one section per room, each declared once as a typed dataclass.

    model      ModelConfig      llava_jax/models/config.py   architecture and numerics
    init       InitConfig       here                         where the weights start
    data       DataConfig       llava_jax/data/config.py     records, template, images, batch
    mesh       MeshConfig       llava_jax/sharding.py        devices and logical axis rules
    optimizer  OptimizerConfig  llava_jax/train/optimizer.py AdamW, schedule, clipping
    train      TrainConfig      here                         the loop
    eval       EvalConfig       here                         held-out evaluation

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
from llava_jax.data.conversation import TEMPLATE_VERSION
from llava_jax.models.config import ModelConfig
from llava_jax.section import Section
from llava_jax.sharding import MeshConfig
from llava_jax.train.optimizer import OptimizerConfig

INIT_MODES = ("scratch", "hf", "towers", "checkpoint")
_INIT_PATHS = {"hf": ("hf_path",), "towers": ("vision_path", "text_path"), "checkpoint": (
    "checkpoint_path",
)}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class InitConfig(Section):
    """Where the weights start (`config.init`).

    scratch: random; hf: a transformers LLaVA directory; towers: a CLIP and a LLaMA
    checkpoint with a fresh projector; checkpoint: a training workdir (its newest
    checkpoint) or a params checkpoint. vocab_follows_tokenizer: the embedding table grows to
    the tokenizer's vocabulary (added `<image>`, pad), as LLaVA resizes its embeddings.
    accept_new_tokenizer: continue a workdir with a tokenizer other than the one it was
    trained with (refused by default: the embeddings belong to the old ids).
    """

    mode: str = "scratch"
    seed: int = 0
    hf_path: str | None = None
    vision_path: str | None = None
    text_path: str | None = None
    checkpoint_path: str | None = None
    vocab_follows_tokenizer: bool = True
    accept_new_tokenizer: bool = False

    def __post_init__(self):
        if self.mode not in INIT_MODES:
            raise ValueError(f"config.init.mode={self.mode!r} is not one of {INIT_MODES}")

    def check_paths(self) -> None:
        """The paths this mode reads are given and exist (named in the error)."""
        for field in _INIT_PATHS.get(self.mode, ()):
            path = getattr(self, field)
            if not path:
                raise ValueError(f"config.init.mode={self.mode!r} needs config.init.{field}")
            if not os.path.exists(path):
                raise FileNotFoundError(f"config.init.{field}: {path} does not exist")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """The loop (`config.train`).

    num_steps: default `num_epochs` of the data. per_device_batch_size: sequences per device
    in one forward/backward pass, the global batch accumulated over as many micro-batches as
    that takes (overrides `accumulation_steps`, the micro-batches given directly).
    train_pattern: regex over parameter paths that train. loss_chunk_size: the LM head and
    the loss run fused in chunks of this many positions, so the float32 [B, T, vocab] logits
    never exist (0: whole logits).
    eval_every: 0, only at the end. stop_at_step: leave (with a checkpoint) once this step
    is done, for jobs with a time limit; the schedule still spans num_steps.
    profile_steps: (first, last): a JAX profiler trace of these steps in WORKDIR/profile
    (TensorBoard's profile tab or Perfetto shows it).
    """

    num_steps: int | None = None
    num_epochs: float = 1.0
    accumulation_steps: int = 1  # micro-batches a step accumulates (see per_device_batch_size)
    per_device_batch_size: int | None = None
    train_pattern: str = "proj/.*|llm/.*"
    z_loss_weight: float = 0.0
    loss_chunk_size: int = 128
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 0
    stop_at_step: int | None = None
    profile_steps: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(
                f"config.train.num_steps={self.num_steps} must be >= 1; for a number of "
                "epochs instead, leave it unset (None) and set config.train.num_epochs "
                "(e.g. 1)"
            )
        if self.num_epochs <= 0:
            raise ValueError(f"config.train.num_epochs={self.num_epochs} must be > 0")
        if self.profile_steps is not None:
            steps = tuple(self.profile_steps)
            if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
                raise ValueError(
                    f"config.train.profile_steps={self.profile_steps}: give (first, last) "
                    "with 1 <= first <= last"
                )
        for field in ("log_every", "checkpoint_every", "keep_checkpoints", "accumulation_steps"):
            if getattr(self, field) < 1:
                raise ValueError(f"config.train.{field}={getattr(self, field)} must be >= 1")
        if self.eval_every < 0:
            raise ValueError(f"config.train.eval_every={self.eval_every} must be >= 0 (0: at end)")
        if self.loss_chunk_size < 0:
            raise ValueError(
                f"config.train.loss_chunk_size={self.loss_chunk_size} must be >= 0 "
                "(0: the whole logits at once)"
            )

    def accumulation_steps_for(self, global_batch_size: int, data_parallel_size: int) -> int:
        """Micro-batches per step: from `per_device_batch_size` where set, else
        `accumulation_steps`. An indivisible combination names the numbers."""
        per_device = self.per_device_batch_size
        if per_device is None:
            return self.accumulation_steps
        if per_device < 1 or global_batch_size % (per_device * data_parallel_size):
            raise ValueError(
                f"config.train.per_device_batch_size={per_device}: the global batch "
                f"{global_batch_size} is not a multiple of {per_device} x "
                f"{data_parallel_size} data-parallel devices"
            )
        return global_batch_size // (per_device * data_parallel_size)


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    """Held-out evaluation (`config.eval`): loss on `loss_batches` batches, and answer
    accuracy by greedy decoding on every assistant turn of `num_records` records."""

    num_records: int = 200
    max_new_tokens: int = 16
    batch_size: int = 32
    loss_batches: int = 4

    def __post_init__(self):
        for field, least in (
            ("batch_size", 1),
            ("max_new_tokens", 1),
            ("num_records", 0),
            ("loss_batches", 0),
        ):
            if getattr(self, field) < least:
                raise ValueError(f"config.eval.{field}={getattr(self, field)} must be >= {least}")


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
        """Start-up checks of what a training run reads: paths given and existing, and a
        conversation format that training writes."""
        self.init.check_paths()
        data = self.data
        if data.template_version != TEMPLATE_VERSION:
            raise ValueError(
                f"config.data.template_version={data.template_version}: training uses the "
                f"current version, {TEMPLATE_VERSION} (LLaVA's own tokens and targets); "
                "version 1 is kept only so that models trained with it still answer"
            )
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
