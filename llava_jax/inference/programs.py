"""Generation's two device programs: a pure prefill and a pure decode loop with a KV cache.

Both are pure functions of `(params, …)`, jitted once per shape by `Engine`
(`inference/engine.py`):

- `prefill(model, params, batch, sampling)` runs the left-padded prompts (and their images)
  through the model once, filling the KV cache, and picks the first token -> `DecodeState`;
- `decode(model, params, state, sampling, chunk)` picks up to `chunk` more tokens inside
  `jax.lax.while_loop`, so no Python runs per token; `chunk` is traced, so streaming in
  chunks of N tokens reuses the program of one long call.

Stopping on device: a row stops on one of `eos_token_ids` (the eos token is not part of the
returned tokens), on a token sequence of `stop_token_sequences` (kept in the returned
tokens) or at its own `max_new_tokens`; finished rows emit the pad token until every row is
done. Stop strings are checked on the host (`inference/generation.py`).

Sharding: the KV cache is split like the batch through logical constraints (a no-op without
a mesh and logical axis rules).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from llava_jax.inference.sampling import Finish, SamplingParams, select_tokens
from llava_jax.models.llama import init_cache
from llava_jax.models.llava import Llava

Array = jax.Array


@struct.dataclass
class PromptBatch:
    """Left-padded prompts on the device."""

    input_ids: Array  # int32[B, P]
    attention_mask: Array  # int32[B, P]: 1 = real token
    images: Array | None  # float32[B, I, T, H, W, 3] (each image's tiles) or None
    image_mask: Array | None  # bool[B, I]
    filler: Array  # bool[B]: rows that only pad the batch (they start done)
    image_layout: Array | None = None  # int32[B, I, N] (models/inputs.py)


@struct.dataclass
class DecodeState:
    """The decode loop's carry; C is the new-token capacity, S = prompt length + C."""

    cache: dict[str, Any]  # k, v, mask: int32[B, S], index: int32[] (`init_cache`)
    tokens: Array  # int32[B, C]: new tokens (pad after a row finished)
    logprobs: Array  # float32[B, C]: log-probability of each token (temperature 1)
    step: Array  # int32[]: tokens generated so far
    last: Array  # int32[B]: the latest token, the next input
    done: Array  # bool[B]
    reason: Array  # int32[B]: a `Finish`
    length: Array  # int32[B]: tokens the row keeps (capacity until it stops)
    window: Array  # int32[B, W]: the last W tokens, for stop sequences
    logits: Array | None = None  # float32[B, C, V], only when asked for


def record_token(
    state: DecodeState, logits: Array, sampling: SamplingParams, greedy: bool
) -> DecodeState:
    """Pick the token for `state.step` from `logits: float32[B, V]`, write it, check stops."""
    step, done = state.step, state.done
    token = select_tokens(logits, sampling, step, greedy)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)
    token = jnp.where(done, sampling.pad, token)
    is_eos = jnp.any((token[:, None] == sampling.eos) & sampling.eos_valid, axis=-1) & ~done
    window = jnp.concatenate([state.window[:, 1:], token[:, None]], axis=1)
    # A window position holds a generated token once step + 1 tokens exist.
    width = window.shape[1]
    filled = jnp.arange(width) >= width - (step + 1)
    equal = (window[:, None, :] == sampling.stop[None]) & filled
    matches = jnp.all(equal | ~sampling.stop_valid[None], axis=-1)
    is_stop = jnp.any(matches & jnp.any(sampling.stop_valid, -1)[None], axis=-1) & ~done & ~is_eos
    reason = jnp.where(
        is_eos, Finish.EOS, jnp.where(is_stop, Finish.STOP_SEQUENCE, state.reason)
    ).astype(jnp.int32)
    # Tokens the row keeps: the eos is left out, a stop sequence is kept.
    kept = jnp.where(is_eos, step, step + 1)
    if sampling.row_max_new is not None:  # a row at its own limit stops ("length")
        is_stop = is_stop | ((step + 1 >= sampling.row_max_new) & ~done & ~is_eos)
    logits_out = state.logits
    if logits_out is not None:
        logits_out = jax.lax.dynamic_update_slice(
            logits_out, logits[:, None].astype(logits_out.dtype), (0, step, 0)
        )
    return state.replace(
        tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, step)),
        logprobs=jax.lax.dynamic_update_slice(state.logprobs, logprob, (0, step)),
        logits=logits_out,
        reason=reason,
        length=jnp.where(is_eos | is_stop, kept, state.length),
        done=done | is_eos | is_stop,
        window=window,
        last=token,
        step=step + 1,
    )


