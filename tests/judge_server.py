"""A stand-in GPT-4 judge for tests: a real HTTP server on a free 127.0.0.1 port that speaks
OpenAI's `POST /v1/chat/completions` and decides its reply from what it receives.

It reads the user message as LLaVA's judge prompt (`[Question]`, `[<role> 1]`, `[<role> 2]`)
and scores each answer by the `(score N)` written in it (no marker: `default_score`), so a
test chooses every score through the answers it writes. `position_bias` is added to
Assistant 2's score (a judge that favours the second place); `repeat_offsets[k]` too, the
k-th time the same content is scored (the spread of a judge over runs). The reply's first
line is the two scores, as LLaVA's rule asks.

It records every request (`requests`: the question, the messages, the body, the outcome) and
`answered` (the questions it gave scores or text for, 200), checks the key (`api_key`) and
the model (`model`) as OpenAI does (401, 404 in OpenAI's error shape), and can be told to
fail a question's next requests (`fail(question, 429, 500, "garbage", "timeout", "drop",
"garbage-json")`) or to hold every request after the first `n` answers (`hold(n)`: they
wait, and are dropped unanswered on `release()`), for a test that kills its client mid-run.
The HTTP plumbing, the checks, the failures and the hold are `fake_openai.FakeOpenAI`'s.

    with JudgeServer(model="judge") as judge:
        ... --judge-base-url judge.url --judge-model judge ...
        judge.count("What colour?")  # requests received for that question
"""

from __future__ import annotations

import collections
import re
from typing import Any

from fake_openai import FakeOpenAI

SCORE = re.compile(r"\(score (-?\d+(?:\.\d+)?)\)")
QUESTION = re.compile(r"\[Question\]\n(.*?)\n\n\[", re.S)
GARBAGE = "Both answers are helpful.\nAssistant 1: 8/10, Assistant 2: 7/10."


def _section(content: str, n: int) -> str | None:
    found = re.search(rf"\[([^\]\n]+) {n}\]\n(.*?)\n\n\[End of \1 {n}\]", content, re.S)
    return None if found is None else found.group(2)


class JudgeServer(FakeOpenAI):
    """See the module docstring. `url` is the base URL an OpenAI client takes (…/v1)."""

    def __init__(
        self,
        *,
        model: str = "judge-test",
        api_key: str | None = None,
        default_score: float = 5.0,
        position_bias: float = 0.0,
        repeat_offsets: tuple[float, ...] = (0.0,),
        delay_s: float = 0.0,
        slow_s: float = 3.0,
        retry_after_ms: int | None = 10,
    ):
        super().__init__(
            model=model,
            api_key=api_key,
            delay_s=delay_s,
            slow_s=slow_s,
            retry_after_ms=retry_after_ms,
        )
        self.default_score = default_score
        self.position_bias = position_bias
        self.repeat_offsets = repeat_offsets
        self._scored: collections.Counter[str] = collections.Counter()

    def fail(self, question: str, *outcomes: int | str) -> None:
        """The next requests about `question` get these outcomes, in order: an HTTP status
        (429, 500, 503 …), "garbage" (a reply without two scores), "timeout" (the reply
        comes `slow_s` late), "drop" (the connection closes unanswered), "garbage-json" (a
        200 whose body is not JSON)."""
        self._queue(question, outcomes)

    # --- what the judge says -------------------------------------------------------------

    def _describe(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        found = QUESTION.search(messages[-1].get("content") or "")
        return {"question": found.group(1) if found else None}

    def _matches(self, key: Any, record: dict[str, Any]) -> bool:
        return record["question"] == key

    def _subject(self, record: dict[str, Any]) -> Any:
        return record["question"]

    def _content(self, record: dict[str, Any], step: Any) -> tuple[Any, str | None]:
        if step == "garbage":
            return "garbage", GARBAGE
        return "scored", self._scores(record["messages"][-1].get("content") or "")

    def _score(self, answer: str | None) -> float:
        found = SCORE.search(answer or "")
        return float(found.group(1)) if found else self.default_score

    def _scores(self, content: str) -> str:
        with self._lock:
            k = self._scored[content]
            self._scored[content] += 1
        offset = self.repeat_offsets[min(k, len(self.repeat_offsets) - 1)]
        first = self._score(_section(content, 1))
        second = self._score(_section(content, 2)) + self.position_bias + offset
        return f"{first:g} {second:g}\nAssistant 1 scored {first:g}, Assistant 2 {second:g}."
