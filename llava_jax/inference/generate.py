"""Generation with a KV cache: prefill once, then an on-device decode loop.

`Generator(config, params).generate(prompts, images, image_mask, sampling)` left-pads a
list of token arrays, runs the prompt (and its images) through the model once to fill the
KV cache, and then decodes inside `jax.lax.while_loop`, so no Python runs per token.

Compilation. Shapes are static, so each distinct shape compiles once and is cached:

- the prompt length is padded up to a *length bucket* (default: powers of two from 16),
- the new-token capacity is `max_new_tokens` rounded up to a power of two (>= 16); the
  actual `max_new_tokens` is a traced value, so it does not recompile within a capacity,
- the batch is padded up to a multiple of the mesh's data-parallel size,
- greedy (`temperature == 0`) and sampling are two programs; temperature, top-k, top-p,
  the seed and the eos ids are traced values,
- the decode loop runs at most `chunk` steps per call, with `chunk` traced, so streaming
  in chunks of N tokens reuses the same program as one long call.

Stopping. Every row stops on its own: on any of `eos_token_ids` (the eos token is not part
of the returned tokens), on a token sequence of `stop_token_sequences` (matched on device
against the last generated tokens; the sequence is kept in the returned tokens), or on a
string of `stop_strings`. Stop strings are checked on the host, after each chunk, against
the decoded text (this needs a `tokenizer` with `decode`): tokenizations of a string are
many, so matching text is the only exact test. The row's tokens are cut after the token
that completes the stop string and its text is cut before the stop string. Finished rows
keep emitting `pad_token_id` until every row is done; the loop exits as soon as all are.

Sharding. With a `mesh`, parameters are placed with the logical rules (`embed -> fsdp`,
`heads -> tensor`, ...), the batch and the KV cache are split over `('data', 'fsdp')` (and
KV heads over `tensor` where it divides), and tracing runs under `jax.set_mesh(mesh)` with
`nn.logical_axis_rules(rules)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llava_jax.models.config import ModelConfig
from llava_jax.models.llama import init_cache
from llava_jax.models.llava import Llava, abstract_params
from llava_jax.sharding import (
    BATCH_AXES,
    DEFAULT_RULES,
    Rules,
    data_parallel_size,
    global_array,
    logical_to_spec,
    param_shardings,
    place,
)

Array = jax.Array
State = dict[str, Any]

# Why a row stopped, as stored on device; "length" is every row still running at the end.
_RUNNING, _EOS, _STOP_SEQUENCE, _STOP_STRING = 0, 1, 2, 3
FINISH_REASONS = {_RUNNING: "length", _EOS: "eos", _STOP_SEQUENCE: "stop", _STOP_STRING: "stop"}

_WINDOW_EMPTY = -2  # fills the window of last tokens before any is generated
_WILDCARD = -1  # left padding of a stop sequence: matches anything
_NEVER = -3  # a padding stop sequence: matches nothing

DEFAULT_STOP_CHECK_INTERVAL = 16  # tokens per chunk when stop strings are checked on host


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


@dataclasses.dataclass
class GenerationResult:
    """The output of `Generator.generate`, one entry per prompt, in order.

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


# --- token selection ----------------------------------------------------------------------


