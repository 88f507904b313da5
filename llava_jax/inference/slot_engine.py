"""Continuous batching on the host: requests enter free decode slots between decode steps and
leave the moment their answers end (device programs: `inference/slots.py`).

`SlotEngine(engine, params, max_slots=8, cache_length=512)` keeps one `SlotState` on the
device. `submit(prompt, …)` checks a request and queues it; a scheduler thread, every
round, prefills waiting requests into free slots (`prefill_request` + `insert`), runs
`steps_per_round` decode steps for all live slots, hands each request its new tokens
(`SlotRequest`: iterate it, or `result()`), and frees a slot as soon as its answer ends or
its caller cancels it. Shapes are fixed (slots, cache length, prompt-length buckets), so
admitting a request never recompiles. Greedy answers equal `Engine.generate`'s, token for
token, whether a request runs alone, among full slots or is admitted mid-way.

Eos ids, stop token sequences and limits stop a row on the device; stop strings on the host
(the answer decoded with the engine's tokenizer after each token; the slot is freed at once).
Not yet here (issue 27): a mesh, chunked prefill, the image and prefix caches, admission by a
memory budget.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from llava_jax.inference.engine import Engine
from llava_jax.inference.programs import PromptBatch
from llava_jax.inference.sampling import FINISH_REASONS, Finish, SamplingConfig, batch_sampling
from llava_jax.inference.slots import decode_steps, evict, init_slots, insert, prefill_request

_DONE = object()  # the last item of a request's queue


@dataclasses.dataclass(eq=False)
class SlotRequest:
    """One request: its tokens as they come, then its finish reason ("eos", "stop",
    "length" or "cancelled")."""

    batch: dict[str, Any]
    sampling: SamplingConfig
    # Called on the scheduler thread instead of queueing: (new tokens, None) as they come,
    # then ([], finish reason) once (a server hands them to its own event loop).
    listener: Callable[[list[int], str | None], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    _events: queue.Queue = dataclasses.field(default_factory=queue.Queue, repr=False)
    _cancelled: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    def __iter__(self) -> Iterator[list[int]]:
        """Lists of new tokens, as they are decoded, until the answer ends."""
        return self._iterate(None)

    def result(self, timeout: float | None = None) -> tuple[list[int], str]:
        """(every token, finish reason), once the answer ended."""
        for _ in self._iterate(timeout):
            pass
        return list(self.tokens), str(self.finish_reason)

    def _iterate(self, timeout: float | None) -> Iterator[list[int]]:
        while True:
            item = self._events.get(timeout=timeout)
            if item is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def cancel(self) -> None:
        """Stop this request: its slot is freed at the next round (the caller went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, tokens: list[int]) -> None:
        if tokens:
            self.tokens.extend(tokens)
            if self.listener is not None:
                self.listener(tokens, None)
            else:
                self._events.put(tokens)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        self.finish_reason, self.error = reason, error
        if self.listener is not None:
            self.listener([], reason)
        self._events.put(_DONE)


