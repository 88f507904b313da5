"""Requests that arrive together are decoded together, in one worker thread.

The HTTP handlers (on the asyncio event loop) turn a request into a `Job`: its prompt
tokens, its images and its own `SamplingConfig`, and `submit` it. One worker thread owns
every JAX call (the event loop never waits on the model). It takes the first waiting job,
then waits at most `batch_wait_s` for more, up to `max_batch`, and decodes them as one
batch with `LoadedModel.stream`: one row per job, each row with its own temperature, top-p,
seed, max_tokens and stop strings (`SamplingParams` holds them per row, so a greedy row
picks the same tokens alone or beside others). Every batch is padded to `max_batch` rows
(filler rows stop at once): one compiled program per prompt-length bucket serves one
request or a full batch, and a request's row computes the same whether it runs alone or
not. Decoding is memory-bound, so the filler rows cost little there; a lone request's
prefill does pay for them (`--max-batch` trades that against throughput).

After every chunk of tokens, each job gets the new text (streaming jobs) and, once its row
has stopped, its final answer: a short answer in a batch does not wait for the longest.
Events go back to the job's asyncio queue through `loop.call_soon_threadsafe`. A job whose
client went away (`Job.cancel`) gets nothing more, and a batch whose every job is finished
or cancelled ends at once, so its slots are free for the next batch. A batch that fails is
retried job by job (the jobs that have not received anything yet), so one bad request
cannot fail the others; the worker itself never dies of a request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from llava_jax.errors import InputError
from llava_jax.inference.load import ModelImage
from llava_jax.inference.sampling import SamplingConfig
from llava_jax.inference.stops import visible_text

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Delta:
    """New text of a streaming answer."""

    text: str


@dataclasses.dataclass
class Done:
    """The whole answer: `text` (stripped, cut before any stop string), why it stopped
    ("stop" | "length", as OpenAI names them) and the token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class Failed:
    """The job could not run; `status` is the HTTP status it deserves."""

    message: str
    status: int = 500


@dataclasses.dataclass(eq=False)
class Job:
    """One request: `prompt` int32[L] (image tokens expanded), its `images` (`ModelImage`s
    of `LoadedModel`, in prompt order), its sampling; `stream`: send `Delta`s as the text
    grows. Events (`Delta`, then `Done` or `Failed`) arrive on `events`, an asyncio queue of
    `loop`."""

    prompt: np.ndarray
    images: Sequence[ModelImage]
    sampling: SamplingConfig
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    closed: bool = False  # Done or Failed was sent (set by the worker)
    sent_any: bool = False  # some Delta was sent (set by the worker)
    arrived: float = dataclasses.field(default_factory=time.monotonic)  # the request's
    first_token_at: float | None = None  # `time.monotonic()` of its first token (worker)

    def tokens_arrived(self) -> None:
        """From the worker: the job's answer has tokens (the first time counts)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def cancel(self) -> None:
        """The client went away: send nothing more, free the row."""
        self.cancelled.set()

    @property
    def live(self) -> bool:
        return not self.closed and not self.cancelled.is_set()

    def send(self, event: Delta | Done | Failed) -> None:
        """From the worker thread: hand `event` to the job's event loop."""
        if isinstance(event, Delta):
            self.sent_any = True
        else:
            self.closed = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.closed = True


