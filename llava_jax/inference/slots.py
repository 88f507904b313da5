"""Continuous batching's device programs: a fixed set of decode slots that requests enter and
leave between decode steps.

Pure functions of `(params, state, …)`, jitted once per shape by `SlotEngine`
(`inference/slot_engine.py`), in the style of `inference/programs.py`:

- `init_slots(...)`: a `SlotState` of S free slots, each with its own KV cache row of C
  token slots, write position, token count, sampling settings and stop state;
- `embed_prompt` (or `encode_image` per image and `embed_with_features`, with the image
  cache), `prefill_chunk`, `first_token`: one left-padded prompt `[1, P]` (and its images)
  embedded once, appended to a prefill cache of P slots in one chunk or several
  (so a long prompt can be prefilled between decode steps), and its first token;
- `insert(state, prefilled, slot)`: that cache and token into a free slot of the running
  state (the slot is traced: admitting into any slot reuses one program per prompt bucket);
- `decode_steps(model, params, state, steps)`: `steps` tokens for every live slot, each
  step's token, whether the answer keeps it and whether the slot just finished;
- `evict(state, slot)`: a slot freed before its answer ended.

Each slot row writes its keys and values at its own position (`cache['index']: int32[S]`,
`models/layers.py update_kv_cache`), and its RoPE positions count its own real tokens, so a
row's numbers do not depend on when it was admitted or on the other rows. An idle slot
computes on an all-masked row and writes nothing that is read. On a mesh (traced under its
logical axis rules), the decode state's slots are split over the data axes and its heads over
`tensor` (`constrain_cache`); the one-row programs run with the batch axis unsplit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from llava_jax.inference.programs import PromptBatch, constrain_cache
from llava_jax.inference.sampling import Finish, SamplingParams, select_tokens
from llava_jax.models.llama import init_cache
from llava_jax.models.llava import Llava

Array = jax.Array


@struct.dataclass
class SlotState:
    """The running decode state of S slots, C cache slots each."""

    cache: dict[str, Any]  # k, v (`init_cache`), mask int32[S, C], index int32[S]
    sampling: SamplingParams  # temperature, top_k, top_p, seed, row_max_new: [S]
    last: Array  # int32[S]: each slot's latest token, its next input
    step: Array  # int32[S]: tokens the slot has generated
    done: Array  # bool[S]: free, or its answer finished
    reason: Array  # int32[S]: a `Finish`
    window: Array  # int32[S, W]: the last W tokens, for stop sequences


@struct.dataclass
class Prefilled:
    """One prompt prefilled, ready to `insert`."""

    cache: dict[str, Any]  # k, v of one row and P slots; mask int32[1, P]; index int32[]
    token: Array  # int32[]: the first new token
    sampling: SamplingParams  # the request's settings, per-row fields of shape [1]


@struct.dataclass
class StepOutput:
    """What one decode step gives the host, per slot."""

    token: Array  # int32[S]
    kept: Array  # bool[S]: the token belongs to the answer (an eos, or an idle slot's: no)
    finished: Array  # bool[S]: the slot's answer ended at this step
    reason: Array  # int32[S]: why (a `Finish`), where finished


def init_slots(
    model: Llava, slots: int, length: int, cache_dtype: Any, shared: SamplingParams
) -> SlotState:
    """`slots` free slots of `length` cache slots each; `shared`: the eos ids, stop
    sequences, pad and suppressed token every request uses (per-row fields are replaced)."""
    config = model.config
    cache = init_cache(config.text, slots, length, cache_dtype, per_layer=not config.scan_layers)
    cache = constrain_cache({**cache, "index": jnp.zeros((slots,), jnp.int32)})
    rows = shared.replace(
        temperature=jnp.zeros((slots,), jnp.float32),
        top_k=jnp.zeros((slots,), jnp.int32),
        top_p=jnp.ones((slots,), jnp.float32),
        seed=jnp.zeros((slots,), jnp.uint32),
        row_max_new=jnp.ones((slots,), jnp.int32),
    )
    return SlotState(
        cache=cache,
        sampling=rows,
        last=jnp.full((slots,), shared.pad, jnp.int32),
        step=jnp.zeros((slots,), jnp.int32),
        done=jnp.ones((slots,), bool),
        reason=jnp.full((slots,), Finish.RUNNING, jnp.int32),
        window=jnp.zeros((slots, shared.stop.shape[1]), jnp.int32),
    )


def embed_prompt(model: Llava, params: Any, batch: PromptBatch) -> Array:
    """The prompt `batch` (one row, left-padded to P) as token embeddings `[1, P, D]`, its
    images' features merged (the vision tower runs here, once a request)."""
    return model.apply(
        {"params": params},
        batch.input_ids,
        batch.images,
        batch.image_mask,
        batch.image_layout,
        method=Llava.embed_inputs,
    )


