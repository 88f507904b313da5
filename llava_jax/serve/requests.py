"""Reading and checking a chat completion request: its body, its JSON, its fields.

`read_body` reads the body as it arrives and refuses it (413) as soon as it passes the
limit, with or without a Content-Length; `parse_body` reads its JSON; `parse_request` checks
every field and gives a `ChatRequest`, in three steps: the model, the conversation (each
message's role, text and images), and the answer's options (length, stop strings,
streaming, sampling).

Everything a client can get wrong is an `APIError` (a 4xx in OpenAI's error shape) naming
the first problem: malformed JSON (or JSON nested too deeply, or a number of too many
digits), a missing or mistyped field, text that is not valid Unicode (a lone surrogate) in
any message, an unknown model, a remote image URL (the server fetches nothing: images come
inline as `data:image/...;base64,...`), an image that is not base64 or is too large.

A LLaVA-OneVision model (`parse_request(..., onevision=True)`) also takes several images in
one message (each `image_url` part its `<image>`, in order) and a video as a `video_url`
part, as vLLM names it (`{"type": "video_url", "video_url": {"url":
"data:video/mp4;base64,..."}}`), inline like an image and bounded by the same byte limit;
other models keep one image a message and take no video.
Defaults and ranges follow OpenAI: temperature 1 in [0, 2], top_p 1 in [0, 1]; top_p 0
keeps only the most likely token (as OpenAI and transformers' top-p keep at least one): the
answer is greedy, whatever the temperature (lmms-eval's POPE and MathVerse tasks send it).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from llava_jax import json_input
from llava_jax.errors import InputError
from llava_jax.inference.load import check_text
from llava_jax.serve.api_error import APIError

MAX_IMAGES = 4  # per conversation
MAX_VIDEOS = 1  # per conversation (a OneVision model's)
MAX_STOPS = 4  # as OpenAI allows
_DATA_URL = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)", re.DOTALL
)
_SYSTEM_ROLES = ("system", "developer")


@dataclasses.dataclass(frozen=True)
class VideoBytes:
    """A request's video, as it came (encoded: MP4, WebM, ...)."""

    data: bytes


@dataclasses.dataclass
class ChatRequest:
    """A checked chat completion request. turns: (role, text, its images as bytes and videos
    as `VideoBytes`, in the order of the message's parts)."""

    turns: list[tuple[str, str, list[bytes | VideoBytes]]]
    system: str | None  # the system messages' text, in place of the template's own prompt
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


# --- the body ------------------------------------------------------------------------------------


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


def decode_data_url(url: str, param: str, max_bytes: int, kind: str = "image") -> bytes:
    """The bytes of a `data:image/...;base64,...` URL (`kind` "video": a
    `data:video/...;base64,...` one); remote URLs are refused."""
    example = f"data:{'image/png' if kind == 'image' else 'video/mp4'};base64,..."
    if re.match(r"(?i)(https?|ftp|file)://", url):
        raise APIError(
            400,
            f"{kind} URLs are not fetched by this server: send the {kind} inline "
            f"as a data URL ({example})",
            param,
            f"unsupported_{kind}_url",
        )
    match = _DATA_URL.fullmatch(url)
    if not match:
        shown = url[:40] + ("…" if len(url) > 40 else "")
        raise APIError(
            400,
            f"{kind}_url must be a data URL ({example}), got {shown!r}",
            param,
            f"invalid_{kind}_url",
        )
    mime = (match["mime"] or "").lower()
    if mime and not mime.startswith(f"{kind}/"):
        article = "an" if kind == "image" else "a"
        raise APIError(
            400, f"the data URL holds {mime}, not {article} {kind}", param, f"invalid_{kind}_url"
        )
    if ";base64" not in match["params"].lower():
        raise APIError(
            400,
            f"the {kind} data URL must be base64-encoded ({example})",
            param,
            f"invalid_{kind}_url",
        )
    data = re.sub(r"\s+", "", match["data"])
    if len(data) * 3 // 4 > max_bytes:
        raise APIError(
            413,
            f"the {kind} is {len(data) * 3 // 4} bytes, more than the server's "
            f"limit of {max_bytes} bytes (--max-image-bytes)",
            param,
            f"{kind}_too_large",
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(
            400, f"the {kind} data URL is not valid base64: {err}", param, f"invalid_{kind}_url"
        ) from None


def _content(
    message: dict, m: int, max_image_bytes: int, onevision: bool = False
) -> tuple[str, list[bytes | VideoBytes]]:
    """(text, images and videos) of `messages[m]`: a string, or parts of type text and
    image_url (and, `onevision`, video_url)."""
    where = f"messages[{m}].content"
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not content:
        raise APIError(
            400, f"{where} must be a string or a non-empty list of parts", where, "invalid_type"
        )
    texts, media = [], []
    for p, part in enumerate(content):
        at = f"{where}[{p}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
            if kind == "video_url" and not onevision:
                raise APIError(
                    400,
                    f"{at} is a video: this model takes no video (a LLaVA-OneVision model does)",
                    at,
                    "unsupported_video",
                )
            value = part.get(kind)
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str):
                raise APIError(
                    400, f"{at}.{kind}.url must be a string", f"{at}.{kind}", "invalid_type"
                )
            data = decode_data_url(url, f"{at}.{kind}", max_image_bytes, kind.removesuffix("_url"))
            media.append(data if kind == "image_url" else VideoBytes(data))
        else:
            video = (
                " or {'type': 'video_url', 'video_url': {'url': 'data:...'}}" if onevision else ""
            )
            raise APIError(
                400,
                f"{at} must be {{'type': 'text', 'text': ...}} or {{'type': "
                f"'image_url', 'image_url': {{'url': 'data:...'}}}}{video}",
                at,
                "invalid_content_part",
            )
    return "\n".join(texts), media


