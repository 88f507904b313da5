"""Train-step FLOPs for MFU, against a count done by hand for the tiny model."""

from __future__ import annotations

import dataclasses

from train_fixtures import TINY

from llava_jax.train.flops import pattern_trains, train_step_flops

# TINY, by hand. Vision: 14 px images, 7 px patches -> 4 patches + CLS = 5 tokens, width 32,
# MLP 64; LLaVA's feature layer -2 of 2 layers: one layer runs. Projector 32 -> 32 -> 32 on
# 4 image tokens. Decoder: width 32, 4 heads x 8, 2 KV heads, MLP 64, 2 layers, vocab 64.
# A batch of 8 rows of 16 tokens, one image each.
IMAGES, ROWS = 8, 8 * 16
PATCH = IMAGES * 4 * (7 * 7 * 3) * 32 * 2
VISION_LAYER = IMAGES * (
    4 * (2 * 5 * 32 * 32)  # q, k, v, out
    + 2 * (2 * 5 * 5 * 32)  # scores and values over all 5 x 5 pairs
    + 2 * (2 * 5 * 32 * 64)  # fc1, fc2
)
PROJ_LAYER = 2 * (IMAGES * 4) * 32 * 32  # fc1 and fc2 are each this
DENSE = ROWS * 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64)  # q k v out gate up down
ATTENTION = 2 * 2 * (8 * (16 * 17 // 2)) * 32  # causal: 136 query-key pairs per row
LM_HEAD = 2 * ROWS * 32 * 64


def _flops(pattern):
    return train_step_flops(TINY, batch=8, length=16, images=1, trainable=pattern_trains(pattern))


def test_everything_trains():
    forward = PATCH + VISION_LAYER + 2 * PROJ_LAYER + 2 * (DENSE + ATTENTION) + LM_HEAD
    # Every product: forward, weight gradient, input gradient (both operands' gradients for
    # attention) - except the patch embedding, whose input (the pixels) needs none.
    assert _flops(".*") == 3 * forward - PATCH


def test_stage_1_trains_the_projector_only():
    expected = (
        PATCH + VISION_LAYER  # frozen and upstream of everything that trains: forward only
        + PROJ_LAYER * 2  # fc1: forward + weight gradient (its input needs none)
        + PROJ_LAYER * 3  # fc2: forward + weight + input gradient
        + 2 * (2 * DENSE + 3 * ATTENTION)  # frozen decoder: forward + input gradients
        + 2 * LM_HEAD  # frozen head: forward + input gradient
    )  # fmt: skip
    assert _flops("proj/.*") == expected


def test_stage_2_trains_projector_and_decoder():
    expected = PATCH + VISION_LAYER + PROJ_LAYER * 5 + 3 * 2 * (DENSE + ATTENTION) + 3 * LM_HEAD
    assert _flops("proj/.*|llm/.*") == expected


def test_deeper_feature_layer_runs_more_of_the_vision_tower():
    last = dataclasses.replace(TINY, vision_feature_layer=-1)
    extra = train_step_flops(
        last, batch=8, length=16, images=1, trainable=pattern_trains("proj/.*")
    ) - _flops("proj/.*")
    assert extra == VISION_LAYER
