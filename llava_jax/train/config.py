"""The trainer's sections of the run config: `init`, `train` and `eval`."""

from __future__ import annotations

import dataclasses
import os

from llava_jax.section import Section

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
    """

    mode: str = "scratch"
    seed: int = 0
    hf_path: str | None = None
    vision_path: str | None = None
    text_path: str | None = None
    checkpoint_path: str | None = None
    vocab_follows_tokenizer: bool = True

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
    that takes (overrides `micro_batches`). train_pattern: regex over parameter paths that
    train. loss_chunk_size: the LM head and the loss run fused in chunks of this many
    positions, so the float32 [B, T, vocab] logits never exist (0: whole logits).
    eval_every: 0, only at the end. stop_at_step: leave (with a checkpoint) once this step
    is done, for jobs with a time limit; the schedule still spans num_steps.
    profile_steps: (first, last): a JAX profiler trace of these steps in WORKDIR/profile
    (TensorBoard's profile tab or Perfetto shows it).
    """

    num_steps: int | None = None
    num_epochs: float = 1.0
    micro_batches: int = 1
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
        if self.profile_steps is not None:
            steps = tuple(self.profile_steps)
            if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
                raise ValueError(
                    f"config.train.profile_steps={self.profile_steps}: give (first, last) "
                    "with 1 <= first <= last"
                )
        for field in ("log_every", "checkpoint_every", "keep_checkpoints", "micro_batches"):
            if getattr(self, field) < 1:
                raise ValueError(f"config.train.{field}={getattr(self, field)} must be >= 1")
        if self.loss_chunk_size < 0:
            raise ValueError(
                f"config.train.loss_chunk_size={self.loss_chunk_size} must be >= 0 "
                "(0: the whole logits at once)"
            )

    def micro_batches_for(self, global_batch_size: int, data_parallel_size: int) -> int:
        """Micro-batches per step: from `per_device_batch_size` where set, else
        `micro_batches`. An indivisible combination names the numbers."""
        per_device = self.per_device_batch_size
        if per_device is None:
            return self.micro_batches
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