# --- the two programs -------------------------------------------------------------------------

_CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "head_dim", "length"),
    "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
    "mask": ("batch", "length"),
}


def constrain_cache(cache: dict[str, Any]) -> dict[str, Any]:
    """The cache split like the batch (a no-op without a mesh and logical axis rules)."""
    out = dict(cache)
    for name, axes in _CACHE_AXES.items():
        value = cache[name]
        if isinstance(value, (tuple, list)):  # one buffer per layer
            out[name] = tuple(nn.with_logical_constraint(x, axes[1:]) for x in value)
        else:
            out[name] = nn.with_logical_constraint(value, axes)
    return out


def prefill(
    model: Llava,
    params: Any,
    batch: PromptBatch,
    sampling: SamplingParams,
    *,
    capacity: int,
    greedy: bool,
    return_logits: bool,
    cache_dtype: Any,
) -> DecodeState:
    """Fill the cache with the prompts `[B, P]` and pick the first token -> `DecodeState`."""
    rows, prompt_length = batch.input_ids.shape
    cache = init_cache(
        model.config.text,
        rows,
        prompt_length + capacity,
        cache_dtype,
        per_layer=not model.config.scan_layers,
    )
    # Only the last position's logits are needed: float32[B, P, V] would dominate the
    # prefill's memory (GBs for long multimodal prompts and large vocabularies).
    logits, cache = model.apply(
        {"params": params},
        batch.input_ids,
        constrain_cache(cache),
        batch.images,
        batch.image_mask,
        batch.attention_mask,
        last_position_only=True,
        image_layout=batch.image_layout,
        method=Llava.decode,
    )
    vocab = logits.shape[-1]
    state = DecodeState(
        cache=constrain_cache(cache),
        tokens=jnp.broadcast_to(sampling.pad, (rows, capacity)).astype(jnp.int32),
        logprobs=jnp.zeros((rows, capacity), jnp.float32),
        step=jnp.zeros((), jnp.int32),
        last=jnp.zeros((rows,), jnp.int32),
        done=batch.filler,
        reason=jnp.full((rows,), Finish.RUNNING, jnp.int32),
        length=jnp.full((rows,), capacity, jnp.int32),
        window=jnp.zeros((rows, sampling.stop.shape[1]), jnp.int32),
        logits=jnp.zeros((rows, capacity, vocab), jnp.float32) if return_logits else None,
    )
    return record_token(state, logits[:, -1], sampling, greedy)


def decode(
    model: Llava,
    params: Any,
    state: DecodeState,
    sampling: SamplingParams,
    chunk: Array,
    *,
    greedy: bool,
) -> DecodeState:
    """Up to `chunk` more tokens (fewer once `max_new` is reached or every row stopped)."""
    limit = jnp.minimum(state.step + chunk, sampling.max_new)

    def running(s: DecodeState) -> Array:
        return (s.step < limit) & ~jnp.all(s.done)

    def one_token(s: DecodeState) -> DecodeState:
        logits, cache = model.apply(
            {"params": params}, s.last[:, None], s.cache, method=Llava.decode
        )
        s = s.replace(cache=constrain_cache(cache))
        return record_token(s, logits[:, 0], sampling, greedy)

    return jax.lax.while_loop(running, one_token, state)