def encode_image(
    model: Llava, params: Any, images: Array, layout: Array | None
) -> tuple[Array, Array | None]:
    """One image's features: `images float32[1, 1, T, H, W, 3]` (its tiles), `layout
    int32[1, 1, N]` -> `[1, 1, N, D]` and which exist (None: all; `Llava.encode_images`)."""
    return model.apply({"params": params}, images, layout, method=Llava.encode_images)


def embed_with_features(
    model: Llava,
    params: Any,
    input_ids: Array,
    features: Array,
    image_mask: Array,
    feature_mask: Array | None,
) -> Array:
    """`embed_prompt` from image features computed before (`encode_image`'s, stacked
    `[1, I, N, D]`; e.g. kept in the image cache)."""
    return model.apply(
        {"params": params},
        input_ids,
        features,
        image_mask,
        feature_mask,
        method=Llava.embed_with_features,
    )


def prefill_cache(model: Llava, length: int, cache_dtype: Any) -> dict[str, Any]:
    """An empty cache of one row and `length` slots, for a prompt of that bucket."""
    config = model.config
    return init_cache(config.text, 1, length, cache_dtype, per_layer=not config.scan_layers)


def prefill_chunk(
    model: Llava,
    params: Any,
    cache: dict[str, Any],
    embeddings: Array,
    attention_mask: Array,
    start: Array,
    *,
    size: int,
) -> tuple[dict[str, Any], Array]:
    """Tokens `start .. start + size` of a prompt (`embeddings [1, P, D]`, `attention_mask
    int32[1, P]`, 1 = a real token) appended to its prefill `cache` -> (cache, the chunk's
    last position's logits `float32[1, V]`). A prompt in one chunk or in several gives the
    same cache: each chunk attends to the ones before it through the cache."""
    chunk = jax.lax.dynamic_slice_in_dim(embeddings, start, size, axis=1)
    mask = jax.lax.dynamic_slice_in_dim(attention_mask, start, size, axis=1)
    logits, cache = model.apply(
        {"params": params},
        chunk,
        cache,
        mask,
        last_position_only=True,
        method=Llava.decode_embedded,
    )
    return cache, logits[:, -1]


def _length_axis(name: str) -> int:
    """The token axis of a cache buffer: keys `[..., K, D, S]`, values `[..., K, S, D]`."""
    return -1 if name == "k" else -2


def take_block(cache: dict[str, Any], offset: Array, *, size: int) -> dict[str, Any]:
    """The keys and values of cache slots `offset .. offset + size` (a prompt block of a
    one-row cache, to keep in the prefix cache): `{'k', 'v'}` shaped like
    the cache's (stacked or one buffer a layer), with `size` slots."""

    def cut(name: str) -> Any:
        axis = _length_axis(name)
        return jax.tree.map(
            lambda b: jax.lax.dynamic_slice_in_dim(b, offset, size, axis=axis % b.ndim),
            cache[name],
        )

    return {name: cut(name) for name in ("k", "v")}


