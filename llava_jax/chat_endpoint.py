"""Asking an OpenAI-compatible chat endpoint many times: the LLaVA-Bench judge
(`evaluation/judge.py`) and the instruction-data generator (`data/instruct.py`) share it.

One client, at most `concurrency` requests in flight; 429, 5xx, timeouts and lost connections
are retried `retries` times with exponential backoff and jitter (or the server's Retry-After).
A wrong URL, key (401/403) or model (404), or a request refused (4xx) before the endpoint has
answered any, is an `EndpointError`: one line naming the flag to fix. Until the endpoint has
answered once, requests go one at a time, so a wrong setting costs one request, not
`concurrency` of them. Each reply's `usage` is summed (`Endpoint.usage`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import math
import os
import random
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from llava_jax.errors import InputError

OPENAI_BASE_URL = "https://api.openai.com/v1"
PLACEHOLDER_KEY = "none"  # a local server takes any key; the client needs one
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
RETRY_AFTER_MAX_S = 60.0

Item = TypeVar("Item")

log = logging.getLogger(__name__)


class EndpointError(InputError):
    """The endpoint cannot be used as given (URL, key, model, settings): one line, exit 2."""


class GaveUp(Exception):
    """One request failed past the retries (the caller records it; the run goes on)."""


@dataclasses.dataclass(frozen=True)
class EndpointSettings:
    """Where to ask (`base_url`, `model`), how (sampling), and how hard to try."""

    base_url: str = OPENAI_BASE_URL
    model: str = ""
    api_key: str = PLACEHOLDER_KEY
    temperature: float = 1.0
    max_tokens: int = 1024
    timeout: float = 120.0
    retries: int = 5
    concurrency: int = 4


@dataclasses.dataclass(frozen=True)
class Names:
    """How errors name the endpoint and the flags that set it."""

    who: str = "the endpoint"  # "the judge", "the LLM"
    url_flag: str = "--base-url"
    model_flag: str = "--model"


@dataclasses.dataclass
class Reply:
    """A reply's text (None: a reply without text) and its token counts."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def is_openai(base_url: str) -> bool:
    return urllib.parse.urlparse(base_url).hostname == "api.openai.com"


def api_key(base_url: str, who: str, url_flag: str) -> str:
    """OPENAI_API_KEY; a placeholder for a server other than OpenAI's when it is unset."""
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if is_openai(base_url):
        raise InputError(
            f"OPENAI_API_KEY is not set: {who} at {base_url} needs your key (a server "
            f"elsewhere, named by {url_flag}, takes any)"
        )
    return PLACEHOLDER_KEY


