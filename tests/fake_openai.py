"""The plumbing of the tests' stand-in OpenAI servers (`judge_server.JudgeServer`,
`instruct_server.InstructServer`): a real HTTP server on a free 127.0.0.1 port, in a
background thread, that speaks OpenAI's `POST /v1/chat/completions` (non-streaming) so the
real `openai` client talks to it.

`FakeOpenAI` records every request (`requests`: dicts with "messages", "body", "outcome" and
what the subclass's `_describe` adds), checks the key and the model as OpenAI does (401 on a
wrong `Authorization: Bearer` key when `api_key` is set, 404 for another model or another
path, in OpenAI's error shape), and plays scripts: `_queue(key, steps)` gives the next
requests that `_matches(key, record)` these steps, one each. A step is a failure token

    429, 500, 503, 400 … (any int)  that HTTP status, OpenAI's error shape; 429 and 5xx carry
                                     `retry-after-ms: retry_after_ms`
    "timeout"                        the reply comes `slow_s` late (the client gave up)
    "drop"                           the connection closes unanswered
    "garbage-json"                   a 200 whose body is not JSON

or anything else, handed to the subclass's `_content(record, step)` that writes the reply
(`UNSCRIPTED` when no step is left). `hold(n)`: once `n` requests have been let through to a
200 answer (`answered`: the 200 completions that reached the client), every further request
waits until `release()`, which drops the held ones unanswered: for a test that kills its
client mid-run (counted when let through, so requests arriving together cannot overshoot).
`delay_s` slows every answer.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

UNSCRIPTED = object()  # the step of a request no script speaks for
GARBAGE_JSON = b'{"id": "chatcmpl-x", "choices": [{"message": '  # cut short: not JSON
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 429: "requests"}


def message_text(content: Any) -> str:
    """A message's content as text (a list of parts: its text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def words(content: Any) -> int:
    """Whitespace-separated words: the stand-ins' token count."""
    return len(message_text(content).split())


def _answers(step: Any) -> bool:
    """Whether a step ends in a 200 answer the client reads (not a failure, a drop, a
    reply too late or one that is not JSON)."""
    if isinstance(step, int) and not isinstance(step, bool):
        return False
    return step not in ("drop", "timeout", "garbage-json")


