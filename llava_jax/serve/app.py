"""The HTTP side: OpenAI's chat completions API on FastAPI, and the chat page.

    POST /v1/chat/completions   messages (text, and images as data: URLs; a OneVision
                                model's videos too), max_tokens, temperature, top_p,
                                stop, seed, stream (server-sent events)
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", "running": …, "queued": …, …}
    GET  /                      the chat page (static/index.html)

A request becomes a prompt as every program makes one, `prompting.prepare_prompt` (the
image's `<image>` first in its turn, the checkpoint's own template, exactly the image
tokens of its images, max_tokens lowered to what the context leaves), with images decoded
and normalised by `LoadedModel.image_from_bytes` with the model's data settings. The stop
strings are the template's end of answer plus the request's `stop`.

Everything a client can get wrong is answered with a 4xx in OpenAI's error shape,
`{"error": {"message", "type", "param", "code"}}` (`api_error.py`), naming the problem:
what the request itself says wrong is found by `requests.py` as it reads and checks it
(malformed JSON, a missing or mistyped field, an unknown model, an image URL that is not an
inline base64 data URL, ...); here, an image that cannot be decoded or is too large, a
conversation that does not fit the context. A request without a seed is seeded at random.

What a request may cost is bounded. Its body is read as it arrives and refused (413) as
soon as it passes the limit, with or without a Content-Length (`requests.read_body`). An
image's size is read from its header and refused over `max_image_pixels` (default
`IMAGE_PIXELS_MULTIPLE` times the pixels of the model's largest input) before any pixel is
decoded; images are decoded by `image_workers` threads at most, whatever the number of
requests, and the memory a decoded image took is handed back to the system afterwards.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_jax.cli import DEFAULT_FRAMES
from llava_jax.errors import InputError, PromptTooLongError
from llava_jax.inference.load import Media
from llava_jax.inference.prompting import Turn, TurnError, prepare_prompt
from llava_jax.serve.api_error import APIError, error_response
from llava_jax.serve.batcher import Batcher, Delta, Done, Failed, Job
from llava_jax.serve.metrics import CONTENT_TYPE, ServerMetrics
from llava_jax.serve.requests import (
    ChatRequest,
    VideoBytes,
    parse_body,
    parse_request,
    read_body,
)

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
DEFAULT_MAX_TOKENS = 256
# The default pixel limit of an image: this many times the pixels of the model's largest
# input (LLaVA-1.5's 336 x 336: 14.4 million pixels, so a 12-megapixel photo fits). Decoding
# costs 5 to 8 bytes a pixel at its peak (grey to colour): some 115 MB at that limit.
IMAGE_PIXELS_MULTIPLE = 128
IMAGE_WORKERS = 2  # images decoded at once, whatever the number of requests


# --- a request's images and prompt ---------------------------------------------------------------


def default_max_image_pixels(model: Any) -> int:
    """`IMAGE_PIXELS_MULTIPLE` times the pixels of the model's largest input: its image size
    squared, or a NeXT model's largest grid resolution."""
    height, width = model.geometry.largest_input
    return IMAGE_PIXELS_MULTIPLE * height * width


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
    model: Any,
    request: ChatRequest,
    max_pixels: int | None = None,
    frames: int = DEFAULT_FRAMES,
) -> list[Media]:
    """The request's images (and videos, `frames` frames each) as the model takes them, in
    prompt order; `APIError` 400 for an image or video that cannot be decoded or whose
    header claims more than `max_pixels` pixels (a frame's, for a video; refused before
    decoding). Memory is handed back afterwards (`release_memory`)."""
    images = []
    try:
        for m, (_, _, pictures) in enumerate(request.turns):
            for picture in pictures:
                try:
                    if isinstance(picture, VideoBytes):
                        image = model.video_from_bytes(
                            picture.data,
                            frames,
                            f"in messages[{m}]",
                            max_pixels=max_pixels,
                            limit_name="the server's --max-image-pixels",
                        )
                    else:
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
    images: Sequence[Media] | None = None,
    max_image_pixels: int | None = None,
) -> Job:
    """The prompt and sampling of `request`, as `generate`/`chat` build them (runs in a
    thread: tokenizing takes a while). `images`: the request's, from `decode_images` (which
    the server runs on its few image threads); when None they are decoded here."""
    if images is None:
        images = decode_images(model, request, max_image_pixels)
    # an assistant message's text is checked by `parse_request`
    turns = [Turn(role, text, len(pictures)) for role, text, pictures in request.turns]
    seed = secrets.randbits(32) if request.seed is None else request.seed % (1 << 32)
    try:
        prepared = prepare_prompt(
            model,
            turns,
            images,
            max_new_tokens=request.max_tokens or DEFAULT_MAX_TOKENS,
            system=request.system,
            sampling=dict(temperature=request.temperature, top_k=0, top_p=request.top_p, seed=seed),
            stop=request.stop,
        )
    except TurnError as err:
        where = f"messages[{err.turn}].content"
        raise APIError(400, str(err), where, "invalid_value") from None
    except PromptTooLongError as err:
        raise APIError(400, str(err), "messages", "context_length_exceeded") from None
    except (InputError, ValueError) as err:
        raise APIError(400, str(err), "messages", "invalid_value") from None
    return Job(
        prompt=prepared.ids,
        images=prepared.images,
        sampling=prepared.sampling,
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
    video_frames: int = DEFAULT_FRAMES,
) -> FastAPI:
    """The server's routes around a started-on-startup `batcher` of `model`.

    max_image_pixels: the most pixels an image (or a video's frame) may have (from its
    header; None: `default_max_image_pixels`); image_workers: the threads that decode
    images (requests beyond them wait their turn, holding only their encoded bytes);
    video_frames: the frames sampled from a video (a OneVision model's)."""
    created = int(time.time())
    metrics = ServerMetrics()
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

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(batcher.stats()), media_type=CONTENT_TYPE)

    def settle(job: Job, event: Done | Failed | None) -> None:
        """Count how the job ended (None: its client went away first)."""
        if event is None:
            metrics.count("cancelled")
        elif isinstance(event, Failed):
            metrics.count("refused" if event.status < 500 else "failed")
        else:
            metrics.answered(
                event.prompt_tokens,
                event.completion_tokens,
                job.arrived,
                job.first_token_at,
                time.monotonic(),
            )

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "llava_jax"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        try:
            raw = await read_body(request, max_request_bytes)
            parsed = parse_request(
                parse_body(raw), model_name, max_image_bytes, onevision=model.geometry.blended
            )
            del raw
            loop = asyncio.get_running_loop()
            images = []
            if any(pictures for _, _, pictures in parsed.turns):
                images = await loop.run_in_executor(
                    decoder, decode_images, model, parsed, max_image_pixels, video_frames
                )
            job = await run_in_threadpool(make_job, model, parsed, loop, images)
        except APIError as err:
            metrics.count("refused" if err.status < 500 else "failed")
            raise
        job.arrived = arrived
        batcher.submit(job)
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        if parsed.stream:
            return StreamingResponse(
                _events(job, completion_id, model_name, parsed.include_usage, settle),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        event = None
        try:
            event = await _final_event(job, request)
        finally:
            job.cancel()  # a no-op once answered; frees the row if this handler is cancelled
            settle(job, event)
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
    job: Job,
    completion_id: str,
    model_name: str,
    include_usage: bool,
    settle: Callable[[Job, Done | Failed | None], None],
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. When the
    client goes away, the generator is cancelled and the job with it. `settle(job, last
    event or None)` counts how it ended."""
    created = int(time.time())
    ended: Done | Failed | None = None

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
                ended = event
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
                ended = event
                kind = "invalid_request_error" if event.status < 500 else "server_error"
                error = {"message": event.message, "type": kind, "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()
        settle(job, ended)
