"""AdamW with LLaVA's defaults, warm-up + cosine, clipping, learning rates of their own for
the projector and the vision tower, and freezing by path regex: frozen parameters get no
gradients and no optimizer state at all."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import optax

from llava_jax.models.lora import LORA_FACTORS
from llava_jax.section import Section
from llava_jax.sharding import path_string

# The parameter groups that may have a learning rate of their own (OptimizerConfig).
PROJECTOR_PATTERN = r"proj/.*"
VISION_PATTERN = r"img/.*"
SCHEDULES = ("cosine", "constant")


def compile_train_pattern(train_pattern: str) -> re.Pattern:
    """`config.train.train_pattern` as a regex; a `ValueError` naming it if it is none."""
    try:
        return re.compile(train_pattern)
    except re.error as err:
        raise ValueError(
            f"config.train.train_pattern={train_pattern!r} is not a regex: {err}"
        ) from None


def path_trains(pattern: re.Pattern, path: str) -> bool:
    """Whether the parameter at `path` (`llm/layers/attn/query/kernel`) trains: `pattern`
    (a compiled train pattern) fully matches it, or it is a LoRA factor."""
    return pattern.fullmatch(path) is not None or path.rsplit("/", 1)[-1] in LORA_FACTORS


def trainable_mask(params: Any, train_pattern: str) -> Any:
    """Tree of bools: True where the path (`llm/layers/attn/query/kernel`) fully matches,
    and on every LoRA factor (`…/lora_a`, `…/lora_b`).

    A pattern, or an alternative of it (`proj/.*|llm/.*`), that matches nothing is an error:
    a typo would otherwise silently freeze a tower. With LoRA the pattern may be empty (only
    the adapters train); it may not name a kernel that LoRA adapts (that kernel is the
    frozen base) or an int8 kernel (integers have no gradient).
    """
    compiled = compile_train_pattern(train_pattern)
    paths = [path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    factors = [p for p in paths if p.rsplit("/", 1)[-1] in LORA_FACTORS]
    for alternative in _top_level_alternatives(train_pattern):
        if factors and not alternative:
            continue
        if not any(re.fullmatch(alternative, path) for path in paths):
            raise ValueError(
                f"train pattern {train_pattern!r}: {alternative!r} matches no parameter "
                f"(paths look like {paths[0]!r}, {paths[-1]!r})"
            )
    adapted = {p.rsplit("/", 1)[0] for p in factors}
    for path in paths:
        node, name = path.rsplit("/", 1)
        frozen_base = node in adapted and name in ("kernel", "kernel_int8", "scale")
        if compiled.fullmatch(path) and (frozen_base or name == "kernel_int8"):
            raise ValueError(
                f"train pattern {train_pattern!r} trains {path}, the frozen base of a "
                "LoRA-adapted layer: train the adapters and e.g. the projector only "
                "(config.train.train_pattern='proj/.*')"
            )
    return jax.tree_util.tree_map_with_path(
        lambda p, _: path_trains(compiled, path_string(p)), params
    )


def _top_level_alternatives(pattern: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(pattern):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "|" and depth == 0 and (i == 0 or pattern[i - 1] != "\\"):
            parts.append(pattern[start:i])
            start = i + 1
    return [*parts, pattern[start:]]


def split_trainable(params: Any, mask: Any) -> Any:
    """The trainable part: the same tree with frozen leaves as empty `optax.MaskedNode`s."""
    return jax.tree.map(lambda p, m: p if m else optax.MaskedNode(), params, mask)


def merge_trainable(params: Any, trainable: Any, mask: Any) -> Any:
    """Put the trainable leaves back into the full tree; frozen leaves stay as they are."""
    trainable_leaves = iter(jax.tree.leaves(trainable))
    return jax.tree.map(lambda p, m: next(trainable_leaves) if m else p, params, mask)


def learning_rate_schedule(
    peak: float, total_steps: int, warmup_ratio: float = 0.03, kind: str = "cosine"
) -> optax.Schedule:
    """Linear warm-up from 0 over `ceil(ratio * total)` steps, then cosine (or constant)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
            [warmup],
        )
    if kind != "cosine":
        raise ValueError(f"schedule {kind!r} is not one of 'cosine', 'constant'")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )


def _decays(path: tuple, _: Any) -> bool:
    """Weight decay applies to kernels and embeddings, not to biases or norm scales."""
    return path_string(path).rsplit("/", 1)[-1] not in ("bias", "scale")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Section):
    """AdamW and its schedule (`config.optimizer`), LLaVA's defaults.

    projector_learning_rate: LLaVA's `mm_projector_lr`; `proj/*` then follows its own
    schedule of the same shape. vision_learning_rate: LLaVA-NeXT's `mm_vision_tower_lr`,
    the same for `img/*` (the vision tower trains only where `train.train_pattern` names
    it). grad_clip_norm: 0 or None, no clipping.
    """

    learning_rate: float = 2e-5
    projector_learning_rate: float | None = None
    vision_learning_rate: float | None = None
    warmup_ratio: float = 0.03
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"config.optimizer.schedule={self.schedule!r} is not one of {SCHEDULES}"
            )
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"config.optimizer.warmup_ratio={self.warmup_ratio} must be in [0, 1]")


def make_optimizer(
    config: OptimizerConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW for the trainable tree (see `split_trainable`), and the main schedule."""

    def adamw(peak: float) -> optax.GradientTransformation:
        lr = learning_rate_schedule(peak, total_steps, config.warmup_ratio, config.schedule)
        decay = config.weight_decay
        mask = (lambda tree: jax.tree_util.tree_map_with_path(_decays, tree)) if decay else None
        return optax.adamw(
            lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=decay, mask=mask
        )

    main_schedule = learning_rate_schedule(
        config.learning_rate, total_steps, config.warmup_ratio, config.schedule
    )
    groups = {  # label -> (pattern, peak learning rate), for the groups that have their own
        name: (pattern, rate)
        for name, pattern, rate in (
            ("projector", PROJECTOR_PATTERN, config.projector_learning_rate),
            ("vision", VISION_PATTERN, config.vision_learning_rate),
        )
        if rate is not None
    }
    if not groups:
        tx = adamw(config.learning_rate)
    else:

        def label(path: tuple, _: Any) -> str:
            name = path_string(path)
            return next((k for k, (p, _) in groups.items() if re.fullmatch(p, name)), "default")

        transforms = {name: adamw(rate) for name, (_, rate) in groups.items()}
        tx = optax.multi_transform(
            {**transforms, "default": adamw(config.learning_rate)},
            lambda tree: jax.tree_util.tree_map_with_path(label, tree),
        )
    if config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx, main_schedule
