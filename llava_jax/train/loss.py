"""Next-token cross-entropy on the supervised (assistant answer) tokens only."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_cross_entropy_sums(
    logits: Array, input_ids: Array, loss_mask: Array, z_loss_weight: float = 0.0
) -> tuple[Array, Array, Array]:
    """Sums, not means, so micro-batches and devices add up before one division.

    logits: float32[B, T, V]; input_ids: int32[B, T]; loss_mask: float32[B, T], where
    `loss_mask[b, t] = 1` means token t is a target (predicted from position t - 1).
    Returns `(Σ CE·mask, Σ z_loss·mask, Σ mask)`, all float32 scalars.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    cross_entropy = log_normalizer - target_logits
    z_loss = z_loss_weight * jnp.square(log_normalizer)
    return jnp.sum(cross_entropy * mask), jnp.sum(z_loss * mask), jnp.sum(mask)