def place_block(cache: dict[str, Any], block: dict[str, Any], offset: Array) -> dict[str, Any]:
    """A one-row prefill cache with a kept prompt block written at slots `offset ..` and
    marked as real tokens (the prompt's first blocks, reused instead of prefilled)."""
    out = dict(cache)
    for name in ("k", "v"):
        axis = _length_axis(name)

        def put(buffer: Array, new: Array, axis: int = axis) -> Array:
            start = [jnp.zeros((), jnp.int32)] * buffer.ndim
            start[axis % buffer.ndim] = offset
            return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), tuple(start))

        out[name] = jax.tree.map(put, cache[name], block[name])
    size = jax.tree.leaves(block["k"])[0].shape[-1]
    ones = jnp.ones((1, size), cache["mask"].dtype)
    out["mask"] = jax.lax.dynamic_update_slice(cache["mask"], ones, (0, offset))
    return out


def with_index(cache: dict[str, Any], index: Array) -> dict[str, Any]:
    """A one-row prefill cache whose next chunk is written at slot `index`."""
    return {**cache, "index": jnp.asarray(index, jnp.int32)}


def first_token(
    cache: dict[str, Any], logits: Array, sampling: SamplingParams, *, greedy: bool
) -> Prefilled:
    """A prompt's prefill cache and its first token (token 0 of the request's own key),
    ready to `insert`."""
    token = select_tokens(logits, sampling, jnp.zeros((1,), jnp.int32), greedy)
    return Prefilled(cache=cache, token=token[0], sampling=sampling)


def _into_row(buffer: Array, row: Array, slot: Array, axis: int) -> Array:
    """`buffer` with `row` (size 1 on `axis`, the batch axis; at most as long on the last
    axis) written at index `slot` of `axis`, from the start of every other axis."""
    start = [jnp.zeros((), jnp.int32)] * buffer.ndim
    start[axis] = slot
    return jax.lax.dynamic_update_slice(buffer, row.astype(buffer.dtype), tuple(start))


def insert(state: SlotState, prefilled: Prefilled, slot: Array) -> tuple[SlotState, StepOutput]:
    """The prefilled request in `slot` (free): its keys and values in the slot's first P
    cache slots, the rest of the row masked, its first token recorded (it may already end
    the answer: an eos, a stop sequence, or a limit of one token) -> (state, that token's
    `StepOutput`, read at `slot`)."""
    cache, new = state.cache, prefilled.cache
    out = dict(cache)
    for name in ("k", "v"):
        if isinstance(cache[name], (tuple, list)):  # one buffer a layer: batch axis 0
            out[name] = tuple(
                _into_row(b, n, slot, 0) for b, n in zip(cache[name], new[name], strict=True)
            )
        else:  # stacked [L, S, ...]: batch axis 1
            out[name] = _into_row(cache[name], new[name], slot, 1)
    length = cache["mask"].shape[1]
    row_mask = jnp.zeros((1, length), jnp.int32).at[:, : new["mask"].shape[1]].set(new["mask"])
    out["mask"] = _into_row(cache["mask"], row_mask, slot, 0)
    out["index"] = cache["index"].at[slot].set(new["mask"].shape[1])
    out = constrain_cache(out)
    rows = state.sampling
    request = prefilled.sampling
    sampling = rows.replace(
        temperature=rows.temperature.at[slot].set(request.temperature[0]),
        top_k=rows.top_k.at[slot].set(request.top_k[0]),
        top_p=rows.top_p.at[slot].set(request.top_p[0]),
        seed=rows.seed.at[slot].set(request.seed[0]),
        row_max_new=rows.row_max_new.at[slot].set(request.row_max_new[0]),
    )
    state = state.replace(
        cache=out,
        sampling=sampling,
        step=state.step.at[slot].set(0),
        done=state.done.at[slot].set(False),
        reason=state.reason.at[slot].set(Finish.RUNNING),
        window=state.window.at[slot].set(0),
    )
    # The first token through the same bookkeeping as every later one, for this slot only.
    only = jnp.arange(state.done.shape[0]) == slot
    token = jnp.where(only, prefilled.token, state.last)
    recorded, output = _record(state.replace(done=state.done | ~only), token)
    return recorded.replace(done=jnp.where(only, recorded.done, state.done)), output