class SlotEngine:
    """Decode slots that requests enter and leave between decode steps (module docstring).

    engine: an `Engine` without a mesh (its model, length buckets and checks); params: its
    parameters; max_slots: rows decoded together; cache_length: the KV slots of a row (a
    request's prompt bucket plus its max_new_tokens must fit); steps_per_round: decode
    steps between admissions; shared: the eos ids, stop sequences, pad token and image-token
    suppression every request must share (their other settings are their own).
    """

    def __init__(
        self,
        engine: Engine,
        params: Any,
        *,
        max_slots: int = 8,
        cache_length: int = 512,
        steps_per_round: int = 4,
        shared: SamplingConfig | None = None,
    ):
        if engine.mesh is not None:
            raise ValueError("SlotEngine runs on one device for now: give it an Engine, no mesh")
        if max_slots < 1 or steps_per_round < 1:
            raise ValueError(
                f"max_slots={max_slots} and steps_per_round={steps_per_round} must be >= 1"
            )
        context = engine.config.text.max_position_embeddings
        if cache_length > context:
            raise ValueError(f"cache_length={cache_length} exceeds the model's context ({context})")
        self.engine, self.params = engine, params
        self.max_slots, self.cache_length = max_slots, cache_length
        self.steps_per_round = steps_per_round
        self.shared = shared or SamplingConfig()
        model, cache_dtype = engine.model, engine.cache_dtype
        self._shared_params = engine.sampling_params([self.shared], rows=1)
        self.state = jax.jit(
            functools.partial(init_slots, model, max_slots, cache_length, cache_dtype)
        )(self._shared_params)
        self._prefill = jax.jit(
            functools.partial(prefill_request, model, cache_dtype=cache_dtype),
            static_argnames="greedy",
        )
        self._insert = jax.jit(insert, donate_argnums=0)
        self._decode = jax.jit(
            functools.partial(decode_steps, model),
            static_argnames=("steps", "greedy"),
            donate_argnums=1,
        )
        self._evict = jax.jit(evict, donate_argnums=0)
        self._slots: list[SlotRequest | None] = [None] * max_slots
        self._waiting: collections.deque[SlotRequest] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="slot-engine", daemon=True)
        self._thread.start()

    # --- the caller's side --------------------------------------------------------------------
    def submit(
        self,
        prompt: np.ndarray,
        images: np.ndarray | None = None,
        image_mask: np.ndarray | None = None,
        sampling: SamplingConfig | None = None,
        image_layout: np.ndarray | None = None,
        listener: Callable[[list[int], str | None], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> SlotRequest:
        """Queue one request: `prompt: int32[L]` with its images (`images float32[1, I, T,
        H, W, 3]`, `image_mask bool[1, I]`, `image_layout int32[1, I, N]`, as
        `Engine.generate` takes them for one row); `listener`: see `SlotRequest`;
        `cancelled`: an event whose setting cancels the request (`SlotRequest.cancel`). Raises
        ValueError when the request
        cannot run here: settings it must share differ, or its prompt bucket and
        max_new_tokens do not fit `cache_length`."""
        sampling = sampling or dataclasses.replace(self.shared)
        batch_sampling([self.shared, sampling])  # raises when a shared setting differs
        if sampling.stop_strings and self.engine.tokenizer is None:
            raise ValueError("stop_strings need an Engine with a tokenizer to decode the text")
        fields, _ = self.engine.prepare(
            [prompt],
            images,
            image_mask,
            pad_token_id=sampling.pad_token_id,
            max_new_tokens=sampling.max_new_tokens,
            batch_rows=1,
            image_layout=image_layout,
        )
        needed = fields["input_ids"].shape[1] + sampling.max_new_tokens
        if needed > self.cache_length:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens, bucket {fields['input_ids'].shape[1]}) and "
                f"max_new_tokens={sampling.max_new_tokens} need {needed} cache slots, more "
                f"than cache_length={self.cache_length}"
            )
        request = SlotRequest(batch=fields, sampling=sampling, listener=listener)
        if cancelled is not None:
            request._cancelled = cancelled
        with self._wake:
            if self._closed:
                raise RuntimeError("the slot engine is closed")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def generate(
        self, prompts: Sequence[np.ndarray], sampling: SamplingConfig | None = None, **images: Any
    ) -> list[list[int]]:
        """Every prompt's tokens, submitted at once (text-only prompts, or each row's images
        as `submit` takes them: `images=[…]`, `image_mask=[…]`, `image_layout=[…]`)."""
        requests = [
            self.submit(p, sampling=sampling, **{k: v[i] for k, v in images.items()})
            for i, p in enumerate(prompts)
        ]
        return [r.result()[0] for r in requests]

    def close(self) -> None:
        """Stop the scheduler; requests still waiting or running end as "cancelled"."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def __enter__(self) -> SlotEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def slots_in_use(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # --- the scheduler ------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._closed and not self._waiting and not self.slots_in_use:
                        self._wake.wait()
                    if self._closed:
                        break
                self._round()
        except BaseException as error:  # a device error ends every request, with the error
            self._end_all("error", error)
            raise
        self._end_all("cancelled")

    def _end_all(self, reason: str, error: BaseException | None = None) -> None:
        with self._wake:
            self._closed = True
            pending = [r for r in self._slots if r is not None] + list(self._waiting)
            self._waiting.clear()
        self._slots = [None] * self.max_slots
        for request in pending:
            request._finish(reason, error)

    def _round(self) -> None:
        """Free cancelled slots, admit waiting requests into free slots, decode a few steps."""
        for slot, request in enumerate(self._slots):
            if request is not None and request.cancelled:
                self.state = self._evict(self.state, slot)
                self._slots[slot] = None
                request._finish("cancelled")
        for slot in range(self.max_slots):
            if self._slots[slot] is not None:
                continue
            with self._wake:
                request = self._waiting.popleft() if self._waiting else None
            if request is None:
                break
            if request.cancelled:
                request._finish("cancelled")
                continue
            self._admit(request, slot)
        if not self.slots_in_use:
            return
        greedy = all(r is None or r.sampling.greedy for r in self._slots)
        self.state, out = self._decode(
            self.params, self.state, steps=self.steps_per_round, greedy=greedy
        )
        tokens, kept, finished, reason = jax.device_get(
            (out.token, out.kept, out.finished, out.reason)
        )
        for slot, request in enumerate(self._slots):
            if request is None:
                continue
            for step in range(self.steps_per_round):
                self._deliver(slot, request, tokens[step, slot], kept[step, slot],
                              finished[step, slot], reason[step, slot])  # fmt: skip
                if self._slots[slot] is None:
                    break

    def _admit(self, request: SlotRequest, slot: int) -> None:
        fields = request.batch
        batch = PromptBatch(
            input_ids=fields["input_ids"],
            attention_mask=fields["attention_mask"],
            images=fields["images"],
            image_mask=fields["image_mask"],
            filler=fields["filler"],
            image_layout=fields["image_layout"],
        )
        sampling = self.engine.sampling_params([request.sampling], rows=1)
        prefilled = self._prefill(self.params, batch, sampling, greedy=request.sampling.greedy)
        self.state, out = self._insert(self.state, prefilled, np.int32(slot))
        self._slots[slot] = request
        token, kept, finished, reason = jax.device_get(
            (out.token[slot], out.kept[slot], out.finished[slot], out.reason[slot])
        )
        self._deliver(slot, request, token, kept, finished, reason)

    def _stop_string_met(self, request: SlotRequest) -> bool:
        stops = request.sampling.stop_strings
        if not stops:
            return False
        text = self.engine.tokenizer.decode(request.tokens)
        return any(stop in text for stop in stops)

    def _deliver(
        self, slot: int, request: SlotRequest, token: Any, kept: Any, finished: Any, reason: Any
    ) -> None:
        """One step's token of `slot`'s request; the slot is freed when the answer ended
        (on the device: an eos, a stop sequence, its limit; here: a stop string)."""
        if kept:
            request._emit([int(token)])
            if self._stop_string_met(request):
                self.state = self._evict(self.state, slot)
                self._slots[slot] = None
                request._finish("stop")
                return
        if finished:
            self._slots[slot] = None
            request._finish(FINISH_REASONS[Finish(int(reason))])