class Batcher:
    """Decodes submitted `Job`s in batches of up to `max_batch` on one worker thread.

    model: a `LoadedModel`; batch_wait_s: how long the first job of a batch waits for
    others; chunk_size: tokens decoded between two looks at the rows (streaming
    granularity).
    """

    def __init__(
        self, model: Any, *, max_batch: int = 8, batch_wait_s: float = 0.01, chunk_size: int = 4
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s={batch_wait_s} must be >= 0")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        self.model = model
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.chunk_size = chunk_size
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._current: list[Job] = []
        self._thread = threading.Thread(target=self._work, name="llava-batcher", daemon=True)
        self.batches = 0  # batches run so far
        self.jobs = 0  # jobs finished so far (answered or failed)
        self.cancelled = 0  # jobs whose client went away before the answer was complete
        self.largest_batch = 0

    # --- the handlers' side -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def stats(self) -> dict[str, int]:
        """`running`: jobs of the current batch still being answered; `queued`: jobs
        waiting for the next batch."""
        return {
            "running": sum(job.live for job in list(self._current)),
            "queued": self._queue.qsize(),
            "max_batch": self.max_batch,
            "batches": self.batches,
            "largest_batch": self.largest_batch,
            "completed": self.jobs,
            "cancelled": self.cancelled,
        }

    # --- the worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, stopping = [job], False
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    job = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else (self._queue.get_nowait())
                    )
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            self.cancelled += sum(not job.live for job in batch)  # gone while queued
            batch = [job for job in batch if job.live]
            if batch:
                self._current = batch
                try:
                    self._run_safely(batch)
                finally:
                    self._current = []
                    self.cancelled += sum(not job.closed for job in batch)
            if stopping:
                return

    def _run_safely(self, batch: list[Job]) -> None:
        try:
            self._run(batch)
        except Exception as err:  # noqa: BLE001 - a request must never end the worker
            if len(batch) > 1:
                log.warning(
                    "a batch of %d failed (%s); retrying its jobs one by one", len(batch), err
                )
                for job in batch:
                    if not job.live:
                        continue
                    if job.sent_any:  # its answer has begun: it cannot start again
                        job.send(Failed(f"the batch failed: {err}"))
                        continue
                    self._current = [job]
                    self._run_safely([job])
                return
            job = batch[0]
            if job.live:
                user_error = isinstance(err, (InputError, ValueError))
                if not user_error:
                    log.exception("generation failed")
                job.send(Failed(str(err) or type(err).__name__, 400 if user_error else 500))
        finally:
            self.jobs += sum(1 for job in batch if job.closed)

    def _run(self, batch: list[Job]) -> None:
        model = self.model
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        prompts = [job.prompt for job in batch]
        # A batch without images has one masked slot too, so it runs the same program as a
        # batch with one image per row (a request does not compile again, or compute
        # differently, for its neighbours' images).
        images = model.batch_images([job.images for job in batch], min_slots=1)
        stream = model.stream(
            prompts,
            sampling=[job.sampling for job in batch],
            chunk_size=self.chunk_size,
            batch_rows=self.max_batch,
            **images,
        )
        tokens: list[list[int]] = [[] for _ in batch]
        shown = [""] * len(batch)
        for pieces in stream:
            finished = stream.finished or [False] * len(batch)
            for b, job in enumerate(batch):
                if not job.live:
                    continue
                tokens[b].extend(pieces[b].tolist())
                if len(pieces[b]):
                    job.tokens_arrived()
                if job.stream:
                    text = visible_text(model.decode(tokens[b]), job.sampling.stop_strings)
                    if text.startswith(shown[b]) and len(text) > len(shown[b]):
                        job.send(Delta(text[len(shown[b]) :]))
                        shown[b] = text
                if finished[b]:
                    self._finish(job, tokens[b], shown[b])
            if not any(job.live for job in batch):
                return  # every answer is sent or unwanted: the batch's slots are free
        for b, job in enumerate(batch):
            if job.live:
                self._finish(job, tokens[b], shown[b])

    def _finish(self, job: Job, tokens: list[int], shown: str) -> None:
        """The final answer of a row that stopped, as `Engine.generate`'s text: decoded,
        cut before the first stop string, stripped (as `chat` and `generate` show it)."""
        text = self.model.decode(tokens)
        cuts = [text.find(s) for s in job.sampling.stop_strings if s in text]
        if cuts:
            text = text[: min(cuts)]
        text = text.strip()
        if job.stream and text.startswith(shown) and len(text) > len(shown):
            job.send(Delta(text[len(shown) :]))
        stopped = bool(cuts) or len(tokens) < job.sampling.max_new_tokens
        job.send(
            Done(
                text=text,
                finish_reason="stop" if stopped else "length",
                prompt_tokens=len(job.prompt),
                completion_tokens=len(tokens),
            )
        )