def filter_logits(logits: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """Temperature, then top-k, then top-p; dropped tokens get -inf.

    logits: float32[B, V]; temperature: float32[] (> 0); top_k: int32[] (0 = off);
    top_p: float32[] (1 = off). All traced, so changing them does not recompile.
    """
    vocab = logits.shape[-1]
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


def select_tokens(logits: Array, knobs: dict[str, Array], step: Array, greedy: bool) -> Array:
    """Next tokens int32[B] from `logits: float32[B, V]`; the key is folded with `step`."""
    vocab = jnp.arange(logits.shape[-1])
    banned = jnp.any(vocab[None, :] == knobs["suppress"][:, None], axis=0)
    logits = jnp.where(banned, -jnp.inf, logits)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, knobs["temperature"], knobs["top_k"], knobs["top_p"])
    key = jax.random.fold_in(jax.random.key(knobs["seed"]), step)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def _record(state: State, logits: Array, knobs: dict[str, Array], greedy: bool) -> State:
    """Pick the token for `state['step']` from `logits: float32[B, V]`, write it, check stops."""
    step, done = state["step"], state["done"]
    token = select_tokens(logits, knobs, step, greedy)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)
    token = jnp.where(done, knobs["pad"], token)
    out = dict(state)
    out["tokens"] = jax.lax.dynamic_update_slice(state["tokens"], token[:, None], (0, step))
    out["logprobs"] = jax.lax.dynamic_update_slice(state["logprobs"], logprob, (0, step))
    if "logits" in state:
        out["logits"] = jax.lax.dynamic_update_slice(
            state["logits"], logits[:, None].astype(state["logits"].dtype), (0, step, 0)
        )
    is_eos = jnp.any(token[:, None] == knobs["eos"][None, :], axis=-1) & ~done
    window = jnp.concatenate([state["window"][:, 1:], token[:, None]], axis=1)
    seqs = knobs["stop_sequences"]  # [M, W], right-aligned
    matches = (window[:, None, :] == seqs[None]) | (seqs[None] == _WILDCARD)
    is_stop = jnp.any(jnp.all(matches, axis=-1), axis=-1) & ~done & ~is_eos
    out["reason"] = jnp.where(is_eos, _EOS, jnp.where(is_stop, _STOP_SEQUENCE, state["reason"]))
    # Tokens the row keeps: the eos is left out, a stop sequence is kept.
    kept = jnp.where(is_eos, step, step + 1)
    out["length"] = jnp.where(is_eos | is_stop, kept, state["length"])
    out["done"] = done | is_eos | is_stop
    out["window"] = window
    out["last"] = token
    out["step"] = step + 1
    return out


# --- the generator ------------------------------------------------------------------------


@dataclasses.dataclass
class PreparedBatch:
    """A left-padded, bucketed batch ready for the device, and what is needed to undo it."""

    input_ids: np.ndarray  # int32[Bp, P]
    attention_mask: np.ndarray  # int32[Bp, P]
    images: np.ndarray | None  # float32[Bp, I, H, W, 3]
    image_mask: np.ndarray | None  # bool[Bp, I]
    num_rows: int  # real rows (the rest pad the batch to the data-parallel size)


