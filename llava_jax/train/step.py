"""The train step: a pure `train_step(state, batch) -> (state, metrics)`, jitted once.

Loss = Σ(CE·mask) / Σ(mask) over the whole global batch in float32. With k micro-batches
the sums run over all of them before the one division, so k micro-batches of B/k equal
one batch of B. Gradients are taken only for the trainable leaves.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llava_jax.models.inputs import Batch
from llava_jax.models.llava import Llava, lm_head_kernel
from llava_jax.sharding import BATCH_AXES, batch_sharding, check_batch_size, replicated
from llava_jax.train.config import TrainConfig
from llava_jax.train.loss import linear_cross_entropy_sums, masked_cross_entropy_sums
from llava_jax.train.optimizer import merge_trainable, split_trainable
from llava_jax.train.state import TrainSetup, TrainState


def loss_sums(
    model: Llava,
    params: Any,
    batch: Batch,
    *,
    loss_chunk_size: int = 0,
    z_loss_weight: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`(objective, Σ CE·mask, Σ z_loss·mask, Σ mask)` of `model` on `batch`; gradients
    flow through `objective` (= CE + z-loss). With `loss_chunk_size`, the LM head and the
    loss run fused, in chunks of that many positions (train/loss.py). `dropout_rng` turns
    on the model's dropout (LoRA's); None runs it deterministically."""
    inputs = batch.model_inputs()
    rngs = {} if dropout_rng is None else {"rngs": {"dropout": dropout_rng}}
    if not loss_chunk_size:
        logits = model.apply({"params": params}, **inputs, **rngs)
        with jax.named_scope("lm_head_loss"):
            ce, z, tokens = masked_cross_entropy_sums(
                logits, batch.input_ids, batch.loss_mask, z_loss_weight
            )
        return ce + z, ce, z, tokens
    hidden = model.apply({"params": params}, **inputs, return_hidden=True, **rngs)
    with jax.named_scope("lm_head_loss"):
        return linear_cross_entropy_sums(
            hidden,
            lm_head_kernel(model.config, params),
            batch.input_ids,
            batch.loss_mask,
            chunk_size=loss_chunk_size,
            z_loss_weight=z_loss_weight,
            dtype=jnp.dtype(model.config.dtype),
        )


