"""A stand-in for the LLM of LLaVA's GPT-assisted instruction-data generation, for tests: a
real HTTP server on a free 127.0.0.1 port that speaks OpenAI's `POST /v1/chat/completions`
(non-streaming), so the real `openai` client talks to it, and decides its reply from what it
receives.

    with InstructServer(model="llm") as llm:
        ... base_url=llm.url (http://127.0.0.1:PORT/v1), model "llm" ...
        llm.count("a dog on a sofa")  # requests whose context holds that text

Constructor (keywords): model="llm-test" (another model: 404), api_key=None (None: any key;
else `Authorization: Bearer KEY` or 401), retry_after_ms=10 (the `retry-after-ms` header of
429 and 5xx), slow_s=3.0 (how late a "timeout" answers), delay_s=0.0 (added to every answer).

A request's messages are a system message, few-shot pairs (user, assistant, …), then the
final user message: the context of one image, caption lines (one per line), then optionally
one blank line and box lines `category: [x1, y1, x2, y2]` (floats, 3 decimals).

The KIND of a request comes from the first few-shot assistant message (messages[2]): lines
equal to "Question:" (stripped) > 1: "conversation"; == 1: "complex_reasoning"; 0 (or no
few-shot): "detail_description". The default reply is built from the context alone
(`default_reply`), deterministic so a test can write the expected records by hand; captions =
the non-empty lines before the first blank line, boxes = the lines after it:

    conversation        "\\n===\\n".join(f"Question:\\nWhat is shown, view {i + 1}?\\n===\\n"
                                         f"Answer:\\n{caption_i}" for each caption, i from 0)
    complex_reasoning   f"Question:\\nWhy might this scene matter?\\n===\\nAnswer:\\n"
                        f"{captions[0]} There are {len(boxes)} objects to consider."
    detail_description  " ".join(captions) + f" Objects: {', '.join(categories)}." if boxes

`script(marker, *replies)`: the next requests whose context contains `marker` get these
replies, one each, then default replies resume. A reply is a text, None (a 200 whose message
content is null), or a failure: 429, 500, 400 … (that status, OpenAI's error shape), "timeout"
(sleeps `slow_s`, then answers as by default), "drop" (the connection closes unanswered),
"garbage-json" (a 200 whose body is not JSON, sent as application/json).

Every 200 completion carries `usage`: prompt_tokens = whitespace-separated words of all the
messages' contents, completion_tokens = words of the reply, total_tokens = their sum.

`hold(n)`: once n requests are let through to a 200 answer, every further request waits
until `release()`, which closes the held ones' connections unanswered (for a test that
kills its client mid-run); `held` counts them. `requests`: one dict per request,
"messages", "body" (the parsed JSON), "kind",
"context" (the final user content), "outcome" (200, 429, 500, 400, 401, 404, "timeout",
"drop", "garbage-json", "held"); `answered`: the contexts of the 200 answers that reached the
client; `count(marker)`, `outcomes(marker)`: of the requests whose context contains marker.
Thread-safe. `close()` (or leaving the `with`) shuts the server down, releasing held requests.
The HTTP plumbing, the checks, the failures and the hold are `fake_openai.FakeOpenAI`'s.
"""

from __future__ import annotations

import re
from typing import Any

from fake_openai import UNSCRIPTED, FakeOpenAI, message_text

BOX = re.compile(r"^(.*?):\s*\[([^\]]*)\]\s*$")
KINDS = ("conversation", "complex_reasoning", "detail_description")


def request_kind(messages: list[dict[str, Any]]) -> str:
    """The kind of request, from its first few-shot assistant message."""
    shots = [m for m in messages[1:-1] if isinstance(m, dict) and m.get("role") == "assistant"]
    if not shots:
        return "detail_description"
    questions = sum(
        1
        for line in message_text(shots[0].get("content")).splitlines()
        if line.strip() == "Question:"
    )
    if questions > 1:
        return "conversation"
    return "complex_reasoning" if questions == 1 else "detail_description"


def parse_context(context: str) -> tuple[list[str], list[tuple[str, list[float]]]]:
    """Captions (the non-empty lines before the first blank line) and boxes (the lines
    after it that read `category: [x1, y1, x2, y2]`)."""
    lines = context.split("\n")
    blank = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    captions = [line.strip() for line in lines[:blank] if line.strip()]
    boxes = []
    for line in lines[blank + 1 :]:
        found = BOX.match(line.strip())
        if found:
            try:
                coords = [float(x) for x in found.group(2).split(",")]
            except ValueError:
                continue
            boxes.append((found.group(1).strip(), coords))
    return captions, boxes


def default_reply(kind: str, context: str) -> str:
    """The reply to a request of `kind` about `context` when no script speaks for it."""
    captions, boxes = parse_context(context)
    if kind == "conversation":
        return "\n===\n".join(
            f"Question:\nWhat is shown, view {i + 1}?\n===\nAnswer:\n{c}"
            for i, c in enumerate(captions)
        )
    if kind == "complex_reasoning":
        first = captions[0] if captions else ""
        return (
            f"Question:\nWhy might this scene matter?\n===\nAnswer:\n"
            f"{first} There are {len(boxes)} objects to consider."
        )
    objects = f" Objects: {', '.join(category for category, _ in boxes)}." if boxes else ""
    return " ".join(captions) + objects


class InstructServer(FakeOpenAI):
    """See the module docstring. `url` is the base URL an OpenAI client takes (…/v1)."""

    def __init__(
        self,
        *,
        model: str = "llm-test",
        api_key: str | None = None,
        retry_after_ms: int | None = 10,
        slow_s: float = 3.0,
        delay_s: float = 0.0,
    ):
        super().__init__(
            model=model,
            api_key=api_key,
            delay_s=delay_s,
            slow_s=slow_s,
            retry_after_ms=retry_after_ms,
        )

    def script(self, marker: str, *replies: str | int | None) -> None:
        """The next requests whose context contains `marker` get these replies, in order:
        a text, None (null content), or a failure (429, 500, 400 …, "timeout", "drop",
        "garbage-json"). Then default replies resume."""
        self._queue(marker, replies)

    def __enter__(self) -> InstructServer:
        self.start()
        return self

    # --- what the LLM says ---------------------------------------------------------------

    def _describe(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        return {"kind": request_kind(messages), "context": message_text(last.get("content"))}

    def _matches(self, key: Any, record: dict[str, Any]) -> bool:
        return key in record["context"]

    def _subject(self, record: dict[str, Any]) -> Any:
        return record["context"]

    def _content(self, record: dict[str, Any], step: Any) -> tuple[Any, str | None]:
        if step is UNSCRIPTED:
            return 200, default_reply(record["kind"], record["context"])
        return 200, step
