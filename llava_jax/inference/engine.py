"""Generation with a KV cache: a pure prefill and a pure decode loop, and a host-side engine.

The device side is two pure functions of `(params, …)`, jitted once per shape:

- `prefill(model, params, batch, sampling)` runs the left-padded prompts (and their images)
  through the model once, filling the KV cache, and picks the first token -> `DecodeState`;
- `decode(model, params, state, sampling, chunk)` picks up to `chunk` more tokens inside
  `jax.lax.while_loop`, so no Python runs per token.

`Engine(config, mesh=…)` holds no parameters: `engine.generate(params, prompts, …)` pads a
batch, calls the two programs and reads the result back; `engine.stream(…)` yields the new
tokens chunk by chunk. An engine built once serves every call (the trainer's evaluations,
a chat's turns) without compiling again.

Compilation. Shapes are static, so each distinct shape compiles once:

- the prompt length is padded up to a *length bucket* (default: powers of two from 16),
- the new-token capacity is `max_new_tokens` rounded up to a power of two (>= 16); the
  actual `max_new_tokens` is traced, so it does not recompile within a capacity,
- the batch is padded with filler rows up to `batch_rows` and a multiple of the mesh's
  data-parallel size,
- greedy (`temperature == 0`) and sampling are two programs; temperature, top-k, top-p, the
  seed, eos ids and stop sequences are traced (`SamplingParams`). With one `SamplingConfig`
  per prompt, each row has its own temperature, top-k, top-p, seed, max_new_tokens and stop
  strings (a batch with a sampled row runs the sampling program, its greedy rows taking the
  argmax), so a server can batch unrelated requests (`llava_jax/serve/batcher.py`),
- the decode loop runs at most `chunk` steps per call, `chunk` traced, so streaming in
  chunks of N tokens reuses the program of one long call.

Stopping. Every row stops on its own: on one of `eos_token_ids` (the eos token is not part
of the returned tokens), on a token sequence of `stop_token_sequences` (matched on device,
kept in the returned tokens), or on a string of `stop_strings`, checked on the host after
each chunk against the decoded text (tokenizations of a string are many; matching text is
the only exact test): the row's tokens are cut after the token that completes it and its
text before it. Finished rows emit the pad token until every row is done.

Sharding. With a mesh, the batch and the KV cache are split over `('data', 'fsdp')` (and KV
heads over `tensor` where it divides) through logical constraints; tracing runs under
`jax.set_mesh(mesh)` and the logical axis rules. Parameters are used where they lie
(`Engine.place` puts host parameters onto the mesh).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llava_jax.errors import PromptTooLongError
from llava_jax.models.config import ModelConfig
from llava_jax.models.llama import init_cache
from llava_jax.models.llava import Llava, abstract_params
from llava_jax.models.quantize import is_quantized, quantize_abstract
from llava_jax.sharding import (
    BATCH_AXES,
    DEFAULT_RULES,
    Rules,
    data_parallel_size,
    global_array,
    param_shardings,
    place,
)

Array = jax.Array
DEFAULT_STOP_CHECK_INTERVAL = 16  # tokens per chunk when stop strings are checked on host


class Finish(enum.IntEnum):
    """Why a row stopped, as stored on device; a row still running at the end hit the length."""

    RUNNING = 0
    EOS = 1
    STOP_SEQUENCE = 2
    STOP_STRING = 3


FINISH_REASONS = {
    Finish.RUNNING: "length",
    Finish.EOS: "eos",
    Finish.STOP_SEQUENCE: "stop",
    Finish.STOP_STRING: "stop",
}


class Detokenizer(Protocol):
    def decode(self, token_ids: list[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens and when to stop.

    temperature: 0 = greedy (argmax); otherwise logits / temperature are sampled.
    top_k: keep the k most likely tokens (0 = all). top_p: keep the smallest set of most
    likely tokens whose probability reaches top_p (1.0 = all). Applied in the order
    temperature -> top-k -> top-p, as transformers does. seed: the sampling key; token t
    uses `fold_in(key(seed), t)`, so results do not depend on chunking.
    suppress_image_token: never pick the image placeholder (when it is in the vocabulary):
    fed back, it would be read as a slot for image features. transformers does the same
    with `suppress_tokens=[image_token_id]`.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()
    stop_token_sequences: tuple[tuple[int, ...], ...] = ()
    stop_strings: tuple[str, ...] = ()
    pad_token_id: int = 0
    suppress_image_token: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if isinstance(self.eos_token_ids, int):
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        if any(len(s) == 0 for s in self.stop_token_sequences):
            raise ValueError("stop_token_sequences must not contain an empty sequence")
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must not contain an empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def batch_sampling(configs: Sequence[SamplingConfig]) -> SamplingConfig:
    """One config for a batch of per-row configs: the longest max_new_tokens, greedy only
    when every row is, every row's stop strings (each row still stops on its own).

    Raises ValueError when the rows disagree on what the batch shares: eos ids, stop token
    sequences, the pad token, suppressing the image token.
    """
    if not configs:
        raise ValueError("no sampling configs given")
    first = configs[0]
    for name in ("eos_token_ids", "stop_token_sequences", "pad_token_id", "suppress_image_token"):
        values = {getattr(c, name) for c in configs}
        if len(values) > 1:
            raise ValueError(
                f"the rows of a batch must share {name}, got {sorted(map(repr, values))}"
            )
    greedy = all(c.greedy for c in configs)
    return dataclasses.replace(
        first,
        max_new_tokens=max(c.max_new_tokens for c in configs),
        temperature=0.0 if greedy else max(c.temperature for c in configs),
        stop_strings=tuple(dict.fromkeys(s for c in configs for s in c.stop_strings)),
    )


# --- device-side state ------------------------------------------------------------------------


@struct.dataclass
class SamplingParams:
    """A `SamplingConfig` (or one per row) as traced values: changing them does not
    recompile. Lists are padded to few distinct shapes, with a validity mask.

    temperature, top_k, top_p and seed are scalars for the whole batch or [B], one per row
    (`Engine.sampling_params` makes them [B]): with [B], row b draws with its own key
    `fold_in(key(seed[b]), t)`, so its tokens do not depend on the other rows, and a row
    with temperature 0 takes the argmax (in the sampling program too).
    """

    temperature: Array  # float32[] or [B]: 0 = greedy row (1 = unused when greedy program)
    top_k: Array  # int32[] or [B]: 0 = every token
    top_p: Array  # float32[] or [B]: 1 = every token
    seed: Array  # uint32[] or [B]
    pad: Array  # int32[]: emitted by finished rows
    max_new: Array  # int32[]: tokens to generate at most (the longest row's limit)
    eos: Array  # int32[E]: eos ids
    eos_valid: Array  # bool[E]
    stop: Array  # int32[M, W]: stop sequences, right-aligned
    stop_valid: Array  # bool[M, W]: the positions each sequence has
    suppress: Array  # int32[]: a token never picked (the image token)
    suppress_valid: Array  # bool[]
    row_max_new: Array | None = None  # int32[B]: each row's limit (None: max_new for all)


@struct.dataclass
class PromptBatch:
    """Left-padded prompts on the device."""

    input_ids: Array  # int32[B, P]
    attention_mask: Array  # int32[B, P]: 1 = real token
    images: Array | None  # float32[B, I, H, W, 3] (LLaVA-NeXT: [B, I, T, H, W, 3]) or None
    image_mask: Array | None  # bool[B, I]
    filler: Array  # bool[B]: rows that only pad the batch (they start done)
    image_layout: Array | None = None  # LLaVA-NeXT: int32[B, I, N] (data/anyres.py)


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


# --- token selection ----------------------------------------------------------------------


def filter_logits(logits: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """Temperature, then top-k, then top-p; dropped tokens get -inf.

    logits: float32[B, V]; temperature: float32[] or [B] (> 0); top_k: int32[] or [B]
    (0 = off); top_p: float32[] or [B] (1 = off). All traced, so changing them does not
    recompile.
    """
    vocab = logits.shape[-1]
    temperature, top_k, top_p = (jnp.reshape(x, (-1, 1)) for x in (temperature, top_k, top_p))
    scaled = logits / temperature
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab) < k
    probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
    # A token is kept while the probability of the more likely tokens is below top_p, so the
    # most likely token is always kept; top_p = 1 keeps all (the cumsum may round past 1).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))
    keep = keep.at[:, 0].set(True)
    last_kept = jnp.sum(keep, axis=-1, keepdims=True) - 1
    threshold = jnp.take_along_axis(ordered, last_kept, axis=-1)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def select_tokens(logits: Array, sampling: SamplingParams, step: Array, greedy: bool) -> Array:
    """Next tokens int32[B] from `logits: float32[B, V]`; the key is folded with `step`."""
    banned = (jnp.arange(logits.shape[-1]) == sampling.suppress) & sampling.suppress_valid
    logits = jnp.where(banned, -jnp.inf, logits)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return argmax
    temperature = sampling.temperature
    greedy_rows = temperature == 0
    temperature = jnp.where(greedy_rows, 1.0, temperature)
    # Top-k/top-p sort the vocabulary, slow on CPUs: only when some row asks for them
    # (without them, filter_logits is the scaling alone).
    top_k, top_p = sampling.top_k, sampling.top_p
    filtered = jax.lax.cond(
        jnp.any(top_k > 0) | jnp.any(top_p < 1.0),
        lambda: filter_logits(logits, temperature, top_k, top_p),
        lambda: logits / jnp.reshape(temperature, (-1, 1)),
    )
    if jnp.ndim(sampling.seed) == 0:  # one key for the batch
        key = jax.random.fold_in(jax.random.key(sampling.seed), step)
        drawn = jax.random.categorical(key, filtered, axis=-1)
    else:  # a key per row: a row draws the same tokens in any batch

        def draw(seed: Array, row: Array) -> Array:
            return jax.random.categorical(jax.random.fold_in(jax.random.key(seed), step), row)

        drawn = jax.vmap(draw)(sampling.seed, filtered)
    return jnp.where(greedy_rows, argmax, drawn.astype(jnp.int32))


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


def _constrain_cache(cache: dict[str, Any]) -> dict[str, Any]:
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
        _constrain_cache(cache),
        batch.images,
        batch.image_mask,
        batch.attention_mask,
        last_position_only=True,
        image_layout=batch.image_layout,
        method=Llava.decode,
    )
    vocab = logits.shape[-1]
    state = DecodeState(
        cache=_constrain_cache(cache),
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
        s = s.replace(cache=_constrain_cache(cache))
        return record_token(s, logits[:, 0], sampling, greedy)

    return jax.lax.while_loop(running, one_token, state)


# --- checks shared with the callers -----------------------------------------------------------


def fit_new_tokens(
    prompt_length: int,
    max_new_tokens: int,
    context: int,
    *,
    clamp: bool = False,
    image_tokens: int = 0,
    where: str = "the prompt",
) -> int:
    """The number of new tokens a prompt of `prompt_length` leaves room for in `context`.

    Raises `PromptTooLongError` naming the lengths when the prompt leaves no room for an
    answer, or (unless `clamp`) when `prompt_length + max_new_tokens` exceeds the context.
    """
    if prompt_length >= context:
        of_images = f", {image_tokens} of them for the image" if image_tokens else ""
        raise PromptTooLongError(
            f"{where} has {prompt_length} tokens{of_images}, but the model's context is "
            f"{context} tokens: a context of {context} leaves no room for the answer"
        )
    if prompt_length + max_new_tokens > context:
        if clamp:
            return context - prompt_length
        raise PromptTooLongError(
            f"{where} has {prompt_length} tokens; with max_new_tokens={max_new_tokens} it "
            f"needs {prompt_length + max_new_tokens} positions, more than the model's context "
            f"of {context} tokens"
        )
    return max_new_tokens


# --- the host side ----------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationResult:
    """The output of `Engine.generate`, one entry per prompt, in order.

    tokens[b]: int32[n_b], the new tokens of row b, without the eos token and without pad.
    finish_reasons[b]: "eos", "stop" (stop sequence or stop string) or "length".
    logprobs[b]: float32[n_b], log-probability of each token under the model (temperature 1,
    no top-k/top-p). texts[b]: the decoded text, cut before a stop string (tokenizer only).
    padded_tokens: int32[B, max_new_tokens], as generated on device: the eos token included,
    then pad. logits[b]: float32[n_b, V], the logits each token was picked from
    (`return_logits=True` only).
    """

    tokens: list[np.ndarray]
    finish_reasons: list[str]
    logprobs: list[np.ndarray]
    padded_tokens: np.ndarray
    texts: list[str] | None = None
    logits: list[np.ndarray] | None = None


def default_length_bucket(length: int) -> int:
    """Powers of two from 16: prompts of 17..32 tokens share one compilation, and so on."""
    return max(16, 1 << (max(length, 1) - 1).bit_length())


def _capacity(max_new_tokens: int) -> int:
    return max(16, 1 << (max_new_tokens - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _to_host(tree: Any) -> Any:
    """Device arrays -> numpy, whole. An array spread over several processes is gathered
    (a collective: every process calls this at the same point of the same loop)."""

    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


class GenerationStream:
    """An iterator of each row's new tokens (int32[n_b], possibly empty; eos and pad left
    out), one list per chunk; once exhausted, `result` holds the `GenerationResult`."""

    def __init__(self, chunks: Iterator[list[np.ndarray]], finish: Callable[[], Any]):
        self._chunks = chunks
        self._finish = finish
        self.result: GenerationResult | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> list[np.ndarray]:
        try:
            return next(self._chunks)
        except StopIteration:
            if self.result is None:
                self.result = self._finish()
            raise

    @property
    def finished(self) -> list[bool] | None:
        """Which rows have stopped (eos, a stop, their length) as of the latest chunk."""
        return getattr(self._chunks, "finished", None)


class Engine:
    """Generates text from a LLaVA with a KV cache; compiled programs are cached per shape.

    Holds no parameters: every call takes them (numpy from `load_hf`, or device arrays,
    e.g. a train state's). mesh: optional `('data', 'fsdp', 'tensor')` mesh, with the
    logical axis `rules`. cache_dtype: KV-cache dtype (default: the compute dtype).
    length_bucket: prompt length -> padded length (default: powers of two from 16).
    tokenizer: anything with `decode(list[int]) -> str`; needed for stop strings and texts.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        mesh: Mesh | None = None,
        rules: Rules = DEFAULT_RULES,
        cache_dtype: Any = None,
        length_bucket: Callable[[int], int] = default_length_bucket,
        tokenizer: Detokenizer | None = None,
    ):
        # Generation takes no gradient: recomputing layers (remat) would only cost, and a
        # rematerialised unscanned layer would trace the per-layer cache's static index.
        config = config.replace(remat_policy="none")
        self.config = config
        self.model = Llava(config)
        self.mesh = mesh
        self.rules = tuple(rules)
        self.cache_dtype = jnp.dtype(cache_dtype or config.dtype)
        self.length_bucket = length_bucket
        self.tokenizer = tokenizer
        # How many times each program was traced (= compiled), e.g. for tests and logging.
        self.trace_counts: Counter[str] = Counter()

        def traced_prefill(params, batch, sampling, **static):
            self.trace_counts["prefill"] += 1
            return prefill(self.model, params, batch, sampling, **static)

        def traced_decode(params, state, sampling, chunk, **static):
            self.trace_counts["decode"] += 1
            return decode(self.model, params, state, sampling, chunk, **static)

        self._prefill = jax.jit(
            traced_prefill,
            static_argnames=("capacity", "greedy", "return_logits", "cache_dtype"),
        )
        # The state is donated: its KV cache (the loop's carry, each layer writing its slice
        # with dynamic_update_slice) is updated in place, never copied whole, on every backend.
        # A state passed to `_decode` is consumed; use the one it returns.
        self._decode = jax.jit(traced_decode, static_argnames=("greedy",), donate_argnums=(1,))

    # --- placement ------------------------------------------------------------------------
    def place(self, params: Any) -> Any:
        """Host (or differently placed) parameters onto this engine's mesh or device."""
        if self.mesh is None:
            return jax.device_put(params)
        abstract = abstract_params(self.config)
        if is_quantized(params):  # int8 kernels and their scales, not the float kernels
            abstract = quantize_abstract(self.config, abstract)
        return place(params, param_shardings(abstract, self.mesh, self.rules))

    def _put(self, value: np.ndarray | None) -> Array | None:
        if value is None:
            return None
        if self.mesh is None:
            return jnp.asarray(value)
        spec = P(BATCH_AXES, *([None] * (np.ndim(value) - 1)))
        return global_array(value, NamedSharding(self.mesh, spec))

    def _put_replicated(self, tree: Any) -> Any:
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        replicated = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda value: global_array(value, replicated), tree)

    def _tracing(self):
        """Context for calls that may trace: the mesh and the logical axis rules."""
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    # --- host side ------------------------------------------------------------------------
    def prepare(
        self,
        prompts: Sequence[np.ndarray],
        images: np.ndarray | None = None,
        image_mask: np.ndarray | None = None,
        pad_token_id: int = 0,
        max_new_tokens: int = 0,
        batch_rows: int | None = None,
        length: int | None = None,
        image_layout: np.ndarray | None = None,
    ) -> tuple[dict[str, np.ndarray | None], int]:
        """Left-pad `prompts` (int32[T_b] each) to the length bucket (or `length`); check the
        lengths and images. Returns the `PromptBatch` fields on the host and the number of
        real rows.

        Rows are added (one pad token, no images) up to `batch_rows` (so batches of any size
        up to it share one compilation), then to a multiple of the data-parallel size.
        """
        if not len(prompts):
            raise ValueError("no prompts given")
        prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} is empty")
        longest = max(lengths)
        fit_new_tokens(
            longest,
            max_new_tokens,
            self.config.text.max_position_embeddings,
            where=f"prompt {lengths.index(longest)}",
        )
        image_token = self.config.image_token_id
        if pad_token_id == image_token:
            raise ValueError(f"pad_token_id={pad_token_id} is the image token")
        batch = len(prompts)
        anyres = self.config.anyres
        if images is not None:
            images = np.asarray(images, np.float32)
            shape = "[B, I, T, H, W, 3] (each image's tiles)" if anyres else "[B, I, H, W, 3]"
            if images.ndim != (6 if anyres else 5) or images.shape[0] != batch:
                raise ValueError(
                    f"images must be float32{shape} with B={batch}, got {images.shape}"
                )
            if image_mask is None:
                image_mask = np.ones(images.shape[:2], bool)
            image_mask = np.asarray(image_mask, bool)
            if anyres:
                if image_layout is None or np.shape(image_layout)[:2] != images.shape[:2]:
                    raise ValueError("a LLaVA-NeXT model needs image_layout int32[B, I, N]")
                image_layout = np.asarray(image_layout, np.int32)
        num_valid = np.zeros(batch, int) if images is None else image_mask.sum(axis=1)
        for b, prompt in enumerate(prompts):
            found = int(np.sum(prompt == image_token))
            if anyres and images is not None:
                wanted = int(((image_layout[b] >= 0) & image_mask[b][:, None]).sum())
                per_image = "as their sizes give"
            else:
                wanted = int(num_valid[b]) * self.config.num_image_tokens
                per_image = f"{self.config.num_image_tokens} per image"
            if found != wanted:
                raise ValueError(
                    f"prompt {b} has {found} image tokens but its {int(num_valid[b])} image(s) "
                    f"need {wanted} ({per_image})"
                )

        rows = max(batch, batch_rows or 0)
        if self.mesh is not None:
            rows = _round_up(rows, data_parallel_size(self.mesh))
        padded_length = length or self.length_bucket(longest)
        if padded_length < longest:
            raise ValueError(f"length {padded_length} is shorter than the prompt ({longest})")
        input_ids = np.full((rows, padded_length), pad_token_id, np.int32)
        attention_mask = np.zeros((rows, padded_length), np.int32)
        for b, prompt in enumerate(prompts):
            input_ids[b, padded_length - len(prompt) :] = prompt
            attention_mask[b, padded_length - len(prompt) :] = 1
        attention_mask[batch:, -1] = 1  # filler rows: one real (pad) token each
        if images is not None and rows > batch:
            extra = rows - batch
            images = np.concatenate([images, np.zeros((extra, *images.shape[1:]), np.float32)])
            image_mask = np.concatenate([image_mask, np.zeros((extra, image_mask.shape[1]), bool)])
            if image_layout is not None:
                filler = np.full((extra, *image_layout.shape[1:]), -1, np.int32)
                image_layout = np.concatenate([image_layout, filler])
        fields = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "images": images,
            "image_mask": image_mask,
            "filler": np.arange(rows) >= batch,
            "image_layout": image_layout if images is not None else None,
        }
        return fields, batch

    def sampling_params(
        self, sampling: SamplingConfig | Sequence[SamplingConfig], rows: int | None = None
    ) -> SamplingParams:
        """The traced form of `sampling`; lists padded to multiples of 4 entries.

        With one config per row (a sequence; `rows` >= its length, filler rows taking the
        first's values), temperature, top-k, top-p, the seed and the row's max_new_tokens
        are [rows] (`SamplingParams`); eos ids, stop sequences, pad and the image token are
        the batch's and must agree (`batch_sampling`).
        """
        per_row = None if isinstance(sampling, SamplingConfig) else list(sampling)
        if per_row is not None:
            sampling = batch_sampling(per_row)
            filler = [per_row[0]] * (max(rows or 0, len(per_row)) - len(per_row))
            per_row = per_row + filler
        eos = list(sampling.eos_token_ids)
        size = _round_up(max(len(eos), 1), 4)
        eos_ids, eos_valid = np.zeros(size, np.int32), np.zeros(size, bool)
        eos_ids[: len(eos)], eos_valid[: len(eos)] = eos, True
        sequences = sampling.stop_token_sequences
        width = max((len(s) for s in sequences), default=1)
        count = _round_up(max(len(sequences), 1), 4)
        stop, stop_valid = np.zeros((count, width), np.int32), np.zeros((count, width), bool)
        for m, sequence in enumerate(sequences):
            stop[m, width - len(sequence) :] = sequence
            stop_valid[m, width - len(sequence) :] = True
        image = self.config.image_token_id
        suppress = sampling.suppress_image_token and image < self.config.text.vocab_size
        values = SamplingParams(
            temperature=np.float32(sampling.temperature or 1.0),
            top_k=np.int32(sampling.top_k),
            top_p=np.float32(sampling.top_p),
            seed=np.uint32(sampling.seed),
            pad=np.int32(sampling.pad_token_id),
            max_new=np.int32(sampling.max_new_tokens),
            eos=eos_ids,
            eos_valid=eos_valid,
            stop=stop,
            stop_valid=stop_valid,
            suppress=np.int32(image if suppress else 0),
            suppress_valid=np.bool_(suppress),
        )
        if per_row is not None:

            def column(name: str, dtype: Any) -> np.ndarray:
                return np.asarray([getattr(c, name) for c in per_row], dtype)

            values = values.replace(
                temperature=column("temperature", np.float32),
                top_k=column("top_k", np.int32),
                top_p=column("top_p", np.float32),
                seed=column("seed", np.uint32),
                row_max_new=column("max_new_tokens", np.int32),
            )
        return self._put_replicated(values)

    def generate(
        self,
        params: Any,
        prompts: Sequence[np.ndarray],
        images: np.ndarray | None = None,
        image_mask: np.ndarray | None = None,
        sampling: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(),
        *,
        return_logits: bool = False,
        batch_rows: int | None = None,
        length: int | None = None,
        image_layout: np.ndarray | None = None,
    ) -> GenerationResult:
        """Generate for a batch of prompts of any lengths.

        prompts: B arrays int32[T_b] (with `config.num_image_tokens` image tokens per valid
        image); images: float32[B, I, H, W, 3] (normalised) or None; image_mask: bool[B, I]
        (default all True). batch_rows: pad the batch to this many rows (filler rows that
        stop at once), so a last, smaller batch reuses the compiled programs. length: pad
        every prompt to this length instead of its bucket. Without stop strings the whole
        generation is one device call. sampling: one config for every row, or one per
        prompt (each row with its own temperature, top-k, top-p, seed, max_new_tokens and
        stop strings; see `batch_sampling` for what they share). A LLaVA-NeXT model takes
        each image's tiles, images float32[B, I, T, H, W, 3], and image_layout int32[B, I, N]
        (data/anyres.py: the prompt has each image's own number of image tokens).
        """
        shared = sampling if isinstance(sampling, SamplingConfig) else batch_sampling(sampling)
        chunk = DEFAULT_STOP_CHECK_INTERVAL if shared.stop_strings else None
        run = self._run(
            params,
            prompts,
            images,
            image_mask,
            sampling,
            chunk,
            return_logits,
            batch_rows,
            length,
            image_layout,
        )
        stream = GenerationStream(run, run.finish)
        for _ in stream:
            pass
        return stream.result

    def stream(
        self,
        params: Any,
        prompts: Sequence[np.ndarray],
        images: np.ndarray | None = None,
        image_mask: np.ndarray | None = None,
        sampling: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(),
        *,
        chunk_size: int = 8,
        batch_rows: int | None = None,
        image_layout: np.ndarray | None = None,
    ) -> GenerationStream:
        """Each row's new tokens after every `chunk_size` decoded tokens (every chunk is one
        call of the same compiled loop); `stream.result` once it is exhausted, and
        `stream.finished` says which rows have stopped so far. sampling and batch_rows: as
        for `generate`."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        run = self._run(
            params,
            prompts,
            images,
            image_mask,
            sampling,
            chunk_size,
            False,
            batch_rows,
            image_layout=image_layout,
        )
        return GenerationStream(run, run.finish)

    def _run(
        self,
        params: Any,
        prompts: Sequence[np.ndarray],
        images: np.ndarray | None,
        image_mask: np.ndarray | None,
        sampling: SamplingConfig | Sequence[SamplingConfig],
        chunk_size: int | None,
        return_logits: bool,
        batch_rows: int | None,
        length: int | None = None,
        image_layout: np.ndarray | None = None,
    ) -> _Run:
        if isinstance(sampling, SamplingConfig):
            shared, per_row = sampling, None
        else:
            per_row = list(sampling)
            if len(per_row) != len(prompts):
                raise ValueError(f"{len(per_row)} sampling configs for {len(prompts)} prompts")
            shared = batch_sampling(per_row)
        if shared.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need an Engine(tokenizer=...) to decode text")
        if per_row is not None:  # each prompt with its own answer length must fit
            for b, (prompt, config) in enumerate(zip(prompts, per_row, strict=True)):
                context = self.config.text.max_position_embeddings
                fit_new_tokens(np.size(prompt), config.max_new_tokens, context, where=f"prompt {b}")
        fields, rows = self.prepare(
            prompts,
            images,
            image_mask,
            shared.pad_token_id,
            shared.max_new_tokens if per_row is None else 0,
            batch_rows,
            length,
            image_layout,
        )
        return _Run(self, params, fields, rows, sampling, chunk_size, return_logits)

    def _find_stop_string(self, tokens: np.ndarray, stops: Sequence[str]) -> int | None:
        """Fewest leading tokens whose decoded text contains a stop string, or None."""
        decode_text = self.tokenizer.decode
        if not any(s in decode_text(tokens.tolist()) for s in stops):
            return None
        low, high = 1, len(tokens)  # containment only grows with more tokens: bisect
        while low < high:
            mid = (low + high) // 2
            if any(s in decode_text(tokens[:mid].tolist()) for s in stops):
                high = mid
            else:
                low = mid + 1
        return low


class _Run:
    """One generation: prefill, then decode chunks; iterating yields each chunk's new tokens
    (when streaming), `finish()` reads the result."""

    def __init__(self, engine, params, fields, rows, sampling, chunk_size, return_logits):
        self.engine, self.params, self.rows = engine, params, rows
        self.chunk_size = chunk_size
        self.return_logits = return_logits
        if isinstance(sampling, SamplingConfig):
            self.sampling, self.row_sampling = sampling, [sampling] * rows
            self.sampling_params = engine.sampling_params(sampling)
        else:  # one config per row: `self.sampling` is what the batch shares
            self.sampling, self.row_sampling = batch_sampling(sampling), list(sampling)
            self.sampling_params = engine.sampling_params(sampling, len(fields["filler"]))
        self.finished = [False] * rows  # rows stopped so far (as of the latest chunk)
        batch = PromptBatch(**{k: engine._put(v) for k, v in fields.items()})
        with engine._tracing():
            self.state = engine._prefill(
                params,
                batch,
                self.sampling_params,
                capacity=_capacity(self.sampling.max_new_tokens),
                greedy=self.sampling.greedy,
                return_logits=return_logits,
                cache_dtype=engine.cache_dtype,
            )
        self.stopped_at: dict[int, int] = {}  # row -> token count when a stop string was met
        self._chunks = self._generate()

    def __iter__(self) -> _Run:
        return self

    def __next__(self) -> list[np.ndarray]:
        return next(self._chunks)

    def _generate(self) -> Iterator[list[np.ndarray]]:
        engine, sampling, rows = self.engine, self.sampling, self.rows
        chunk = np.int32(self.chunk_size or sampling.max_new_tokens)
        emitted = [0] * rows  # tokens already yielded per row
        decoded = False
        while True:
            # Streaming looks at the prefill's token first (time to first token); a single
            # call without stop strings goes straight to the decode loop.
            if decoded or self.chunk_size is not None:
                state = self.state
                tokens, done, length, step = _to_host(
                    (state.tokens, state.done, state.length, state.step)
                )
                tokens, done, step = tokens[:rows], done[:rows].copy(), int(step)
                lengths = [min(int(length[b]), step) for b in range(rows)]
                if sampling.stop_strings:
                    for b in range(rows):
                        stops = self.row_sampling[b].stop_strings
                        # A row that stopped in this chunk (eos, its length) is looked at once.
                        if b in self.stopped_at or self.finished[b] or not stops:
                            continue
                        cut = engine._find_stop_string(tokens[b, : lengths[b]], stops)
                        if cut is not None:
                            self.stopped_at[b] = cut
                            done[b] = True
                    for b, cut in self.stopped_at.items():
                        lengths[b] = cut
                self.finished = [bool(d) for d in done]
                if self.chunk_size is not None:
                    yield [tokens[b, emitted[b] : lengths[b]] for b in range(rows)]
                    emitted = list(lengths)
                if step >= sampling.max_new_tokens or done.all():
                    self.finished = [True] * rows
                    return
                if self.stopped_at:
                    # Rows that met a stop string stop on device too (pad from now on).
                    full_done = _to_host(state.done).copy()
                    full_done[list(self.stopped_at)] = True
                    self.state = state.replace(done=global_array(full_done, state.done.sharding))
            with engine._tracing():
                self.state = engine._decode(
                    self.params, self.state, self.sampling_params, chunk, greedy=sampling.greedy
                )
            decoded = True

    def finish(self) -> GenerationResult:
        engine, sampling, rows, state = self.engine, self.sampling, self.rows, self.state
        wanted = {
            "tokens": state.tokens,
            "logprobs": state.logprobs,
            "reason": state.reason,
            "length": state.length,
            "step": state.step,
        }
        if self.return_logits:
            wanted["logits"] = state.logits
        host = _to_host(wanted)
        step = int(host["step"])
        padded = host["tokens"][:rows, : sampling.max_new_tokens].copy()
        tokens, logprobs, reasons, logits, texts = [], [], [], [], []
        for b in range(rows):
            reason = Finish(int(host["reason"][b]))
            n = min(int(host["length"][b]), step)
            if b in self.stopped_at:
                n, reason = self.stopped_at[b], Finish.STOP_STRING
                padded[b, n:] = sampling.pad_token_id
            tokens.append(host["tokens"][b, :n].copy())
            logprobs.append(host["logprobs"][b, :n].copy())
            reasons.append(FINISH_REASONS[reason])
            if self.return_logits:
                logits.append(host["logits"][b, :n].copy())
            if engine.tokenizer is not None:
                text = engine.tokenizer.decode(tokens[-1].tolist())
                cuts = [text.find(s) for s in self.row_sampling[b].stop_strings if s in text]
                texts.append(text[: min(cuts)] if cuts else text)
        return GenerationResult(
            tokens=tokens,
            finish_reasons=reasons,
            logprobs=logprobs,
            padded_tokens=padded,
            texts=texts if engine.tokenizer is not None else None,
            logits=logits if self.return_logits else None,
        )
