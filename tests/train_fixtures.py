"""A tiny LLaVA and batches for training tests (dimensions divisible by 8 for FSDP checks)."""

from __future__ import annotations

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from llava_jax.models.config import ModelConfig, TextConfig, VisionConfig
from llava_jax.models.inputs import Batch
from llava_jax.models.llava import init_params
from llava_jax.sharding import DEFAULT_RULES, make_mesh
from llava_jax.train.optimizer import OptimizerConfig, make_optimizer
from llava_jax.train.state import init_train_state, make_setup
from llava_jax.train.step import jit_train_step, make_train_step

TINY = ModelConfig(
    vision=VisionConfig(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, patch_size=7, image_size=14
    ),
    text=TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
    ),
    image_token_id=63,
)
LENGTH = 16
STAGE_2 = "proj/.*|llm/.*"
# Adam divides by sqrt(v) + eps: with LLaVA's eps=1e-8, weights whose gradient is ~1e-8 move
# by up to lr on float reduction-order noise. Equality tests of the distributed step use a
# larger eps so parameters follow gradients smoothly and the comparison measures the step.
WELL_CONDITIONED = dict(eps=1e-3)


def make_batch(seed: int, batch_size: int = 8, supervised: list[int] | None = None) -> dict:
    """Samples with one image (4 image tokens at 1..4), right padding, and answer masks of
    `supervised[b]` tokens at the end of each sample's real tokens (default: varied)."""
    rng = np.random.default_rng(seed)
    per_image = TINY.num_image_tokens
    input_ids = rng.integers(0, 62, (batch_size, LENGTH)).astype(np.int32)
    input_ids[:, 1 : 1 + per_image] = TINY.image_token_id
    real = rng.integers(LENGTH - 5, LENGTH + 1, batch_size)
    if supervised is None:
        supervised = list(rng.integers(1, 5, batch_size))
    attention_mask = (np.arange(LENGTH)[None] < real[:, None]).astype(np.int32)
    loss_mask = np.zeros((batch_size, LENGTH), np.float32)
    for b in range(batch_size):
        input_ids[b, real[b] :] = 0
        loss_mask[b, real[b] - supervised[b] : real[b]] = 1.0
    images = rng.standard_normal((batch_size, 1, 1, 14, 14, 3)).astype(np.float32)
    return {
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "images": images,
        "image_mask": np.ones((batch_size, 1), bool),
    }


def flat_params(tree) -> dict[str, np.ndarray]:
    """`{'llm/layers/…/kernel': array}` on the host."""
    flat = flatten_dict(jax.device_get(tree))
    return {"/".join(k): np.asarray(v) for k, v in flat.items()}


def max_relative(a: dict, b: dict) -> float:
    """The largest leaf-wise max |a - b| / max |b| of two `flat_params` trees."""
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-12)) for k in a)


def host_params(seed: int = 0) -> dict:
    return jax.tree.map(np.asarray, init_params(TINY, jax.random.key(seed)))


def build(
    mesh_shape=(8, 1, 1),
    *,
    train_pattern: str = STAGE_2,
    micro_batches: int = 1,
    batch_size: int = 8,
    devices=None,
    config: ModelConfig = TINY,
    params=None,
    loss_chunk_size: int = 0,
    **optimizer_kwargs,
):
    """(setup, state, jitted step) on a mesh, from the same host parameters every time."""
    mesh = make_mesh(mesh_shape, devices=devices)
    kwargs = dict(learning_rate=1e-2, warmup_ratio=0.0)
    kwargs.update(optimizer_kwargs)
    optimizer, schedule = make_optimizer(OptimizerConfig(**kwargs), total_steps=10)
    setup = make_setup(config, optimizer, train_pattern, mesh, DEFAULT_RULES)
    state = init_train_state(
        setup, jax.random.key(0), params if params is not None else host_params()
    )
    step = jit_train_step(
        setup,
        make_train_step(
            setup, schedule, micro_batches=micro_batches, loss_chunk_size=loss_chunk_size
        ),
        batch_size,
        micro_batches,
    )
    return setup, state, step


def run_steps(step, state, num_steps: int = 3, batch_size: int = 8):
    losses = []
    for i in range(num_steps):
        state, metrics = step(state, Batch.from_arrays(make_batch(100 + i, batch_size)))
        losses.append(float(metrics["loss"]))
    return state, losses