class FakeOpenAI:
    """See the module docstring. `url` is the base URL an OpenAI client takes (…/v1)."""

    def __init__(
        self,
        *,
        model: str,
        api_key: str | None = None,
        delay_s: float = 0.0,
        slow_s: float = 3.0,
        retry_after_ms: int | None = 10,
    ):
        self.model = model
        self.api_key = api_key  # None: any key
        self.delay_s = delay_s
        self.slow_s = slow_s  # a "timeout" answers this late
        self.retry_after_ms = retry_after_ms  # sent with 429 and 5xx, as OpenAI does
        self.requests: list[dict[str, Any]] = []
        self.answered: list[Any] = []  # the subject of each 200 completion the client got
        self.held = 0
        self._answering = 0  # requests let through to a 200 answer (hold counts these)
        self._script: dict[Any, collections.deque] = collections.defaultdict(collections.deque)
        self._hold_after: int | None = None
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- what a subclass says ---------------------------------------------------------------

    def _describe(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """Fields of a request's record, beyond messages, body and outcome."""
        return {}

    def _matches(self, key: Any, record: dict[str, Any]) -> bool:
        """Whether a script (or `count`) about `key` speaks for this request."""
        raise NotImplementedError

    def _subject(self, record: dict[str, Any]) -> Any:
        """What `answered` lists for an answered request."""
        return None

    def _content(self, record: dict[str, Any], step: Any) -> tuple[Any, str | None]:
        """The outcome to record and the reply text for a request given `step`."""
        raise NotImplementedError

    # --- control ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _queue(self, key: Any, steps: tuple[Any, ...]) -> None:
        with self._lock:
            self._script[key].extend(steps)

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

    def count(self, key: Any) -> int:
        """Requests received that `key` speaks for."""
        with self._lock:
            return sum(1 for r in self.requests if self._matches(key, r))

    def outcomes(self, key: Any) -> list[Any]:
        """The outcomes of the requests `key` speaks for, in order."""
        with self._lock:
            return [r["outcome"] for r in self.requests if self._matches(key, r)]

    # --- serving ----------------------------------------------------------------------------

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                fake._handle(self)

            def do_GET(self) -> None:
                fake._error(self, 404, f"no route GET {self.path}", "not_found")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut the server down; held requests are dropped."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    close = stop

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _send(
        self, handler: BaseHTTPRequestHandler, status: int, data: bytes, **headers: Any
    ) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                handler.send_header(name.replace("_", "-"), str(value))
            handler.end_headers()
            handler.wfile.write(data)
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True  # the client gave up: nothing was answered

    def _error(
        self, handler: Any, status: int, message: str, code: str | None, **headers: Any
    ) -> None:
        kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        error = {"message": message, "type": kind, "param": None, "code": code}
        self._send(handler, status, json.dumps({"error": error}).encode(), **headers)

    def _drop(self, handler: BaseHTTPRequestHandler, record: dict, outcome: str) -> None:
        record["outcome"] = outcome
        handler.close_connection = True  # the handler returns: the connection closes

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        messages = body.get("messages") or [{}]
        record = {"messages": messages, "body": body, "outcome": None, **self._describe(messages)}
        with self._lock:
            self.requests.append(record)
        if handler.path != "/v1/chat/completions":
            record["outcome"] = 404
            return self._error(handler, 404, f"no route {handler.path}", "not_found")
        if self.api_key is not None and handler.headers.get("Authorization") != (
            f"Bearer {self.api_key}"
        ):
            record["outcome"] = 401
            message = "Incorrect API key provided"
            return self._error(handler, 401, message, "invalid_api_key")
        if body.get("model") != self.model:
            record["outcome"] = 404
            message = f"The model `{body.get('model')}` does not exist"
            return self._error(handler, 404, message, "model_not_found")
        with self._lock:
            # Counted when let through, not when answered: requests in flight together
            # cannot all pass a hold that one answer more would have closed.
            hold = self._hold_after is not None and self._answering >= self._hold_after
            if hold:
                self.held += 1
                step = UNSCRIPTED  # a held request uses no script: it is never answered
            else:
                step = self._next_step(record)
                if _answers(step):
                    self._answering += 1
        if hold:
            self._release.wait()
            return self._drop(handler, record, "held")
        if self.delay_s:
            time.sleep(self.delay_s)
        if isinstance(step, int) and not isinstance(step, bool):
            record["outcome"] = step
            headers = {}
            if self.retry_after_ms is not None and (step == 429 or step >= 500):
                headers["retry_after_ms"] = self.retry_after_ms
            code = "rate_limit_exceeded" if step == 429 else None
            return self._error(handler, step, f"stand-in failure {step}", code, **headers)
        if step == "drop":
            return self._drop(handler, record, "drop")
        if step == "garbage-json":
            record["outcome"] = "garbage-json"
            return self._send(handler, 200, GARBAGE_JSON)
        late = step == "timeout"
        if late:
            time.sleep(self.slow_s)
        outcome, text = self._content(record, UNSCRIPTED if late else step)
        record["outcome"] = "timeout" if late else outcome
        self._send(handler, 200, json.dumps(self._completion(messages, text)).encode())
        if not late:  # a late reply reaches no one
            with self._lock:
                self.answered.append(self._subject(record))
        return None

    def _next_step(self, record: dict[str, Any]) -> Any:
        """The first step of a script that speaks for `record`, taken (under the lock)."""
        for key, steps in self._script.items():
            if steps and self._matches(key, record):
                return steps.popleft()
        return UNSCRIPTED

    def _completion(self, messages: list[dict[str, Any]], text: str | None) -> dict[str, Any]:
        prompt = sum(words(m.get("content")) for m in messages if isinstance(m, dict))
        completion = words(text)
        with self._lock:
            n = len(self.requests)
        return {
            "id": f"chatcmpl-{n}",
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
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