def evict(state: SlotState, slot: Array) -> SlotState:
    """`slot` freed (its caller went away): it decodes nothing more."""
    return state.replace(done=state.done.at[slot].set(True))


def _record(state: SlotState, token: Array) -> tuple[SlotState, StepOutput]:
    """Write each live slot's new `token: int32[S]` and check its stops."""
    sampling, step, done = state.sampling, state.step, state.done
    token = jnp.where(done, sampling.pad, token)
    is_eos = jnp.any((token[:, None] == sampling.eos) & sampling.eos_valid, axis=-1) & ~done
    window = jnp.concatenate([state.window[:, 1:], token[:, None]], axis=1)
    width = window.shape[1]
    filled = jnp.arange(width)[None, :] >= width - (step[:, None] + 1)
    equal = (window[:, None, :] == sampling.stop[None]) & filled[:, None, :]
    matches = jnp.all(equal | ~sampling.stop_valid[None], axis=-1)
    is_stop = jnp.any(matches & jnp.any(sampling.stop_valid, -1)[None], axis=-1) & ~done & ~is_eos
    at_limit = (step + 1 >= sampling.row_max_new) & ~done & ~is_eos
    reason = jnp.where(is_eos, Finish.EOS, jnp.where(is_stop, Finish.STOP_SEQUENCE, state.reason))
    finished = is_eos | is_stop | at_limit
    output = StepOutput(
        token=token, kept=~done & ~is_eos, finished=finished, reason=reason.astype(jnp.int32)
    )
    state = state.replace(
        last=jnp.where(done, state.last, token),
        step=jnp.where(done, step, step + 1),
        done=done | finished,
        reason=reason.astype(jnp.int32),
        window=jnp.where(done[:, None], state.window, window),
    )
    return state, output


def resize(state: SlotState, *, length: int) -> SlotState:
    """The slots with `length` cache slots each: the first `length` kept (shrinking: every
    live row's keys lie before it) or the new ones empty and masked (growing). The decode
    steps' attention reads every slot of the cache, so a state as long as its longest live
    row needs costs the least."""

    def fit(buffer: Array, axis: int) -> Array:
        axis %= buffer.ndim
        if length <= buffer.shape[axis]:
            return jax.lax.slice_in_dim(buffer, 0, length, axis=axis)
        widths = [(0, 0)] * buffer.ndim
        widths[axis] = (0, length - buffer.shape[axis])
        return jnp.pad(buffer, widths)

    cache = state.cache
    out = {
        name: jax.tree.map(lambda b, n=name: fit(b, _length_axis(n)), cache[name])
        for name in ("k", "v")
    }
    out["mask"] = fit(cache["mask"], -1)
    out["index"] = cache["index"]
    return state.replace(cache=constrain_cache(out))


def decode_steps(
    model: Llava,
    params: Any,
    state: SlotState,
    *,
    steps: int,
    greedy: bool,
) -> tuple[SlotState, StepOutput]:
    """`steps` tokens for every live slot -> (state, outputs with a leading `[steps]` axis).
    A slot that finishes emits pad (not kept) for the rest of the call; every live slot's
    write position plus `steps` must fit the cache (`resize`)."""

    def one(state: SlotState, _: None) -> tuple[SlotState, StepOutput]:
        live = ~state.done
        logits, cache = model.apply(
            {"params": params},
            state.last[:, None],
            state.cache,
            attention_mask=live[:, None].astype(jnp.int32),
            method=Llava.decode,
        )
        # An idle row's write position stays put (it wrote nothing that is read).
        cache["index"] = jnp.where(live, cache["index"], state.cache["index"])
        cache = constrain_cache(cache)
        token = select_tokens(logits[:, 0], state.sampling, state.step, greedy)
        return _record(state.replace(cache=cache), token)

    return jax.lax.scan(one, state, None, length=steps)
