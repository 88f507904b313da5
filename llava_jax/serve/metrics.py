"""`GET /metrics`: the server's counters, gauges and histograms in Prometheus' text format
(version 0.0.4), written here, so serving needs no client library.

- `llava_jax_requests_total{outcome}`: answered ("completed"), failed ("failed": the
  server's fault), refused ("refused": a 4xx, the request's fault) and "cancelled" (the
  client went away first);
- `llava_jax_prompt_tokens_total`, `llava_jax_generated_tokens_total` (answered requests;
  tokens/s is their rate);
- `llava_jax_requests_waiting`, `llava_jax_requests_running`, `llava_jax_slots_in_use`,
  `llava_jax_slots` (the engine's stats at scrape time);
- `llava_jax_time_to_first_token_seconds`, `llava_jax_time_per_output_token_seconds`
  (histograms; from the request's arrival to its first token, and between its later tokens);
- `llava_jax_image_cache_lookups_total{result}` (hits, misses), `llava_jax_image_cache_bytes`
  and the same of the prefix cache (its lookups are of prompt blocks), with the slot engine's
  caches.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
OUTCOMES = ("completed", "failed", "refused", "cancelled")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Cumulative buckets (`le`), a sum and a count, as Prometheus histograms are."""

    def __init__(self, buckets: Sequence[float]):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return [*out, f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class ServerMetrics:
    """What the server counts; every method may be called from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.first_token = Histogram(TTFT_BUCKETS)
        self.per_token = Histogram(TPOT_BUCKETS)

    def count(self, outcome: str) -> None:
        """One request ended with `outcome` (one of `OUTCOMES`)."""
        with self._lock:
            self.requests[outcome] += 1

    def answered(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        arrived: float,
        first_token: float | None,
        finished: float,
    ) -> None:
        """An answered request: its token counts and its times (`time.monotonic()`: its
        arrival, its first token, its end)."""
        with self._lock:
            self.requests["completed"] += 1
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += completion_tokens
            if first_token is not None:
                self.first_token.observe(max(first_token - arrived, 0.0))
                if completion_tokens > 1:
                    gap = (finished - first_token) / (completion_tokens - 1)
                    self.per_token.observe(max(gap, 0.0))

    def render(self, stats: dict[str, int]) -> str:
        """The text format, with the engine's `stats` (its `running`, `queued` and, for
        decode slots, `slots_in_use` and `max_slots`) as gauges."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        with self._lock:
            metric(
                "llava_jax_requests_total",
                "counter",
                "Requests ended, by outcome.",
                [
                    f'llava_jax_requests_total{{outcome="{o}"}} {n}'
                    for o, n in self.requests.items()
                ],
            )
            metric(
                "llava_jax_prompt_tokens_total",
                "counter",
                "Prompt tokens of answered requests.",
                [f"llava_jax_prompt_tokens_total {self.prompt_tokens}"],
            )
            metric(
                "llava_jax_generated_tokens_total",
                "counter",
                "Tokens generated for answered requests.",
                [f"llava_jax_generated_tokens_total {self.generated_tokens}"],
            )
            metric(
                "llava_jax_time_to_first_token_seconds",
                "histogram",
                "From a request's arrival to its first generated token.",
                self.first_token.lines("llava_jax_time_to_first_token_seconds"),
            )
            metric(
                "llava_jax_time_per_output_token_seconds",
                "histogram",
                "Mean time between a request's generated tokens after the first.",
                self.per_token.lines("llava_jax_time_per_output_token_seconds"),
            )
        gauges = {
            "llava_jax_requests_waiting": ("Requests waiting for a batch or a slot.", "queued"),
            "llava_jax_requests_running": ("Requests being decoded.", "running"),
            "llava_jax_slots_in_use": ("Decode slots holding a request.", "slots_in_use"),
            "llava_jax_slots": ("Decode slots (continuous batching).", "max_slots"),
        }
        for cache in ("image", "prefix"):
            what = f"{cache}_cache"
            gauges[f"llava_jax_{what}_bytes"] = (f"Bytes the {cache} cache holds.", f"{what}_bytes")
        for name, (help_text, key) in gauges.items():
            if key in stats:
                metric(name, "gauge", help_text, [f"{name} {int(stats[key])}"])
        for cache in ("image", "prefix"):
            what = f"{cache}_cache"
            if f"{what}_hits" not in stats:
                continue
            name = f"llava_jax_{what}_lookups_total"
            samples = [
                f'{name}{{result="{result}"}} {int(stats[f"{what}_{result}"])}'
                for result in ("hits", "misses")
            ]
            metric(name, "counter", f"Lookups in the {cache} cache, by result.", samples)
        return "\n".join(lines) + "\n"
