"""The train step turns LoRA dropout on: its masks change the step, and come from the run's
seed and the step number, so the same state and key give the same step."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from train_fixtures import TINY, flat_params, make_batch

from llava_jax.models.config import LoraConfig
from llava_jax.models.inputs import Batch
from llava_jax.models.llava import init_params
from llava_jax.sharding import DEFAULT_RULES, make_mesh
from llava_jax.train.config import TrainConfig
from llava_jax.train.optimizer import OptimizerConfig, make_optimizer
from llava_jax.train.state import TrainState, init_train_state, make_setup
from llava_jax.train.step import build_train_step

LORA = LoraConfig(rank=4, alpha=8.0)
BATCH = Batch.from_arrays(make_batch(7))


@functools.cache
def _lora_params() -> dict:
    """Host parameters of TINY with adapters whose `lora_b` is not zero: with the fresh
    zeros the dropout on the adapters' input could not change the loss, only gradients."""
    params = init_params(dataclasses.replace(TINY, lora=LORA), jax.random.key(0))
    rng = np.random.default_rng(0)
    flat = {
        path: rng.normal(0.0, 0.5, leaf.shape).astype(np.float32)
        if path[-1] == "lora_b"
        else np.asarray(leaf)
        for path, leaf in flatten_dict(params).items()
    }
    return unflatten_dict(flat)


Stepper = tuple[Callable[[int], TrainState], Callable]


def _stepper(dropout: float) -> Stepper:
    """`(state_at(step_number), step)`: the trainer's step (`build_train_step`, the default
    `TrainConfig`, seed 0) of TINY with LoRA dropout `dropout`, on one device, and fresh
    states with the same parameters (the step donates its input state)."""
    config = dataclasses.replace(TINY, lora=dataclasses.replace(LORA, dropout=dropout))
    # No warmup: the first step's learning rate is not zero, so the adapters move.
    optimizer_config = OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0)
    optimizer, schedule = make_optimizer(optimizer_config, total_steps=10)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    setup = make_setup(config, optimizer, "proj/.*", mesh, DEFAULT_RULES)
    step = build_train_step(TrainConfig(), setup, schedule, 8, 1)
    params = _lora_params()

    def state_at(step_number: int) -> TrainState:
        state = init_train_state(setup, jax.random.key(0), params)
        return state.replace(step=jax.device_put(np.int32(step_number), state.step.sharding))

    return state_at, step


@pytest.fixture(scope="module")
def without_dropout() -> Stepper:
    return _stepper(0.0)


@pytest.fixture(scope="module")
def with_dropout() -> Stepper:
    return _stepper(0.5)


def _run(stepper: Stepper, step_number: int = 0) -> tuple[float, dict[str, np.ndarray]]:
    """(loss, updated adapter factors) of one step from the shared parameters."""
    state_at, step = stepper
    state, metrics = step(state_at(step_number), BATCH)
    factors = {k: v for k, v in flat_params(state.params).items() if "lora_" in k}
    assert factors  # the adapters are in the tree
    return float(metrics["loss"]), factors


def test_dropout_changes_the_step_and_the_same_key_repeats_it(without_dropout, with_dropout):
    plain_loss, plain = _run(without_dropout)
    loss, factors = _run(with_dropout)
    # Dropout 0.5 on the adapters' input (lora_b is not zero): the loss and every adapter
    # update differ from the step without dropout, from the same state and batch.
    assert abs(loss - plain_loss) > 1e-4 * plain_loss, (loss, plain_loss)
    for key in plain:
        assert np.abs(factors[key] - plain[key]).max() > 1e-6, key
    # The same state, batch and key (seed 0, step 0): the same masks, bit for bit.
    again_loss, again = _run(with_dropout)
    assert again_loss == loss
    for key in factors:
        np.testing.assert_array_equal(again[key], factors[key], err_msg=key)


def test_each_step_draws_new_dropout_masks(without_dropout, with_dropout):
    """The key is folded with the step number: from the same parameters the loss (taken
    before the update) differs between step 0 and step 5 with dropout, and not without."""
    assert _run(without_dropout, 5)[0] == _run(without_dropout, 0)[0]
    assert _run(with_dropout, 5)[0] != _run(with_dropout, 0)[0]