class Generator:
    """Generates text from a LLaVA with a KV cache; compiled programs are cached per shape.

    params: the parameter tree for `Llava(config)` (numpy from `load_hf`, or jax arrays).
    mesh: optional `('data', 'fsdp', 'tensor')` mesh; parameters are placed with `rules`.
    cache_dtype: KV-cache dtype (default: the compute dtype `config.dtype`).
    length_bucket: prompt length -> padded length (default: powers of two from 16).
    tokenizer: anything with `decode(list[int]) -> str`; needed for stop strings and texts.
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Any,
        *,
        mesh: Mesh | None = None,
        rules: Rules = DEFAULT_RULES,
        cache_dtype: Any = None,
        length_bucket: Callable[[int], int] = default_length_bucket,
        tokenizer: Detokenizer | None = None,
    ):
        self.config = config
        self.model = Llava(config)
        self.mesh = mesh
        self.rules = tuple(rules)
        self.cache_dtype = jnp.dtype(cache_dtype or config.dtype)
        self.length_bucket = length_bucket
        self.tokenizer = tokenizer
        self.params = self._place_params(params)
        # How many times each program was traced (= compiled), e.g. for tests and logging.
        self.trace_counts: Counter[str] = Counter()
        # Donating the state lets XLA update the cache in place; the CPU backend cannot.
        donate = () if jax.default_backend() == "cpu" else (1,)
        self._prefill = jax.jit(
            self._prefill_impl, static_argnames=("capacity", "greedy", "return_logits")
        )
        self._decode = jax.jit(
            self._decode_impl, static_argnames=("greedy",), donate_argnums=donate
        )

    # --- placement ------------------------------------------------------------------------
    def _place_params(self, params: Any) -> Any:
        if self.mesh is None:
            return jax.device_put(params)
        return place(params, param_shardings(abstract_params(self.config), self.mesh, self.rules))

    def _batch_sharding(self, ndim: int) -> NamedSharding | None:
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, P(BATCH_AXES, *([None] * (ndim - 1))))

    def _put(self, value: np.ndarray | None) -> Array | None:
        if value is None:
            return None
        sharding = self._batch_sharding(np.ndim(value))
        return global_array(value, sharding) if sharding else jnp.asarray(value)

    def _tracing(self):
        """Context for calls that may trace: the mesh and the logical axis rules."""
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    # --- compiled programs ----------------------------------------------------------------
    def _prefill_impl(
        self,
        params: Any,
        input_ids: Array,
        attention_mask: Array,
        images: Array | None,
        image_mask: Array | None,
        filler: Array,
        knobs: dict[str, Array],
        *,
        capacity: int,
        greedy: bool,
        return_logits: bool,
    ) -> State:
        """Fill the cache with the prompt `[B, P]` and pick the first token -> decode state.

        filler: bool[B], rows that only pad the batch; they start done, so the loop can end
        as soon as every real row has stopped.
        """
        self.trace_counts["prefill"] += 1
        batch, prompt_length = input_ids.shape
        cache = init_cache(self.config.text, batch, prompt_length + capacity, self.cache_dtype)
        cache = self._constrain_cache(cache)
        # Only the last position's logits are needed: float32[B, P, V] would dominate the
        # prefill's memory (GBs for long multimodal prompts and large vocabularies).
        logits, cache = self.model.apply(
            {"params": params},
            input_ids,
            cache,
            images,
            image_mask,
            attention_mask,
            last_position_only=True,
            method=Llava.decode,
        )
        window = knobs["stop_sequences"].shape[1]
        state: State = {
            "cache": cache,
            "tokens": jnp.full((batch, capacity), knobs["pad"], jnp.int32),
            "logprobs": jnp.zeros((batch, capacity), jnp.float32),
            "step": jnp.zeros((), jnp.int32),
            "last": jnp.zeros((batch,), jnp.int32),
            "done": filler,
            "reason": jnp.zeros((batch,), jnp.int32),
            "length": jnp.full((batch,), capacity, jnp.int32),  # until a row stops
            "window": jnp.full((batch, window), _WINDOW_EMPTY, jnp.int32),
        }
        if return_logits:
            state["logits"] = jnp.zeros((batch, capacity, logits.shape[-1]), jnp.float32)
        return _record(state, logits[:, -1], knobs, greedy)

    def _decode_impl(
        self, params: Any, state: State, knobs: dict[str, Array], chunk: Array, *, greedy: bool
    ) -> State:
        """Decode up to `chunk` more tokens (fewer if `max_new` is reached or all rows stop)."""
        self.trace_counts["decode"] += 1
        limit = jnp.minimum(state["step"] + chunk, knobs["max_new"])

        def cond(s: State) -> Array:
            return (s["step"] < limit) & ~jnp.all(s["done"])

        def body(s: State) -> State:
            logits, cache = self.model.apply(
                {"params": params}, s["last"][:, None], s["cache"], method=Llava.decode
            )
            s = {**s, "cache": self._constrain_cache(cache)}
            return _record(s, logits[:, 0], knobs, greedy)

        return jax.lax.while_loop(cond, body, state)

    def _constrain_cache(self, cache: dict[str, Array]) -> dict[str, Array]:
        if self.mesh is None:
            return cache
        names = ("layers", "batch", "length", "kv_heads", "head_dim")
        spec = logical_to_spec(names, cache["k"].shape, self.mesh, self.rules)
        kv = NamedSharding(self.mesh, spec)
        mask = NamedSharding(self.mesh, P(spec[1], None))
        constrain = jax.lax.with_sharding_constraint
        return {
            "k": constrain(cache["k"], kv),
            "v": constrain(cache["v"], kv),
            "mask": constrain(cache["mask"], mask),
            "index": cache["index"],
        }

    # --- host side ------------------------------------------------------------------------
    def prepare(
        self,
        prompts: Sequence[np.ndarray],
        images: np.ndarray | None = None,
        image_mask: np.ndarray | None = None,
        pad_token_id: int = 0,
        max_new_tokens: int = 0,
        batch_rows: int | None = None,
    ) -> PreparedBatch:
        """Left-pad `prompts` (int32[T_b] each) to the length bucket; check lengths and images.

        Rows are added (one pad token, no images) up to `batch_rows` (so batches of any size
        up to it share one compilation), then to a multiple of the data-parallel size.
        """
        if not len(prompts):
            raise ValueError("no prompts given")
        prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} is empty")
        context = self.config.text.max_position_embeddings
        longest = max(lengths)
        if longest > context:
            row = lengths.index(longest)
            raise ValueError(
                f"prompt {row} has {longest} tokens, longer than the model's context of "
                f"{context} tokens (config.text.max_position_embeddings)"
            )
        if longest + max_new_tokens > context:
            row = lengths.index(longest)
            raise ValueError(
                f"prompt {row} has {longest} tokens; with max_new_tokens={max_new_tokens} it "
                f"needs {longest + max_new_tokens} positions, more than the model's context "
                f"of {context} tokens (config.text.max_position_embeddings)"
            )
        image_token = self.config.image_token_id
        if pad_token_id == image_token:
            raise ValueError(f"pad_token_id={pad_token_id} is the image token")
        batch = len(prompts)
        if images is not None:
            images = np.asarray(images, np.float32)
            if images.ndim != 5 or images.shape[0] != batch:
                raise ValueError(
                    f"images must be float32[B={batch}, I, H, W, 3], got {images.shape}"
                )
            if image_mask is None:
                image_mask = np.ones(images.shape[:2], bool)
            image_mask = np.asarray(image_mask, bool)
        num_valid = np.zeros(batch, int) if images is None else image_mask.sum(axis=1)
        for b, prompt in enumerate(prompts):
            found = int(np.sum(prompt == image_token))
            wanted = int(num_valid[b]) * self.config.num_image_tokens
            if found != wanted:
                raise ValueError(
                    f"prompt {b} has {found} image tokens but its {int(num_valid[b])} image(s) "
                    f"need {wanted} ({self.config.num_image_tokens} per image)"
                )

        rows = max(batch, batch_rows or 0)
        if self.mesh is not None:
            rows = _round_up(rows, data_parallel_size(self.mesh))
        length = self.length_bucket(longest)
        if length < longest:
            raise ValueError(f"length_bucket({longest}) = {length} is shorter than the prompt")
        input_ids = np.full((rows, length), pad_token_id, np.int32)
        attention_mask = np.zeros((rows, length), np.int32)
        for b, prompt in enumerate(prompts):
            input_ids[b, length - len(prompt) :] = prompt
            attention_mask[b, length - len(prompt) :] = 1
        attention_mask[batch:, -1] = 1  # filler rows: one real (pad) token each
        if images is not None and rows > batch:
            extra = rows - batch
            images = np.concatenate([images, np.zeros((extra, *images.shape[1:]), np.float32)])
            image_mask = np.concatenate([image_mask, np.zeros((extra, image_mask.shape[1]), bool)])
        return PreparedBatch(input_ids, attention_mask, images, image_mask, batch)

    def _knobs(self, sampling: SamplingConfig) -> dict[str, Array]:
        """The traced sampling values; shapes are padded so few distinct shapes occur."""
        eos = list(sampling.eos_token_ids)
        eos_ids = np.full(_round_up(max(len(eos), 1), 4), _WILDCARD, np.int32)
        eos_ids[: len(eos)] = eos
        seqs = sampling.stop_token_sequences
        width = max((len(s) for s in seqs), default=1)
        stop = np.full((_round_up(max(len(seqs), 1), 4), width), _NEVER, np.int32)
        for m, seq in enumerate(seqs):
            stop[m] = _WILDCARD
            stop[m, width - len(seq) :] = seq
        suppress = _WILDCARD  # no vocabulary id
        if (
            sampling.suppress_image_token
            and self.config.image_token_id < self.config.text.vocab_size
        ):
            suppress = self.config.image_token_id
        knobs = {
            "suppress": np.asarray([suppress], np.int32),
            "temperature": np.float32(sampling.temperature or 1.0),
            "top_k": np.int32(sampling.top_k),
            "top_p": np.float32(sampling.top_p),
            "seed": np.uint32(sampling.seed),
            "eos": eos_ids,
            "stop_sequences": stop,
            "pad": np.int32(sampling.pad_token_id),
            "max_new": np.int32(sampling.max_new_tokens),
        }
        if self.mesh is not None:
            replicated = NamedSharding(self.mesh, P())
            return jax.tree.map(lambda value: global_array(value, replicated), knobs)
        return jax.tree.map(jnp.asarray, knobs)

    def generate(
        self,
        prompts: Sequence[np.ndarray],
        images: np.ndarray | None = None,
        image_mask: np.ndarray | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        *,
        return_logits: bool = False,
        batch_rows: int | None = None,
    ) -> GenerationResult:
        """Generate for a batch of prompts of any lengths.

        prompts: B arrays int32[T_b] (with `config.num_image_tokens` image tokens per valid
        image); images: float32[B, I, H, W, 3] (normalised) or None; image_mask: bool[B, I]
        (default all True). batch_rows: pad the batch to this many rows (filler rows that
        stop at once), so a last, smaller batch reuses the compiled programs. Without stop
        strings the whole generation is one device call.
        """
        chunk = DEFAULT_STOP_CHECK_INTERVAL if sampling.stop_strings else None
        run = self._run(prompts, images, image_mask, sampling, chunk, return_logits, batch_rows)
        while True:
            try:
                next(run)
            except StopIteration as finished:
                return finished.value

    def stream(
        self,
        prompts: Sequence[np.ndarray],
        images: np.ndarray | None = None,
        image_mask: np.ndarray | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        *,
        chunk_size: int = 8,
    ) -> Iterator[list[np.ndarray]]:
        """Yield, after every `chunk_size` decoded tokens, each row's new tokens (int32[n_b],
        possibly empty; eos and pad left out). Every chunk is one call of the same compiled
        loop. The generator's return value (`StopIteration.value`, or `yield from`) is the
        `GenerationResult`.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        return self._run(prompts, images, image_mask, sampling, chunk_size, False, None)

    def _run(
        self,
        prompts: Sequence[np.ndarray],
        images: np.ndarray | None,
        image_mask: np.ndarray | None,
        sampling: SamplingConfig,
        chunk_size: int | None,
        return_logits: bool,
        batch_rows: int | None,
    ) -> Iterator[list[np.ndarray]]:
        if sampling.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a Generator(tokenizer=...) to decode text")
        batch = self.prepare(
            prompts,
            images,
            image_mask,
            sampling.pad_token_id,
            sampling.max_new_tokens,
            batch_rows,
        )
        knobs = self._knobs(sampling)
        capacity = _capacity(sampling.max_new_tokens)
        chunk = np.int32(chunk_size or sampling.max_new_tokens)
        rows = batch.num_rows
        with self._tracing():
            state = self._prefill(
                self.params,
                self._put(batch.input_ids),
                self._put(batch.attention_mask),
                self._put(batch.images),
                self._put(batch.image_mask),
                self._put(np.arange(len(batch.input_ids)) >= rows),
                knobs,
                capacity=capacity,
                greedy=sampling.greedy,
                return_logits=return_logits,
            )
        emitted = [0] * rows  # tokens already yielded per row
        stopped_at: dict[int, int] = {}  # row -> token count when a stop string was found
        decoded = False
        while True:
            # Streaming looks at the prefill's token first (time to first token); a single
            # call without stop strings goes straight to the decode loop.
            if decoded or chunk_size is not None:
                tokens, done, length, step = _to_host(
                    (state["tokens"], state["done"], state["length"], state["step"])
                )
                tokens, done, step = tokens[:rows], done[:rows].copy(), int(step)
                lengths = [min(int(length[b]), step) for b in range(rows)]
                if sampling.stop_strings:
                    for b in range(rows):
                        if b in stopped_at or done[b]:
                            continue
                        cut = self._find_stop_string(tokens[b, : lengths[b]], sampling.stop_strings)
                        if cut is not None:
                            stopped_at[b] = cut
                            done[b] = True
                    for b, cut in stopped_at.items():
                        lengths[b] = cut
                if chunk_size is not None:
                    yield [tokens[b, emitted[b] : lengths[b]] for b in range(rows)]
                    emitted = list(lengths)
                if step >= sampling.max_new_tokens or done.all():
                    break
                if stopped_at:
                    # Rows that met a stop string stop on device too (pad from now on).
                    full_done = _to_host(state["done"]).copy()
                    full_done[list(stopped_at)] = True
                    state["done"] = self._like(full_done, state["done"])
            with self._tracing():
                state = self._decode(self.params, state, knobs, chunk, greedy=sampling.greedy)
            decoded = True
        return self._result(state, rows, sampling, stopped_at, return_logits)

    def _like(self, value: np.ndarray, reference: Array) -> Array:
        """A device array with `reference`'s sharding, so the next call does not recompile."""
        return global_array(value, reference.sharding)

    def _find_stop_string(self, tokens: np.ndarray, stops: Sequence[str]) -> int | None:
        """Fewest leading tokens whose decoded text contains a stop string, or None."""
        decode = self.tokenizer.decode
        if not any(s in decode(tokens.tolist()) for s in stops):
            return None
        low, high = 1, len(tokens)  # containment only grows with more tokens: bisect
        while low < high:
            mid = (low + high) // 2
            if any(s in decode(tokens[:mid].tolist()) for s in stops):
                high = mid
            else:
                low = mid + 1
        return low

    def _result(
        self,
        state: State,
        rows: int,
        sampling: SamplingConfig,
        stopped_at: dict[int, int],
        return_logits: bool,
    ) -> GenerationResult:
        host = _to_host(
            {k: state[k] for k in ("tokens", "logprobs", "reason", "length", "step")}
            | ({"logits": state["logits"]} if return_logits else {})
        )
        step = int(host["step"])
        padded = host["tokens"][:rows, : sampling.max_new_tokens]
        if stopped_at:
            padded = padded.copy()
        tokens, logprobs, reasons, logits, texts = [], [], [], [], []
        for b in range(rows):
            reason = int(host["reason"][b])
            n = min(int(host["length"][b]), step)
            if b in stopped_at:
                n, reason = stopped_at[b], _STOP_STRING
                padded[b, n:] = sampling.pad_token_id
            tokens.append(host["tokens"][b, :n].copy())
            logprobs.append(host["logprobs"][b, :n].copy())
            reasons.append(FINISH_REASONS[reason])
            if return_logits:
                logits.append(host["logits"][b, :n].copy())
            if self.tokenizer is not None:
                text = self.tokenizer.decode(tokens[-1].tolist())
                cuts = [text.find(s) for s in sampling.stop_strings if s in text]
                texts.append(text[: min(cuts)] if cuts else text)
        return GenerationResult(
            tokens=tokens,
            finish_reasons=reasons,
            logprobs=logprobs,
            padded_tokens=padded,
            texts=texts if self.tokenizer is not None else None,
            logits=logits if return_logits else None,
        )