def make_train_step(
    setup: TrainSetup,
    learning_rate: optax.Schedule,
    *,
    micro_batches: int = 1,
    z_loss_weight: float = 0.0,
    loss_chunk_size: int = 0,
    seed: int = 0,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step function (not yet jitted; see `jit_train_step`).

    batch: `input_ids int32[B, T]`, `loss_mask float32[B, T]`, `attention_mask int32[B, T]`
    (segment ids, 0 = padding), optionally `positions int32[B, T]`, `images float32[B, I, H,
    W, 3]` and `image_mask bool[B, I]`. A model with
    dropout (LoRA's) draws its masks from `seed` folded with the step and micro-batch, so a
    resumed run draws the same ones.
    """
    model = setup.model
    mask = setup.mask
    uses_dropout = model.config.lora.enabled and model.config.lora.dropout > 0

    def summed_loss(
        trainable: Any, params: Any, batch: Batch, rng: jax.Array
    ) -> tuple[jax.Array, tuple]:
        full = merge_trainable(params, trainable, mask)
        objective, ce, z, tokens = loss_sums(
            model,
            full,
            batch,
            loss_chunk_size=loss_chunk_size,
            z_loss_weight=z_loss_weight,
            dropout_rng=rng if uses_dropout else None,
        )
        return objective, (ce, z, tokens)

    grad_fn = jax.grad(summed_loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        with nn.logical_axis_rules(setup.rules):
            trainable = split_trainable(state.params, mask)
            if micro_batches == 1:
                grads, (ce, z, tokens) = grad_fn(trainable, state.params, batch, rng)
            else:
                grads, (ce, z, tokens) = _accumulate(
                    grad_fn, trainable, state.params, batch, rng, micro_batches, setup
                )
            # One division for the whole global batch; no supervised token gives 0, not NaN.
            denominator = jnp.maximum(tokens, 1.0)
            grads = jax.tree.map(lambda g: g / denominator, grads)
            with jax.named_scope("optimizer"):
                grad_norm = optax.tree.norm(grads)
                updates, opt_state = setup.optimizer.update(grads, state.opt_state, trainable)
                trainable = optax.apply_updates(trainable, updates)
            params = merge_trainable(state.params, trainable, mask)
        real = batch.attention_mask > 0  # segment ids: 0 is padding
        metrics = {
            "loss": ce / denominator,
            "z_loss": z / denominator,
            "supervised_tokens": tokens,
            "tokens": jnp.sum(real).astype(jnp.float32),
            "padding_fraction": 1.0 - jnp.mean(real.astype(jnp.float32)),
            # Conversations: a packed row holds several (its highest segment id).
            "examples": jnp.sum(jnp.max(batch.attention_mask, axis=1)).astype(jnp.float32),
            "grad_norm": grad_norm,
            "learning_rate": learning_rate(state.step),
        }
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def _accumulate(grad_fn, trainable, params, batch, rng, micro_batches, setup):
    """Scan over k micro-batches, summing gradients and token sums in float32.

    Row r of the global batch goes to micro-batch r % k, so every device contributes its
    share to every micro-batch and no data moves between devices.
    """
    batch_size = batch.input_ids.shape[0]
    split_sharding = NamedSharding(setup.mesh, P(None, BATCH_AXES))

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(batch_size // micro_batches, micro_batches, *x.shape[1:])
        return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), split_sharding)

    micro = (jax.tree.map(split, batch), jnp.arange(micro_batches))
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    init = (zeros, (jnp.float32(0), jnp.float32(0), jnp.float32(0)))

    def body(carry, one):
        grads, sums = carry
        one_batch, index = one
        g, aux = grad_fn(trainable, params, one_batch, jax.random.fold_in(rng, index))
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        return (grads, jax.tree.map(jnp.add, sums, aux)), None

    (grads, sums), _ = jax.lax.scan(body, init, micro)
    return grads, sums


def jit_train_step(
    setup: TrainSetup,
    step_fn: Callable,
    global_batch_size: int,
    micro_batches: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Jit once with the state's shardings, the batch split over (data, fsdp), the state
    donated; the returned callable runs it under the mesh."""
    check_batch_size(global_batch_size, setup.mesh)
    if micro_batches < 1 or global_batch_size % micro_batches:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible into "
            f"{micro_batches} micro-batches"
        )
    if micro_batches > 1:
        check_batch_size(
            global_batch_size // micro_batches,
            setup.mesh,
            "the micro-batch (global batch / micro_batches)",
        )
    jitted = jax.jit(
        step_fn,
        in_shardings=(setup.state_shardings, batch_sharding(setup.mesh)),
        out_shardings=(setup.state_shardings, replicated(setup.mesh)),
        donate_argnums=(0,),
    )

    def run(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        with jax.set_mesh(setup.mesh):
            return jitted(state, batch)

    run.jitted = jitted
    return run


def build_train_step(
    train: TrainConfig,
    setup: TrainSetup,
    learning_rate: optax.Schedule,
    global_batch_size: int,
    micro_batches: int,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The run's jitted train step, as `config.train` asks for it: the one place it is
    assembled (the trainer runs it, `python -m llava_jax.plan` compiles it)."""
    step_fn = make_train_step(
        setup,
        learning_rate,
        micro_batches=micro_batches,
        z_loss_weight=train.z_loss_weight,
        loss_chunk_size=train.loss_chunk_size,
        seed=train.seed,
    )
    return jit_train_step(setup, step_fn, global_batch_size, micro_batches)


def metrics_to_host(metrics: dict[str, jax.Array]) -> dict[str, float]:
    """Replicated metric arrays -> Python floats, from this process's own copy (works when
    the array spans other processes' devices too)."""
    return {k: float(jax.device_get(v.addressable_shards[0].data)) for k, v in metrics.items()}


def make_eval_step(
    setup: TrainSetup,
    loss_chunk_size: int = 0,
    trace_counts: collections.Counter | None = None,
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """Jitted `(params, batch) -> {'loss_sum', 'supervised_tokens'}` for held-out loss;
    `trace_counts['eval_loss']` counts its compilations."""
    model = setup.model

    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        if trace_counts is not None:
            trace_counts["eval_loss"] += 1
        with nn.logical_axis_rules(setup.rules):
            _, ce, _, tokens = loss_sums(model, params, batch, loss_chunk_size=loss_chunk_size)
        return {"loss_sum": ce, "supervised_tokens": tokens}

    jitted = jax.jit(
        eval_step,
        in_shardings=(setup.state_shardings.params, batch_sharding(setup.mesh)),
        out_shardings=replicated(setup.mesh),
    )

    def run(params: Any, batch: Batch) -> dict[str, jax.Array]:
        with jax.set_mesh(setup.mesh):
            return jitted(params, batch)

    return run