def add_arguments(
    parser: argparse.ArgumentParser,
    names: Names,
    *,
    model_default: str | None,
    model_help: str,
    temperature: float,
    sampling_help: str = "",
) -> None:
    """The endpoint's flags: `names.url_flag`, `names.model_flag` and the sampling and
    retry settings (`settings_from_args` reads them back). `sampling_help`: said of the
    temperature's and max tokens' defaults (e.g. whose they are)."""
    said = f"{sampling_help}: %(default)s" if sampling_help else "default %(default)s"
    parser.add_argument(names.url_flag, default=OPENAI_BASE_URL, help="OpenAI-compatible API")
    parser.add_argument(names.model_flag, default=model_default, help=model_help)
    parser.add_argument("--temperature", type=float, default=temperature, help=said)
    parser.add_argument("--max-tokens", type=int, default=1024, help=said)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument(
        "--retries", type=int, default=5, help="on 429, 5xx, timeouts, lost connections"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")


def settings_from_args(
    args: argparse.Namespace, names: Names, *, needs_key: bool = True
) -> dict[str, Any]:
    """`EndpointSettings`' fields from the flags of `add_arguments`, checked (`InputError`
    naming the flag); the key from OPENAI_API_KEY (`needs_key=False`: none is read)."""

    def flag(name: str) -> Any:
        return getattr(args, name.lstrip("-").replace("-", "_"))

    base_url = flag(names.url_flag)
    check_settings(
        base_url=base_url, url_flag=names.url_flag, concurrency=args.concurrency,
        retries=args.retries, max_tokens=args.max_tokens, timeout=args.timeout,
        temperature=args.temperature,
    )  # fmt: skip
    return {
        "base_url": base_url,
        "model": flag(names.model_flag) or "",
        "api_key": api_key(base_url, names.who, names.url_flag) if needs_key else "",
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "timeout": args.timeout,
        "retries": args.retries,
        "concurrency": args.concurrency,
    }


def check_settings(
    *,
    base_url: str,
    url_flag: str,
    concurrency: int,
    retries: int,
    max_tokens: int,
    timeout: float,
    temperature: float,
) -> None:
    """`InputError` naming the flag of the first setting that cannot work."""

    def need(ok: bool, flag: str, what: str, value: Any) -> None:
        if not ok:
            raise InputError(f"{flag} must be {what}, got {value}")

    need(concurrency >= 1, "--concurrency", ">= 1", concurrency)
    need(retries >= 0, "--retries", ">= 0", retries)
    need(max_tokens >= 1, "--max-tokens", ">= 1", max_tokens)
    need(math.isfinite(timeout) and timeout > 0, "--timeout", "> 0 seconds", timeout)
    need(
        math.isfinite(temperature) and 0 <= temperature <= 2,
        "--temperature", "between 0 and 2", temperature,
    )  # fmt: skip
    url = urllib.parse.urlparse(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise InputError(
            f"{url_flag} must be an http(s) URL such as {OPENAI_BASE_URL}, got {base_url!r}"
        )


def _error_message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if isinstance(message, str) and message:
            return message
    return str(getattr(err, "message", "") or err)


def _retry_after(err: Any) -> float | None:
    """The server's Retry-After (seconds), from retry-after-ms or retry-after."""
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None) or {}
    for header, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            value = float(headers.get(header)) * scale
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and 0 <= value <= RETRY_AFTER_MAX_S:
            return value
    return None


def backoff_s(attempt: int, retry_after: float | None = None) -> float:
    """Seconds before retry `attempt` (0-based): the server's Retry-After when it gives one,
    else exponential with jitter (half to all of 1, 2, 4 … s, at most a minute), so
    concurrent requests that failed together do not come back together."""
    if retry_after is not None:
        return retry_after
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.0)


def _token_count(usage: Any, name: str) -> int:
    value = getattr(usage, name, None)
    return value if isinstance(value, int) and value >= 0 else 0


