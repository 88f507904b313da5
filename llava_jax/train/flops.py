"""Model FLOPs of one train step, counted from the architecture, for MFU.

Matrix products only (`2·m·k·n` each), as MFU counts them: the vision tower (only the
layers that run), the projector, the decoder with causal attention counted on its lower
triangle, and the LM head. Rematerialisation is not counted (it is not model work). The
backward pass is counted only where gradients flow: a product's weight gradient when its
weight trains, its input gradient when some trainable weight lies upstream of it. So a
frozen vision tower in front of a trainable projector costs its forward pass only, and a
frozen decoder behind it still costs the input gradients that reach the projector.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from llava_jax.models.config import ModelConfig
from llava_jax.models.llava import feature_states


def _ops(config: ModelConfig, batch: int, length: int, images: int):
    """The step's products in data-flow order: (weight path or None, forward FLOPs)."""
    vision, text = config.vision, config.text
    num_images = batch * images
    tokens = vision.num_tokens  # CLIP's class token and the patches (SigLIP: patches)
    width, mlp = vision.hidden_size, vision.intermediate_size
    patch = 2 * num_images * vision.num_patches * vision.patch_size**2 * vision.num_channels * width
    yield "img/embedding/patch/kernel", patch
    for _ in range(max(feature_states(config))):  # layers that run
        for name in ("query", "key", "value", "out"):
            yield f"img/layers/attn/{name}/kernel", 2 * num_images * tokens * width * width
        yield None, 2 * 2 * num_images * tokens * tokens * width  # scores and values
        yield "img/layers/fc1/kernel", 2 * num_images * tokens * width * mlp
        yield "img/layers/fc2/kernel", 2 * num_images * tokens * mlp * width
    features = num_images * config.num_image_tokens
    width_in = vision.hidden_size * len(config.feature_layers)
    for i in range(1, config.projector_depth + 1):
        name = "fc" if config.projector == "linear" else f"fc{i}"
        yield f"proj/{name}/kernel", 2 * features * width_in * text.hidden_size
        width_in = text.hidden_size
    yield "llm/embed/embedding", 0  # a lookup; trainable, it is upstream of the decoder
    rows, model, head = batch * length, text.hidden_size, text.resolved_head_dim
    q_width, kv_width = text.num_heads * head, text.num_kv_heads * head
    causal_pairs = batch * length * (length + 1) // 2
    for _ in range(text.num_layers):
        yield "llm/layers/attn/query/kernel", 2 * rows * model * q_width
        yield "llm/layers/attn/key/kernel", 2 * rows * model * kv_width
        yield "llm/layers/attn/value/kernel", 2 * rows * model * kv_width
        yield None, 2 * 2 * causal_pairs * q_width  # scores and values, lower triangle
        yield "llm/layers/attn/out/kernel", 2 * rows * q_width * model
        for name in ("gate", "up", "down"):
            yield f"llm/layers/{name}/kernel", 2 * rows * model * text.intermediate_size
    lm_head = "llm/embed/embedding" if text.tie_word_embeddings else "llm/lm_head/kernel"
    yield lm_head, 2 * rows * model * text.vocab_size


def train_step_flops(
    config: ModelConfig,
    *,
    batch: int,
    length: int,
    images: int,
    trainable: Callable[[str], bool],
) -> int:
    """FLOPs of one step on `batch` sequences of `length` tokens with `images` image slots
    each; `trainable(path)` says whether a parameter (scanned path, e.g.
    `llm/layers/up/kernel`) trains."""
    total, upstream = 0, False
    for weight, forward in _ops(config, batch, length, images):
        trains = weight is not None and trainable(weight)
        total += forward
        if weight is None:
            total += 2 * forward if upstream else 0  # gradients of both operands
        else:
            total += forward if trains else 0  # weight gradient
            total += forward if upstream else 0  # input gradient
        upstream = upstream or trains
    return total


def pattern_trains(train_pattern: str) -> Callable[[str], bool]:
    """`trainable` for `train_step_flops` from the run's `train.train_pattern`."""
    compiled = re.compile(train_pattern)
    return lambda path: compiled.fullmatch(path) is not None
