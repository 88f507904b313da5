"""The host-side generation engine: batches prompts, runs the compiled programs, reads back.

`Engine(config, mesh=…)` holds no parameters: `engine.generate(params, prompts, …)` pads a
batch, calls the two programs (`prefill` and `decode`, `inference/programs.py`) and reads the
result back; `engine.stream(…)` yields the new tokens chunk by chunk (the run itself:
`inference/generation.py`). An engine built once serves every call (the trainer's
evaluations, a chat's turns) without compiling again.

Compilation. Shapes are static, so each distinct shape compiles once:

- the prompt length is padded up to a *length bucket* (default: powers of two from 16),
- the new-token capacity is `max_new_tokens` rounded up to a power of two (>= 16); the
  actual `max_new_tokens` is traced, so it does not recompile within a capacity,
- the batch is padded with filler rows up to `batch_rows` and a multiple of the mesh's
  data-parallel size,
- greedy (`temperature == 0`) and sampling are two programs; temperature, top-k, top-p, the
  seed, eos ids and stop sequences are traced (`SamplingParams`, `inference/sampling.py`),
  one value for the batch or one per row,
- the decode loop runs at most `chunk` steps per call, `chunk` traced, so streaming in
  chunks of N tokens reuses the program of one long call.

Sharding. With a mesh, the batch and the KV cache are split over `('data', 'fsdp')` (and KV
heads over `tensor` where it divides) through logical constraints; tracing runs under
`jax.set_mesh(mesh)` and the logical axis rules. Parameters are used where they lie
(`Engine.place` puts host parameters onto the mesh).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llava_jax.errors import PromptTooLongError
from llava_jax.inference.generation import (
    Detokenizer,
    GenerationRequest,
    GenerationResult,
    GenerationRun,
    GenerationStream,
)
from llava_jax.inference.programs import decode, prefill
from llava_jax.inference.sampling import SamplingConfig, SamplingParams, batch_sampling
from llava_jax.models.config import ModelConfig
from llava_jax.models.inputs import ImageGeometry
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
DEFAULT_SAMPLING = SamplingConfig()  # `generate`'s and `stream`'s default (greedy)


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


def default_length_bucket(length: int) -> int:
    """Powers of two from 16: prompts of 17..32 tokens share one compilation, and so on."""
    return max(16, 1 << (max(length, 1) - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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
        self.geometry = ImageGeometry.of(config)
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

    def _tracing(self, rules: Rules | None = None):
        """Context for calls that may trace: the mesh and the logical axis rules (the
        engine's, or `rules`)."""
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nn.logical_axis_rules(self.rules if rules is None else rules))
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
        batch, geometry = len(prompts), self.geometry
        if images is not None:
            images = np.asarray(images, np.float32)
            shape = (batch, None, *geometry.tiles_shape(self.config.vision.num_channels))
            if images.ndim != len(shape) or images.shape[0] != batch:
                raise ValueError(
                    f"images must be float32[B, I, T, H, W, 3] (each image's tiles) with "
                    f"B={batch}, T={geometry.max_tiles}, got {images.shape}"
                )
            if image_mask is None:
                image_mask = np.ones(images.shape[:2], bool)
            image_mask = np.asarray(image_mask, bool)
            if image_layout is None:
                image_layout = geometry.layouts_in_order(*images.shape[:2])
            if np.shape(image_layout) != (*images.shape[:2], *geometry.layout_shape):
                shape = ", ".join(map(str, geometry.layout_shape))
                raise ValueError(
                    f"image_layout must be int32[B, I, {shape}] (N={geometry.max_tokens}), got "
                    f"{np.shape(image_layout)} for images {images.shape}"
                )
            image_layout = np.asarray(image_layout, np.int32)
        for b, prompt in enumerate(prompts):
            found = int(np.isin(prompt, self.config.media_token_ids).sum())
            wanted, valid = 0, 0
            if images is not None:
                wanted = int((geometry.layout_tokens(image_layout[b]) * image_mask[b]).sum())
                valid = int(image_mask[b].sum())
            if found != wanted:
                raise ValueError(
                    f"prompt {b} has {found} image tokens but its {valid} image(s) need "
                    f"{wanted} (as their sizes give)"
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
            filler = geometry.empty_layouts(extra, image_layout.shape[1])
            image_layout = np.concatenate([image_layout, filler])
        fields = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "images": images,
            "image_mask": image_mask,
            "filler": np.arange(rows) >= batch,
            "image_layout": image_layout,
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
        sampling: SamplingConfig | Sequence[SamplingConfig] = DEFAULT_SAMPLING,
        *,
        return_logits: bool = False,
        batch_rows: int | None = None,
        length: int | None = None,
        image_layout: np.ndarray | None = None,
    ) -> GenerationResult:
        """Generate for a batch of prompts of any lengths.

        prompts: B arrays int32[T_b] (with each valid image's image tokens); images:
        float32[B, I, T, H, W, 3] (each image's tiles, normalised; models/inputs.py) or None;
        image_mask: bool[B, I] (default all True); image_layout: int32[B, I, N] (default:
        one-tile images' features in order; a tiled model needs it). batch_rows: pad the
        batch to this many rows (filler rows that stop at once), so a last, smaller batch
        reuses the compiled programs. length: pad every prompt to this length instead of its
        bucket. Without stop strings the whole
        generation is one device call. sampling: one config for every row, or one per
        prompt (each row with its own temperature, top-k, top-p, seed, max_new_tokens and
        stop strings; see `batch_sampling` for what they share).
        """
        shared = sampling if isinstance(sampling, SamplingConfig) else batch_sampling(sampling)
        chunk = DEFAULT_STOP_CHECK_INTERVAL if shared.stop_strings else None
        run = self._run(
            GenerationRequest(
                params=params,
                prompts=prompts,
                images=images,
                image_mask=image_mask,
                sampling=sampling,
                chunk_size=chunk,
                return_logits=return_logits,
                batch_rows=batch_rows,
                length=length,
                image_layout=image_layout,
            )
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
        sampling: SamplingConfig | Sequence[SamplingConfig] = DEFAULT_SAMPLING,
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
            GenerationRequest(
                params=params,
                prompts=prompts,
                images=images,
                image_mask=image_mask,
                sampling=sampling,
                chunk_size=chunk_size,
                batch_rows=batch_rows,
                image_layout=image_layout,
            )
        )
        return GenerationStream(run, run.finish)

    def _run(self, request: GenerationRequest) -> GenerationRun:
        prompts, sampling = request.prompts, request.sampling
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
            request.images,
            request.image_mask,
            shared.pad_token_id,
            shared.max_new_tokens if per_row is None else 0,
            request.batch_rows,
            request.length,
            request.image_layout,
        )
        return GenerationRun(self, request, fields, rows)
