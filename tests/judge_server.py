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
fail a question's next requests (`fail(question, 429, 500, "garbage", "timeout", "drop")`)
or to hold every request after the first `n` answers (`hold(n)`: they wait, and are dropped
unanswered on `release()`), for a test that kills its client mid-run.

    with JudgeServer(model="judge") as judge:
        ... --judge-base-url judge.url --judge-model judge ...
        judge.count("What colour?")  # requests received for that question
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SCORE = re.compile(r"\(score (-?\d+(?:\.\d+)?)\)")
QUESTION = re.compile(r"\[Question\]\n(.*?)\n\n\[", re.S)
GARBAGE = "Both answers are helpful.\nAssistant 1: 8/10, Assistant 2: 7/10."


def _section(content: str, n: int) -> str | None:
    found = re.search(rf"\[([^\]\n]+) {n}\]\n(.*?)\n\n\[End of \1 {n}\]", content, re.S)
    return None if found is None else found.group(2)


class JudgeServer:
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
        self.model = model
        self.api_key = api_key
        self.default_score = default_score
        self.position_bias = position_bias
        self.repeat_offsets = repeat_offsets
        self.delay_s = delay_s
        self.slow_s = slow_s  # a "timeout" answers this late
        self.retry_after_ms = retry_after_ms  # sent with 429 and 5xx, as OpenAI does
        self.requests: list[dict[str, Any]] = []
        self.answered: list[str] = []
        self._scored: collections.Counter[str] = collections.Counter()
        self._script: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._hold_after: int | None = None
        self._release = threading.Event()
        self.held = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- control -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def fail(self, question: str, *outcomes: int | str) -> None:
        """The next requests about `question` get these outcomes, in order: an HTTP status
        (429, 500, 503 …), "garbage" (a reply without two scores), "timeout" (the reply
        comes `slow_s` late), "drop" (the connection closes unanswered)."""
        with self._lock:
            self._script[question].extend(outcomes)

    def hold(self, after: int | None) -> None:
        """Requests after the first `after` answers wait for `release()` (None: none wait)."""
        with self._lock:
            self._hold_after = after
            self._release.clear()

    def release(self) -> None:
        """Held requests are dropped unanswered; later ones are answered."""
        with self._lock:
            self._hold_after = None
        self._release.set()

    def count(self, question: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r["question"] == question)

    def outcomes(self, question: str) -> list[Any]:
        with self._lock:
            return [r["outcome"] for r in self.requests if r["question"] == question]

    # --- serving -------------------------------------------------------------------------

    def start(self) -> JudgeServer:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                judge._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _send(self, handler: BaseHTTPRequestHandler, status: int, body: dict, **headers) -> None:
        data = json.dumps(body).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                handler.send_header(name.replace("_", "-"), str(value))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout): nothing was answered

    def _error(self, handler: Any, status: int, message: str, code: str, **headers) -> None:
        error = {"message": message, "type": "invalid_request_error", "code": code}
        self._send(handler, status, {"error": error}, **headers)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length) or b"{}")
        messages = body.get("messages") or [{}]
        content = messages[-1].get("content") or ""
        found = QUESTION.search(content)
        question = found.group(1) if found else None
        record = {"question": question, "messages": messages, "body": body, "outcome": None}
        with self._lock:
            self.requests.append(record)
            outcome = self._script[question].popleft() if self._script[question] else None
            hold = self._hold_after is not None and len(self.answered) >= self._hold_after
            if hold:
                self.held += 1
        if handler.path != "/v1/chat/completions":
            record["outcome"] = 404
            return self._error(handler, 404, f"no route {handler.path}", "not_found")
        if self.api_key is not None and handler.headers.get("Authorization") != (
            f"Bearer {self.api_key}"
        ):
            record["outcome"] = 401
            return self._error(handler, 401, "Incorrect API key provided", "invalid_api_key")
        if body.get("model") != self.model:
            record["outcome"] = 404
            message = f"The model `{body.get('model')}` does not exist"
            return self._error(handler, 404, message, "model_not_found")
        if hold:
            self._release.wait()
            record["outcome"] = "held"
            handler.close_connection = True
            return None  # dropped unanswered
        if self.delay_s:
            time.sleep(self.delay_s)
        if isinstance(outcome, int):
            record["outcome"] = outcome
            headers = {}
            if self.retry_after_ms is not None:
                headers["retry_after_ms"] = self.retry_after_ms
            return self._error(handler, outcome, f"stand-in failure {outcome}", "x", **headers)
        if outcome == "drop":
            record["outcome"] = "drop"
            handler.close_connection = True
            return None
        if outcome == "timeout":
            time.sleep(self.slow_s)
        text = GARBAGE if outcome == "garbage" else self._scores(content)
        record["outcome"] = outcome or "scored"
        reply = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        self._send(handler, 200, reply)
        if outcome != "timeout":  # a late reply reaches no one
            with self._lock:
                self.answered.append(question)
        return None

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
