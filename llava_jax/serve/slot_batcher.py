"""The server's jobs decoded with continuous batching (`--engine slots`): each `Job` enters a
free decode slot of a `SlotEngine` (inference/slot_engine.py) between decode steps and
leaves the moment its answer ends or its client goes away, instead of waiting for a batch
to form and to end (`batcher.py`, `--engine batch`).

The slot engine's scheduler thread owns every JAX call and calls each job's listener with
its new tokens; the listener streams the visible text (`visible_text`), and the final answer
is `Engine.generate`'s text: decoded, cut before the first stop string, stripped. A job
whose client went away cancels its request, which frees the slot in the next round.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import jax

from llava_jax.inference.kv_budget import (
    default_kv_cache_bytes,
    kv_bytes_per_token,
    kv_split,
    slot_layout,
)
from llava_jax.inference.slot_engine import SlotEngine
from llava_jax.inference.stops import visible_text
from llava_jax.serve.batcher import Delta, Done, Failed, Job
from llava_jax.sharding import device_bytes

log = logging.getLogger(__name__)


class SlotBatcher:
    """`Batcher`'s interface (start, stop, submit, stats) over a `SlotEngine` of `model`
    (a `LoadedModel`, on one device or a mesh): at most max_slots rows decoded together, each with
    cache_length KV slots (0: the longest the budget allows, at most the context), as many
    as `kv_cache_bytes` holds (0: `default_kv_cache_bytes`); steps_per_round decode steps
    between admissions; prefill_chunk: the size of a prefill step (0: whole prompts);
    prefill_budget: prompt tokens prefilled a round while answers decode (0: one chunk);
    image_cache_bytes, prefix_cache_bytes: images' features and prompt blocks' keys and
    values kept for later requests (0: none)."""

    def __init__(
        self,
        model: Any,
        *,
        max_slots: int = 8,
        cache_length: int = 0,
        steps_per_round: int = 4,
        prefill_chunk: int = 0,
        prefill_budget: int = 0,
        image_cache_bytes: int = 0,
        prefix_cache_bytes: int = 0,
        kv_cache_bytes: int = 0,
    ):
        self.model = model
        self.kv_cache_bytes = kv_cache_bytes
        self.image_cache_bytes, self.prefix_cache_bytes = image_cache_bytes, prefix_cache_bytes
        self.max_slots, self.steps_per_round = max_slots, steps_per_round
        self.prefill_chunk, self.cache_length = prefill_chunk, cache_length
        self.prefill_budget = prefill_budget
        self.engine: SlotEngine | None = None
        self._lock = threading.Lock()
        self.completed = 0  # jobs answered or failed
        self.cancelled = 0  # jobs whose client went away first
        self.most_in_use = 0  # the most slots busy at once

    def start(self) -> None:
        """The slots and their cache length from the KV cache budget (`slot_layout`), then
        the engine."""
        engine = self.model.engine
        per_token = kv_bytes_per_token(self.model.config, engine.cache_dtype)
        if not self.kv_cache_bytes:
            params_bytes = device_bytes(self.model.params)
            self.kv_cache_bytes = default_kv_cache_bytes(jax.devices()[0], params_bytes)
        # The budget is a device's: on a mesh each holds a data shard's slots, its heads.
        slot_split, head_split = kv_split(self.model.config, engine.mesh)
        self.max_slots, self.cache_length = slot_layout(
            per_token,
            self.kv_cache_bytes * slot_split * head_split,
            self.max_slots,
            self.cache_length,
            self.model.context_length,
            slot_multiple=slot_split,
        )
        self.engine = SlotEngine(
            self.model.engine,
            self.model.params,
            max_slots=self.max_slots,
            cache_length=self.cache_length,
            steps_per_round=self.steps_per_round,
            prefill_chunk=self.prefill_chunk,
            prefill_budget=self.prefill_budget,
            image_cache_bytes=self.image_cache_bytes,
            prefix_cache_bytes=self.prefix_cache_bytes,
            shared=self.model.sampling(),
        )

    def stop(self, timeout: float | None = 5.0) -> None:
        if self.engine is not None:
            self.engine.close()

    def stats(self) -> dict[str, int]:
        engine = self.engine
        in_use = engine.slots_in_use if engine else 0
        stats = {
            "running": in_use,
            "queued": engine.waiting if engine else 0,
            "max_slots": self.max_slots,
            "cache_length": self.cache_length,
            "slots_in_use": in_use,
            "most_slots_in_use": self.most_in_use,
            "completed": self.completed,
            "cancelled": self.cancelled,
        }
        for name in ("image", "prefix"):
            cache = getattr(engine, f"{name}_cache", None)
            if cache is not None:
                stats[f"{name}_cache_hits"] = cache.hits
                stats[f"{name}_cache_misses"] = cache.misses
                stats[f"{name}_cache_bytes"] = cache.bytes
        return stats

    def submit(self, job: Job) -> None:
        """Queue `job`; a request that cannot run here fails at once with a 400."""
        images = self.model.batch_images([job.images], min_slots=1)
        answer = _Answer(self, job)
        try:
            self.engine.submit(
                job.prompt,
                images["images"],
                images["image_mask"],
                sampling=job.sampling,
                image_layout=images["image_layout"],
                listener=answer.on_tokens,
                cancelled=job.cancelled,  # the client going away frees the slot
            )
        except ValueError as err:
            budget = (
                f" (the KV cache budget, {self.kv_cache_bytes} bytes, holds {self.max_slots} "
                f"slots of {self.cache_length} tokens)"
            )
            job.send(Failed(f"{err}{budget if 'cache_length' in str(err) else ''}", 400))
            self._count(cancelled=False)

    def _count(self, cancelled: bool) -> None:
        with self._lock:
            if cancelled:
                self.cancelled += 1
            else:
                self.completed += 1


class _Answer:
    """One job's answer as its tokens arrive (called on the scheduler thread)."""

    def __init__(self, owner: SlotBatcher, job: Job):
        self.owner, self.job = owner, job
        self.tokens: list[int] = []  # the answer so far (the listener may run before
        self.shown = ""  # `submit` returns, so it keeps its own)

    def on_tokens(self, tokens: list[int], finish: str | None) -> None:
        job, model = self.job, self.owner.model
        self.owner.most_in_use = max(self.owner.most_in_use, self.owner.engine.slots_in_use)
        if job.closed:
            return
        if not job.live:  # the client went away: its cancel event frees the slot
            if finish is not None:
                job.closed = True
                self.owner._count(cancelled=True)
            return
        if tokens:
            job.tokens_arrived()
            self.tokens.extend(tokens)
        if finish is None:
            if job.stream:
                text = visible_text(model.decode(self.tokens), job.sampling.stop_strings)
                if text.startswith(self.shown) and len(text) > len(self.shown):
                    job.send(Delta(text[len(self.shown) :]))
                    self.shown = text
            return
        if finish in ("cancelled", "error"):
            job.send(Failed(f"the answer ended early ({finish})"))
        else:
            self._finish(self.tokens, finish)
        self.owner._count(cancelled=False)

    def _finish(self, tokens: list[int], finish: str) -> None:
        """The final answer, as `Engine.generate`'s text: decoded, cut before the first
        stop string, stripped."""
        job = self.job
        text = self.owner.model.decode(tokens)
        cuts = [text.find(s) for s in job.sampling.stop_strings if s in text]
        if cuts:
            text = text[: min(cuts)]
        text = text.strip()
        if job.stream and text.startswith(self.shown) and len(text) > len(self.shown):
            job.send(Delta(text[len(self.shown) :]))
        job.send(
            Done(
                text=text,
                finish_reason="length" if finish == "length" else "stop",
                prompt_tokens=len(job.prompt),
                completion_tokens=len(tokens),
            )
        )
