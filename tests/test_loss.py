"""The fused, chunked LM head + loss equals the loss on whole logits: values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import (
    WELL_CONDITIONED,
    build,
    flat_params,
    make_batch,
    max_relative,
    run_steps,
)

from llava_jax.models.inputs import Batch
from llava_jax.train.loss import linear_cross_entropy_sums, masked_cross_entropy_sums


def _problem(seed=0, batch=3, length=23, width=16, vocab=40):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((batch, length, width)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((width, vocab)) * 0.3, jnp.float32)
    ids = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    mask = np.zeros((batch, length), np.float32)
    mask[0, 15:] = 1  # the first chunks of the sequence hold no target in any row
    mask[1, 12:20] = 1
    mask[2, 18:] = 1
    return hidden, kernel, ids, jnp.asarray(mask)


def _whole(hidden, kernel, ids, mask, z_loss_weight):
    ce, z, tokens = masked_cross_entropy_sums(hidden @ kernel, ids, mask, z_loss_weight)
    return ce + z, (ce, z, tokens)


def _fused(chunk_size, z_loss_weight):
    def loss(hidden, kernel, ids, mask):
        objective, ce, z, tokens = linear_cross_entropy_sums(
            hidden, kernel, ids, mask, chunk_size=chunk_size, z_loss_weight=z_loss_weight
        )
        return objective, (ce, z, tokens)

    return loss


@pytest.mark.parametrize("chunk_size", [4, 5, 22, 64])
@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-2])
def test_values_and_gradients_equal_whole_logits(chunk_size, z_loss_weight):
    hidden, kernel, ids, mask = _problem()
    grad = jax.value_and_grad
    (ref, ref_parts), ref_grads = grad(_whole, argnums=(0, 1), has_aux=True)(
        hidden, kernel, ids, mask, z_loss_weight
    )
    fused = jax.jit(grad(_fused(chunk_size, z_loss_weight), argnums=(0, 1), has_aux=True))
    (value, parts), grads = fused(hidden, kernel, ids, mask)
    np.testing.assert_allclose(value, ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(parts), np.asarray(ref_parts), rtol=1e-6)
    for ours, theirs in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    # Positions that are no target get exactly no gradient (they are skipped or weighed 0).
    untouched = np.ones(hidden.shape[:2], bool)
    untouched[:, :-1] = np.asarray(mask[:, 1:]) == 0
    assert not np.asarray(grads[0])[untouched].any()


def test_scaled_cotangent_scales_the_gradient():
    hidden, kernel, ids, mask = _problem(1)
    loss = _fused(5, 0.0)
    grads = jax.grad(lambda h, k: 3.0 * loss(h, k, ids, mask)[0], argnums=(0, 1))(hidden, kernel)
    ref = jax.grad(lambda h, k: 3.0 * _whole(h, k, ids, mask, 0.0)[0], argnums=(0, 1))(
        hidden, kernel
    )
    for ours, theirs in zip(grads, ref, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4)])
def test_train_steps_with_fused_loss_equal_whole_logits(mesh_shape):
    """Through the sharded step (vocab split over `tensor`): the same losses and updates."""
    _, state_whole, step_whole = build(mesh_shape, **WELL_CONDITIONED)
    _, state_fused, step_fused = build(mesh_shape, loss_chunk_size=5, **WELL_CONDITIONED)
    state_whole, losses_whole = run_steps(step_whole, state_whole)
    state_fused, losses_fused = run_steps(step_fused, state_fused)
    np.testing.assert_allclose(losses_fused, losses_whole, rtol=1e-5)
    assert max_relative(flat_params(state_fused.params), flat_params(state_whole.params)) <= 1e-5


def test_fused_loss_without_targets_is_zero_and_finite():
    _, state, step = build((8, 1, 1), loss_chunk_size=4)
    batch = make_batch(3)
    batch["loss_mask"][:] = 0
    state, metrics = step(state, Batch.from_arrays(batch))
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
