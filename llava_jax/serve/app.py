"""The HTTP side: OpenAI's chat completions API on FastAPI, and the chat page.

    POST /v1/chat/completions   messages (text, and images as data: URLs), max_tokens,
                                temperature, top_p, stop, seed, stream (server-sent events)
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", "running": …, "queued": …, …}
    GET  /                      the chat page (static/index.html)

A request becomes a prompt exactly as `generate` and `chat` make one: `LoadedModel.user_turn`
(the image's `<image>` first in its turn), `prompt_ids` with the checkpoint's own template,
`check_image_tokens`, `check_prompt` (max_tokens lowered to what the context leaves), and
images decoded and normalised by `LoadedModel.image_from_bytes` with the model's data
settings. The stop strings are the template's end of answer plus the request's `stop`.

Everything a client can get wrong is answered with a 4xx in OpenAI's error shape,
`{"error": {"message", "type", "param", "code"}}`, naming the problem: malformed JSON (or
JSON nested too deeply, or a number of too many digits), a missing or mistyped field, text
that is not valid Unicode (a lone surrogate) in any message, an unknown model, a remote
image URL (the server fetches nothing: images come inline as `data:image/...;base64,...`),
an image that is not base64, cannot be decoded or is too large, a conversation that does
not fit the context. Defaults and ranges follow OpenAI: temperature 1 in [0, 2], top_p 1 in
[0, 1]; top_p 0 keeps only the most likely token (as OpenAI and transformers' top-p keep at
least one): the answer is greedy, whatever the temperature (lmms-eval's POPE and MathVerse
tasks send it). A request without a seed is seeded at random.

What a request may cost is bounded. Its body is read as it arrives and refused (413) as
soon as it passes the limit, with or without a Content-Length. An image's size is read from
its header and refused over `max_image_pixels` (default `IMAGE_PIXELS_MULTIPLE` times the
pixels of the model's largest input) before any pixel is decoded; images are decoded by
`image_workers` threads at most, whatever the number of requests, and the memory a decoded
image took is handed back to the system afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import ctypes
import dataclasses
import json
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llava_jax import json_input
from llava_jax.errors import InputError, PromptTooLongError
from llava_jax.inference.load import ModelImage, check_text
from llava_jax.serve.batcher import Batcher, Delta, Done, Failed, Job

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
DEFAULT_MAX_TOKENS = 256
MAX_IMAGES = 4  # per conversation
MAX_STOPS = 4  # as OpenAI allows
# The default pixel limit of an image: this many times the pixels of the model's largest
# input (LLaVA-1.5's 336 x 336: 14.4 million pixels, so a 12-megapixel photo fits). Decoding
# costs 5 to 8 bytes a pixel at its peak (grey to colour): some 115 MB at that limit.
IMAGE_PIXELS_MULTIPLE = 128
IMAGE_WORKERS = 2  # images decoded at once, whatever the number of requests
_DATA_URL = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)", re.DOTALL
)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers

    def response(self) -> JSONResponse:
        return error_response(
            self.status, self.message, self.param, self.code, self.kind, self.headers
        )


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclasses.dataclass
class ChatRequest:
    """A checked chat completion request. turns: (role, text, images as bytes)."""

    turns: list[tuple[str, str, list[bytes]]]
    system: str | None  # the system messages' text, in place of the template's own prompt
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


# --- reading a request ---------------------------------------------------------------------------


def _too_large(message: str) -> APIError:
    # The connection is closed after the answer: the rest of the body is never read.
    return APIError(413, message, None, "request_too_large", headers={"Connection": "close"})


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, read as it arrives: refused (413) as soon as it passes
    `max_bytes`, whether it says its length (Content-Length) or not (chunked), so a body
    over the limit is never held whole. A client that leaves mid-body gets a 499 (which
    it does not read) rather than an error in the server's log."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and (len(length) > 30 or int(length) > max_bytes):
        raise _too_large(
            f"the request is {length[:30]} bytes, more than the server's limit of {max_bytes} bytes"
        )
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(
                    f"the request is more than the server's limit of {max_bytes} bytes"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(499, "the client closed the request", None, "client_closed") from None
    return b"".join(chunks)


def parse_body(raw: bytes) -> Any:
    """The JSON of a request body; `APIError` 400 naming what is wrong (malformed, nested too
    deeply, a number of too many digits, not UTF-8)."""
    try:
        return json_input.loads(raw)
    except json_input.JSONInputError as err:
        raise APIError(
            400, f"the request body cannot be read: {err}", None, "invalid_json"
        ) from None


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(
            400, f"{name} must be a number, got {json.dumps(value)}", name, "invalid_type"
        )
    if not low <= value <= high:
        raise APIError(
            400, f"{name} must be in [{low:g}, {high:g}], got {value}", name, "invalid_value"
        )
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(
            400, f"{name} must be an integer, got {json.dumps(value)}", name, "invalid_type"
        )
    return value


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """The image bytes of a `data:image/...;base64,...` URL; remote URLs are refused."""
    if re.match(r"(?i)(https?|ftp|file)://", url):
        raise APIError(
            400,
            "image URLs are not fetched by this server: send the image inline "
            "as a data URL (data:image/png;base64,...)",
            param,
            "unsupported_image_url",
        )
    match = _DATA_URL.fullmatch(url)
    if not match:
        shown = url[:40] + ("…" if len(url) > 40 else "")
        raise APIError(
            400,
            f"image_url must be a data URL (data:image/png;base64,...), got {shown!r}",
            param,
            "invalid_image_url",
        )
    mime = (match["mime"] or "").lower()
    if mime and not mime.startswith("image/"):
        raise APIError(400, f"the data URL holds {mime}, not an image", param, "invalid_image_url")
    if ";base64" not in match["params"].lower():
        raise APIError(
            400,
            "the image data URL must be base64-encoded (data:image/png;base64,...)",
            param,
            "invalid_image_url",
        )
    data = re.sub(r"\s+", "", match["data"])
    if len(data) * 3 // 4 > max_bytes:
        raise APIError(
            413,
            f"the image is {len(data) * 3 // 4} bytes, more than the server's "
            f"limit of {max_bytes} bytes (--max-image-bytes)",
            param,
            "image_too_large",
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(
            400, f"the image data URL is not valid base64: {err}", param, "invalid_image_url"
        ) from None


def _content(message: dict, m: int, max_image_bytes: int) -> tuple[str, list[bytes]]:
    """(text, images) of `messages[m]`: a string, or parts of type text and image_url."""
    where = f"messages[{m}].content"
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not content:
        raise APIError(
            400, f"{where} must be a string or a non-empty list of parts", where, "invalid_type"
        )
    texts, images = [], []
    for p, part in enumerate(content):
        at = f"{where}[{p}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise APIError(
                    400, f"{at}.image_url.url must be a string", f"{at}.image_url", "invalid_type"
                )
            images.append(decode_data_url(url, f"{at}.image_url", max_image_bytes))
        else:
            raise APIError(
                400,
                f"{at} must be {{'type': 'text', 'text': ...}} or {{'type': "
                "'image_url', 'image_url': {'url': 'data:...'}}",
                at,
                "invalid_content_part",
            )
    return "\n".join(texts), images


def parse_request(body: Any, model_name: str, max_image_bytes: int) -> ChatRequest:
    """Check a chat completion request's JSON; `APIError` names the first problem."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if model is None:
        raise APIError(
            400, "missing required parameter: model", "model", "missing_required_parameter"
        )
    if model != model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist: this server serves {model_name!r}",
            "model",
            "model_not_found",
        )
    messages = body.get("messages")
    if messages is None:
        raise APIError(
            400, "missing required parameter: messages", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages", "invalid_type")
    turns, system = [], []
    for m, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant", "system", "developer"):
            raise APIError(
                400,
                f"messages[{m}].role must be 'system', 'user' or 'assistant', got "
                f"{json.dumps(role)}",
                f"messages[{m}].role",
                "invalid_value",
            )
        if role in ("system", "developer") and turns:
            raise APIError(
                400,
                f"messages[{m}] is a {role} message after the conversation began: system "
                "messages come first (they take the place of the template's system prompt)",
                f"messages[{m}].role",
                "invalid_value",
            )
        text, images = _content(message, m, max_image_bytes)
        try:  # a tokenizer cannot take a lone surrogate (JSON's "\ud800")
            check_text(text, f"messages[{m}].content")
        except InputError as err:
            where = f"messages[{m}].content"
            raise APIError(400, str(err), where, "invalid_value") from None
        if images and role != "user":
            raise APIError(
                400,
                f"messages[{m}]: only user messages may have images",
                f"messages[{m}].content",
                "invalid_value",
            )
        if role in ("system", "developer"):
            system.append(text)
            continue
        if len(images) > 1:
            raise APIError(
                400,
                f"messages[{m}] has {len(images)} images: one per message at most",
                f"messages[{m}].content",
                "invalid_value",
            )
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise APIError(
                400,
                f"messages[{m}] is {role}, expected {expected}: the "
                "conversation alternates user and assistant, starting with user",
                f"messages[{m}].role",
                "invalid_value",
            )
        turns.append((role, text, images))
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "the last message must be the user's", "messages", "invalid_value")
    if sum(len(images) for _, _, images in turns) > MAX_IMAGES:
        raise APIError(
            400, f"at most {MAX_IMAGES} images per conversation", "messages", "invalid_value"
        )
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(
            400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens", "invalid_value"
        )
    n = _integer(body, "n")
    if n not in (None, 1):
        raise APIError(
            400, f"n={n}: this server gives one choice per request", "n", "invalid_value"
        )
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise APIError(400, "stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOPS or any(not s for s in stop):
        raise APIError(
            400, f"stop takes 1 to {MAX_STOPS} non-empty strings", "stop", "invalid_value"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options", "invalid_type")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:  # the nucleus is the most likely token alone: greedy decoding
        temperature, top_p = 0.0, 1.0
    return ChatRequest(
        turns=turns,
        system="\n\n".join(system) if system else None,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=_integer(body, "seed"),
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def default_max_image_pixels(model: Any) -> int:
    """`IMAGE_PIXELS_MULTIPLE` times the pixels of the model's largest input: its image size
    squared, or a NeXT model's largest grid resolution."""
    data = model.data
    if data.anyres is not None:
        largest = max(height * width for height, width in data.anyres.pinpoints)
    else:
        largest = data.image_size**2
    return IMAGE_PIXELS_MULTIPLE * largest


def _libc_malloc_trim() -> Any:
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # not glibc, or no C library to load
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_memory() -> None:
    """Hands the heap's free memory back to the system (glibc's `malloc_trim`; elsewhere
    nothing): a decoded image's hundreds of megabytes would otherwise stay with the
    process, in the arena of the thread that decoded it."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def decode_images(
    model: Any, request: ChatRequest, max_pixels: int | None = None
) -> list[ModelImage]:
    """The request's images as the model takes them, in prompt order; `APIError` 400 for an
    image that cannot be decoded or whose header claims more than `max_pixels` pixels
    (refused before decoding). Memory is handed back afterwards (`release_memory`)."""
    images = []
    try:
        for m, (_, _, pictures) in enumerate(request.turns):
            for picture in pictures:
                try:
                    image = model.image_from_bytes(
                        picture,
                        f"in messages[{m}]",
                        max_pixels=max_pixels,
                        limit_name="the server's --max-image-pixels",
                    )
                except InputError as err:
                    where = f"messages[{m}].content"
                    raise APIError(400, str(err), where, "invalid_value") from None
                images.append(image)
    finally:
        release_memory()
    return images


def make_job(
    model: Any,
    request: ChatRequest,
    loop: asyncio.AbstractEventLoop,
    images: Sequence[ModelImage] | None = None,
    max_image_pixels: int | None = None,
) -> Job:
    """The prompt and sampling of `request`, as `generate`/`chat` build them (runs in a
    thread: tokenizing takes a while). `images`: the request's, from `decode_images` (which
    the server runs on its few image threads); when None they are decoded here."""
    if images is None:
        images = decode_images(model, request, max_image_pixels)
    turns = []
    for m, (role, text, pictures) in enumerate(request.turns):
        try:
            if role == "user":
                turns.append(model.user_turn(text, with_image=bool(pictures)))
            else:  # its text is checked by `parse_request`
                turns.append({"from": "gpt", "value": text})
        except InputError as err:
            raise APIError(400, str(err), f"messages[{m}].content", "invalid_value") from None
    images = list(images)
    try:
        ids = model.prompt_ids(turns, images, system=request.system)
        model.check_image_tokens(ids, images)
        wanted = request.max_tokens or DEFAULT_MAX_TOKENS
        fits = model.check_prompt(ids, wanted, clamp=True)
    except PromptTooLongError as err:
        raise APIError(400, str(err), "messages", "context_length_exceeded") from None
    except (InputError, ValueError) as err:
        raise APIError(400, str(err), "messages", "invalid_value") from None
    seed = secrets.randbits(32) if request.seed is None else request.seed % (1 << 32)
    sampling = model.sampling(fits, request.temperature, 0, request.top_p, seed)
    stops = tuple(dict.fromkeys((*sampling.stop_strings, *request.stop)))
    sampling = dataclasses.replace(sampling, stop_strings=stops)
    return Job(
        prompt=ids,
        images=tuple(images),
        sampling=sampling,
        stream=request.stream,
        loop=loop,
    )


# --- the app -------------------------------------------------------------------------------------


def create_app(
    model: Any,
    batcher: Batcher,
    model_name: str,
    *,
    max_image_bytes: int = 10 << 20,
    max_request_bytes: int = 32 << 20,
    max_image_pixels: int | None = None,
    image_workers: int = IMAGE_WORKERS,
) -> FastAPI:
    """The server's routes around a started-on-startup `batcher` of `model`.

    max_image_pixels: the most pixels an image may have (from its header; None:
    `default_max_image_pixels`); image_workers: the threads that decode images (requests
    beyond them wait their turn, holding only their encoded bytes)."""
    created = int(time.time())
    if max_image_pixels is None:
        max_image_pixels = default_max_image_pixels(model)
    decoder = concurrent.futures.ThreadPoolExecutor(image_workers, "llava-image")

    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()
        decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="llava_jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return error_response(err.status_code, str(err.detail), None, code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(400, str(err), None, "invalid_request")

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        return error_response(
            500, f"internal error: {type(err).__name__}: {err}", None, None, "server_error"
        )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **batcher.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "llava_jax"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_body(request, max_request_bytes)
        parsed = parse_request(parse_body(raw), model_name, max_image_bytes)
        del raw
        loop = asyncio.get_running_loop()
        images = []
        if any(pictures for _, _, pictures in parsed.turns):
            images = await loop.run_in_executor(
                decoder, decode_images, model, parsed, max_image_pixels
            )
        job = await run_in_threadpool(make_job, model, parsed, loop, images)
        batcher.submit(job)
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        if parsed.stream:
            return StreamingResponse(
                _events(job, completion_id, model_name, parsed.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            event = await _final_event(job, request)
        finally:
            job.cancel()  # a no-op once answered; frees the row if this handler is cancelled
        if event is None:  # the client went away
            return error_response(499, "the client closed the request", None, "client_closed")
        if isinstance(event, Failed):
            kind = "invalid_request_error" if event.status < 500 else "server_error"
            return error_response(event.status, event.message, None, None, kind)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": event.text},
                    "finish_reason": event.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(event),
        }

    return app


async def _final_event(job: Job, request: Request, poll_s: float = 0.5) -> Done | Failed | None:
    """The job's `Done` or `Failed` (a non-streaming answer), or None when the client
    disconnects first (its row is then freed, as a streaming client's is)."""
    while True:
        getter = asyncio.ensure_future(job.events.get())
        try:
            done, _ = await asyncio.wait({getter}, timeout=poll_s)
        finally:
            if not getter.done():
                getter.cancel()
        if done:
            event = getter.result()
            if isinstance(event, (Done, Failed)):
                return event
        elif await request.is_disconnected():
            return None


def _usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


async def _events(
    job: Job, completion_id: str, model_name: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. When the
    client goes away, the generator is cancelled and the job with it."""
    created = int(time.time())

    def chunk(delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            ],
            **extra,
        }
        if include_usage:
            body.setdefault("usage", None)
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if isinstance(event, Delta):
                yield chunk({"content": event.text})
            elif isinstance(event, Done):
                yield chunk({}, event.finish_reason)
                if include_usage:
                    body = {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": _usage(event),
                    }
                    yield f"data: {json.dumps(body)}\n\n"
                break
            else:
                kind = "invalid_request_error" if event.status < 500 else "server_error"
                error = {"message": event.message, "type": kind, "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()
