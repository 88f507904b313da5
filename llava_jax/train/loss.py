"""Next-token cross-entropy on the supervised (assistant answer) tokens only.

Two forms with the same sums: from whole logits, or fused with the LM head, chunk by chunk
over the sequence, so the float32 `[B, T, V]` logits never exist whole, and chunks without a
supervised token are skipped (in LLaVA's data the image tokens and prompts, often most of a
row, are never targets).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _token_losses(logits: Array, targets: Array, z_loss_weight: float) -> tuple[Array, Array]:
    """Per-token CE and z-loss, float32[...], from `logits [..., V]` and `targets [...]`."""
    logits = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_normalizer - target_logits, z_loss_weight * jnp.square(log_normalizer)


def masked_cross_entropy_sums(
    logits: Array, input_ids: Array, loss_mask: Array, z_loss_weight: float = 0.0
) -> tuple[Array, Array, Array]:
    """Sums, not means, so micro-batches and devices add up before one division.

    logits: float32[B, T, V]; input_ids: int32[B, T]; loss_mask: float32[B, T], where
    `loss_mask[b, t] = 1` means token t is a target (predicted from position t - 1).
    Returns `(Σ CE·mask, Σ z_loss·mask, Σ mask)`, all float32 scalars.
    """
    cross_entropy, z_loss = _token_losses(logits[:, :-1], input_ids[:, 1:], z_loss_weight)
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(cross_entropy * mask), jnp.sum(z_loss * mask), jnp.sum(mask)


def linear_cross_entropy_sums(
    hidden: Array,
    kernel: Array,
    input_ids: Array,
    loss_mask: Array,
    *,
    chunk_size: int,
    z_loss_weight: float = 0.0,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[Array, Array, Array, Array]:
    """The LM head and the loss fused, chunk by chunk over the sequence.

    hidden: [B, T, D] (final-normed); kernel: [D, V], the LM head (the LLaVA computes
    `hidden @ kernel` in `dtype`, then the loss in float32). Returns `(objective, Σ CE·mask,
    Σ z_loss·mask, Σ mask)`; differentiate `objective` (= CE + z-loss), the other sums are
    reported values without gradients.

    The forward pass computes, per chunk, the logits, the loss and at once its gradients
    with respect to the chunk's hidden states and the kernel; the backward pass only scales
    them. So the logits are never stored nor recomputed (three matmuls per chunk, as an
    unfused step), and a chunk with no supervised target in the batch is skipped.
    """
    batch, length, _ = hidden.shape
    targets = input_ids[:, 1:]  # position t predicts token t + 1
    mask = loss_mask[:, 1:].astype(jnp.float32)
    num_chunks = -(-(length - 1) // chunk_size)
    pad = num_chunks * chunk_size - (length - 1)
    hidden = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))

    def chunks(x: Array) -> Array:  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.swapaxes(x.reshape(batch, num_chunks, chunk_size, *x.shape[2:]), 0, 1)

    loss = _fused_linear_cross_entropy(z_loss_weight, jnp.dtype(dtype))
    objective, ce, z = loss(chunks(hidden), kernel, chunks(targets), chunks(mask))
    return objective, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(z), jnp.sum(mask)


def _fused_linear_cross_entropy(z_loss_weight: float, dtype: jnp.dtype):
    """`(hidden [n,B,c,D], kernel [D,V], targets, mask [n,B,c]) -> (objective, ce, z)` with
    a custom gradient for `objective` (see `linear_cross_entropy_sums`)."""

    def one_chunk(kernel: Array, h: Array, t: Array, m: Array):
        logits = jnp.dot(h.astype(dtype), kernel.astype(dtype)).astype(jnp.float32)
        log_normalizer = jax.nn.logsumexp(logits, axis=-1)
        target_logits = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        ce = jnp.sum((log_normalizer - target_logits) * m)
        z = jnp.sum(z_loss_weight * jnp.square(log_normalizer) * m)
        # d(ce + z)/d logits = softmax·(1 + 2w·lse) - onehot, on supervised positions.
        probs = jnp.exp(logits - log_normalizer[..., None])
        scale = (1.0 + 2.0 * z_loss_weight * log_normalizer) * m
        is_target = jnp.arange(logits.shape[-1]) == t[..., None]  # fused, never stored
        d_logits = probs * scale[..., None] - jnp.where(is_target, m[..., None], 0.0)
        d_logits = d_logits.astype(dtype)
        d_hidden = jnp.dot(d_logits, kernel.astype(dtype).T).astype(h.dtype)
        d_kernel = jnp.einsum("bcd,bcv->dv", h.astype(dtype), d_logits).astype(jnp.float32)
        return ce, z, d_hidden, d_kernel

    def forward(hidden: Array, kernel: Array, targets: Array, mask: Array):
        def body(carry, xs):
            ce_sum, z_sum, d_kernel_sum = carry
            h, t, m = xs

            def skip(kernel, h, t, m):
                zero = jnp.float32(0)
                return zero, zero, jnp.zeros_like(h), jnp.zeros(kernel.shape, jnp.float32)

            ce, z, d_hidden, d_kernel = jax.lax.cond(
                jnp.any(m > 0), one_chunk, skip, kernel, h, t, m
            )
            return (ce_sum + ce, z_sum + z, d_kernel_sum + d_kernel), d_hidden

        zero = jnp.float32(0)
        init = (zero, zero, jnp.zeros(kernel.shape, jnp.float32))
        (ce, z, d_kernel), d_hidden = jax.lax.scan(body, init, (hidden, targets, mask))
        return (ce + z, ce, z), (d_hidden, d_kernel.astype(kernel.dtype), targets, mask)

    @jax.custom_vjp
    def loss(hidden: Array, kernel: Array, targets: Array, mask: Array):
        return forward(hidden, kernel, targets, mask)[0]

    def backward(residuals, cotangents):
        d_hidden, d_kernel, targets, mask = residuals
        g = cotangents[0]  # only the objective carries gradients
        return (
            (g * d_hidden).astype(d_hidden.dtype),
            (g * d_kernel).astype(d_kernel.dtype),
            np.zeros(targets.shape, jax.dtypes.float0),
            jnp.zeros_like(mask),
        )

    loss.defvjp(forward, backward)
    return loss