# --- the request ---------------------------------------------------------------------------------


def parse_request(
    body: Any, model_name: str, max_image_bytes: int, *, onevision: bool = False
) -> ChatRequest:
    """Check a chat completion request's JSON; `APIError` names the first problem.
    `onevision`: the model takes several images in a message and a video
    (`LoadedModel.geometry.blended`)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_type")
    _check_model(body, model_name)
    turns, system = _conversation(body, max_image_bytes, onevision)
    max_tokens = _max_tokens(body)
    stop = _stop(body)
    stream, include_usage = _streaming(body)
    temperature, top_p = _temperature_top_p(body)
    return ChatRequest(
        turns=turns,
        system="\n\n".join(system) if system else None,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=_integer(body, "seed"),
        stop=stop,
        stream=stream,
        include_usage=include_usage,
    )


def _check_model(body: dict, model_name: str) -> None:
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


def _conversation(
    body: dict, max_image_bytes: int, onevision: bool = False
) -> tuple[list[tuple[str, str, list[bytes | VideoBytes]]], list[str]]:
    """(turns, system texts) of `messages`: system messages first, then user and assistant
    turns alternating, the last one the user's; at most `MAX_IMAGES` images and
    `MAX_VIDEOS` videos in all."""
    messages = body.get("messages")
    if messages is None:
        raise APIError(
            400, "missing required parameter: messages", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages", "invalid_type")
    turns, system = [], []
    for m, message in enumerate(messages):
        role, text, images = _message(message, m, bool(turns), max_image_bytes, onevision)
        if role in _SYSTEM_ROLES:
            system.append(text)
            continue
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
    media = [item for _, _, items in turns for item in items]
    if sum(not isinstance(item, VideoBytes) for item in media) > MAX_IMAGES:
        raise APIError(
            400, f"at most {MAX_IMAGES} images per conversation", "messages", "invalid_value"
        )
    if sum(isinstance(item, VideoBytes) for item in media) > MAX_VIDEOS:
        raise APIError(
            400, f"at most {MAX_VIDEOS} video per conversation", "messages", "invalid_value"
        )
    return turns, system


def _message(
    message: Any, m: int, began: bool, max_image_bytes: int, onevision: bool = False
) -> tuple[str, str, list[bytes | VideoBytes]]:
    """(role, text, images and videos) of `messages[m]`, checked on its own; `began`: a user
    or assistant message came before it (a system message may not follow one)."""
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ("user", "assistant", *_SYSTEM_ROLES):
        raise APIError(
            400,
            f"messages[{m}].role must be 'system', 'user' or 'assistant', got {json.dumps(role)}",
            f"messages[{m}].role",
            "invalid_value",
        )
    if role in _SYSTEM_ROLES and began:
        raise APIError(
            400,
            f"messages[{m}] is a {role} message after the conversation began: system "
            "messages come first (they take the place of the template's system prompt)",
            f"messages[{m}].role",
            "invalid_value",
        )
    text, images = _content(message, m, max_image_bytes, onevision)
    try:  # a tokenizer cannot take a lone surrogate (JSON's "\ud800")
        check_text(text, f"messages[{m}].content")
    except InputError as err:
        where = f"messages[{m}].content"
        raise APIError(400, str(err), where, "invalid_value") from None
    _check_images(role, images, m, onevision)
    return role, text, images


def _check_images(
    role: str, images: list[bytes | VideoBytes], m: int, onevision: bool = False
) -> None:
    """Only a user message may have an image (or a video), and one at most but on a
    OneVision model."""
    if images and role != "user":
        raise APIError(
            400,
            f"messages[{m}]: only user messages may have images",
            f"messages[{m}].content",
            "invalid_value",
        )
    if len(images) > 1 and not onevision:
        raise APIError(
            400,
            f"messages[{m}] has {len(images)} images: one per message at most",
            f"messages[{m}].content",
            "invalid_value",
        )


def _max_tokens(body: dict) -> int | None:
    """`max_completion_tokens` (or the older `max_tokens`), and one choice (`n`) only."""
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
    return max_tokens


def _stop(body: dict) -> tuple[str, ...]:
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
    return stop


def _streaming(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options", "invalid_type")
    return stream, bool(options.get("include_usage", False))


def _temperature_top_p(body: dict) -> tuple[float, float]:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:  # the nucleus is the most likely token alone: greedy decoding
        temperature, top_p = 0.0, 1.0
    return temperature, top_p
