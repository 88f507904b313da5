"""One generation on the host: the request, the run of prefill and decode chunks, the result.

`Engine.generate` and `Engine.stream` (`inference/engine.py`) turn their arguments into a
`GenerationRequest`; a `GenerationRun` prefills, then calls the decode loop chunk by chunk,
and reads the `GenerationResult` back; a `GenerationStream` yields each chunk's new tokens.

Stopping. Every row stops on its own: on one of `eos_token_ids` (the eos token is not part
of the returned tokens), on a token sequence of `stop_token_sequences` (matched on device,
kept in the returned tokens), or on a string of `stop_strings`, checked on the host after
each chunk against the decoded text (tokenizations of a string are many; matching text is
the only exact test): the row's tokens are cut after the token that completes it and its
text before it. Finished rows emit the pad token until every row is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils

from llava_jax.inference.programs import PromptBatch
from llava_jax.inference.sampling import (
    FINISH_REASONS,
    Finish,
    SamplingConfig,
    batch_sampling,
)
from llava_jax.sharding import global_array


class Detokenizer(Protocol):
    """What the engine needs of a tokenizer: token ids back to text."""

    def decode(self, token_ids: list[int]) -> str: ...


# --- checks shared with the callers -----------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """What one `Engine.generate` or `Engine.stream` call asks for, each part named (see
    those methods for what each means). chunk_size: tokens per decode call; None decodes
    to the end in one call."""

    params: Any
    prompts: Sequence[np.ndarray]
    images: np.ndarray | None
    image_mask: np.ndarray | None
    sampling: SamplingConfig | Sequence[SamplingConfig]
    chunk_size: int | None
    return_logits: bool = False
    batch_rows: int | None = None
    length: int | None = None
    image_layout: np.ndarray | None = None


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


def _capacity(max_new_tokens: int) -> int:
    return max(16, 1 << (max_new_tokens - 1).bit_length())


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


class GenerationRun:
    """One generation: prefill, then decode chunks; iterating yields each chunk's new tokens
    (when streaming), `finish()` reads the result."""

    def __init__(
        self,
        engine: Any,  # the Engine (inference/engine.py) whose programs run it
        request: GenerationRequest,
        fields: dict[str, np.ndarray | None],
        rows: int,
    ):
        params, sampling = request.params, request.sampling
        self.engine, self.params, self.rows = engine, params, rows
        self.chunk_size = request.chunk_size
        self.return_logits = request.return_logits
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
                return_logits=self.return_logits,
                cache_dtype=engine.cache_dtype,
            )
        self.stopped_at: dict[int, int] = {}  # row -> token count when a stop string was met
        self._chunks = self._generate()

    def __iter__(self) -> GenerationRun:
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
                        cut = _find_stop_string(engine.tokenizer, tokens[b, : lengths[b]], stops)
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


def _find_stop_string(
    tokenizer: Detokenizer, tokens: np.ndarray, stops: Sequence[str]
) -> int | None:
    """Fewest leading tokens whose decoded text contains a stop string, or None."""
    decode_text = tokenizer.decode
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