class Endpoint:
    """One OpenAI-compatible endpoint, asked through one client (see the module docstring).

    `counts["retries"]`: retried requests; `usage`: prompt_tokens and completion_tokens
    summed over every reply received (those a caller discards too: they are paid for)."""

    def __init__(self, settings: EndpointSettings, names: Names = Names(), *, hints: str = ""):
        self.settings = settings
        self.names = names
        self.hints = hints  # the flags to check when a request is refused
        self.contacted = False  # any HTTP answer: the URL reaches a server
        self.succeeded = False  # a 2xx: the key, model and settings work
        self.counts: collections.Counter = collections.Counter()
        self.usage: collections.Counter = collections.Counter()
        self._client: Any = None

    def fatal(self, status: int, err: Any, model_hint: str = "") -> EndpointError:
        """The one-line error for a status that retrying cannot mend."""
        s, n, message = self.settings, self.names, _error_message(err)
        where = f"{n.who} at {s.base_url}"
        if status == 401:
            return EndpointError(
                f"{where} refused the API key (401: {message}); "
                "set OPENAI_API_KEY to a key it takes"
            )
        if status == 403:
            return EndpointError(
                f"{where} refused the request (403: {message}); check the key's access"
            )
        if status == 404:
            return EndpointError(
                f"{where} answered 404 for model {s.model!r}{model_hint}: {message}; name a "
                f"model it serves with {n.model_flag}, or fix {n.url_flag} (its OpenAI API, …/v1)"
            )
        return EndpointError(
            f"{where} refused the request ({status}: {message}); check {n.model_flag}"
            + (f", {self.hints}" if self.hints else "")
        )

    def model_hint(self) -> str:
        """Said after a 404's model name (the judge names LLaVA's retired snapshots)."""
        return ""

    async def request(self, messages: list[dict[str, str]]) -> Reply:
        """The reply to `messages`. Retries what may pass; raises `EndpointError` for what
        will not, `GaveUp` past the retries."""
        import openai

        s = self.settings
        problem = ""
        for attempt in range(s.retries + 1):
            retry_after = None
            try:
                response = await self._client.chat.completions.create(
                    model=s.model,
                    messages=messages,
                    temperature=s.temperature,
                    max_tokens=s.max_tokens,
                )
            except openai.APIStatusError as err:
                self.contacted = True
                status = err.status_code
                if status in (401, 403, 404) or (
                    400 <= status < 500 and status not in (408, 409, 429) and not self.succeeded
                ):
                    raise self.fatal(status, err, self.model_hint()) from None
                if 400 <= status < 500 and status not in (408, 409, 429):
                    raise GaveUp(
                        f"{self.names.who} refused the request ({status}: {_error_message(err)})"
                    ) from None
                problem = f"HTTP {status}: {_error_message(err)}"
                retry_after = _retry_after(err)
            except openai.APITimeoutError:
                problem = f"no reply within --timeout {s.timeout:g} s"
            except openai.APIConnectionError as err:
                if not self.contacted:
                    cause = err.__cause__ or err
                    raise EndpointError(
                        f"cannot reach {self.names.who} at {s.base_url} ({cause}); "
                        f"check {self.names.url_flag}"
                    ) from None
                problem = f"connection lost: {err.__cause__ or err}"
            except (openai.APIError, ValueError) as err:  # not OpenAI's shape, not JSON
                self.contacted = True
                problem = f"unreadable reply: {err}"
            else:
                self.contacted = self.succeeded = True
                reply = Reply(None)
                usage = getattr(response, "usage", None)
                reply.prompt_tokens = _token_count(usage, "prompt_tokens")
                reply.completion_tokens = _token_count(usage, "completion_tokens")
                self.usage["prompt_tokens"] += reply.prompt_tokens
                self.usage["completion_tokens"] += reply.completion_tokens
                try:
                    text = response.choices[0].message.content
                except (AttributeError, IndexError, KeyError, TypeError):
                    return reply
                reply.text = text if isinstance(text, str) else None
                return reply
            log.info(
                "request to %s failed (%s); attempt %d of %d",
                self.names.who, problem, attempt + 1, s.retries + 1,
            )  # fmt: skip
            if attempt < s.retries:
                self.counts["retries"] += 1
                await asyncio.sleep(backoff_s(attempt, retry_after))
        raise GaveUp(
            f"{self.names.who} failed {s.retries + 1} times (--retries {s.retries}); "
            f"last: {problem}"
        )

    async def run_all(
        self, items: Sequence[Item], handle: Callable[[Item], Awaitable[None]]
    ) -> None:
        """`handle` each item, at most `concurrency` at once (one at a time until the
        endpoint has answered). An exception from `handle` cancels the rest and is raised."""
        import openai

        s = self.settings
        self._client = openai.AsyncOpenAI(
            api_key=s.api_key, base_url=s.base_url, timeout=s.timeout, max_retries=0
        )
        try:
            pending = collections.deque(items)
            while pending and not self.contacted:
                await handle(pending.popleft())

            async def worker() -> None:
                while pending:
                    await handle(pending.popleft())

            tasks = [asyncio.create_task(worker()) for _ in range(min(s.concurrency, len(pending)))]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        finally:
            await self._client.close()
            self._client = None
