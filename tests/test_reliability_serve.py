"""Hostile requests to the server (`python -m llava_jax.serve`), from the outside: a chunked
body far over the limit, small PNGs that decode to hundreds of megabytes, lone surrogates in
any message, JSON nested too deeply or with a number of too many digits. Each gets a 4xx in
OpenAI's error shape naming the problem, the server's memory stays bounded (measured from
/proc/<pid>/status), `/health` drains and a greedy request gets the answer it got before.

One real server for the module, on test_serve.py's tiny model (its default pixel limit:
128 x 28 x 28 = 100,352 pixels); the image threads' bound is checked in this process, with
stand-ins for the model and the batcher.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import select
import socket
import threading
import time
from http.client import HTTPResponse
from pathlib import Path

import numpy as np
import pytest
import test_serve
from PIL import Image
from test_inference_cli import QUESTION
from test_serve import MODEL, free_port, http, running_server, user

from llava_jax.models.inputs import ImageGeometry

# test_serve.py's fixtures, for this module: the tiny model's directory and a scene
model_dir = test_serve.model_dir
image = test_serve.image

MAX_IMAGE_BYTES = 1_000_000  # a bomb's 115 KB data URL passes: its pixels are the problem
MAX_REQUEST_BYTES = 2 * MAX_IMAGE_BYTES + (1 << 20)  # as __main__ derives it
PIXEL_LIMIT = 128 * 28 * 28  # the tiny model's default: 128 x its 28 x 28 input
MB = 1 << 20


@dataclasses.dataclass
class Server:
    url: str
    pid: int
    port: int
    log: Path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """A server on the tiny model with the default pixel limit and 1 MB images."""
    log_path = tmp_path_factory.mktemp("serve_log") / "serve.log"
    args = ["--checkpoint", model_dir, "--model-name", MODEL, "--max-batch", 2]
    args += ["--batch-wait-ms", 10, "--max-image-bytes", MAX_IMAGE_BYTES]
    with running_server(args, log_path) as (url, process):
        yield Server(url, process.pid, int(url.rsplit(":", 1)[1]), log_path)


def post(server: Server, body) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http(f"{server.url}/v1/chat/completions", raw)


def request(messages: list[dict], **knobs) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0, **knobs}


@pytest.fixture(scope="module")
def greedy(server, image) -> str:
    """The greedy answer to a question about the scene, before any bad request."""
    status, body = post(server, request([user(QUESTION, image)]))
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def assert_goes_on(server: Server, image, greedy: str) -> None:
    """`/health` drains and the greedy request gets the same answer as before."""
    deadline = time.monotonic() + 30
    while True:
        status, stats = http(f"{server.url}/health")
        if status == 200 and stats["running"] == 0 and stats["queued"] == 0:
            break
        assert time.monotonic() < deadline, f"the server does not drain: {stats}"
        time.sleep(0.05)
    status, body = post(server, request([user(QUESTION, image)]))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == greedy


def assert_error(status: int, body: dict, expected: int, *words: str) -> dict:
    assert status == expected, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    for word in words:
        assert word in error["message"], error
    return error


def _kilobytes(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@contextlib.contextmanager
def peak_growth(pid: int):
    """Yields a dict whose "bytes" is, on leaving, how far the process's resident memory
    rose above where it was on entering: its VmHWM, reset on entering (clear_refs), and
    VmRSS sampled every 5 ms should the reset be refused."""
    result = {"bytes": 0}
    before = _kilobytes(pid, "VmRSS")
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to VmRSS
        reset = True
    except OSError:
        reset = False
    peak, stop = [before], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _kilobytes(pid, "VmRSS"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        top = max(peak[0], _kilobytes(pid, "VmHWM") if reset else 0)
        result["bytes"] = (top - before) * 1024
        print(f"server {pid}: {before / 1024:.0f} MB, then at most {top / 1024:.0f} MB")


def send_chunked(server: Server, total: int, piece: int = MB) -> tuple[int, dict, int]:
    """POSTs a chunked body (no Content-Length) of up to `total` bytes of spaces, made as
    it is sent, until the server answers; (status, JSON body, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    data = b" " * piece
    chunk = f"{piece:x}\r\n".encode() + data + b"\r\n"
    sent = 0
    try:
        sock.sendall(head.encode())
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(chunk)
            sent += piece
        if sent >= total:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):  # the server answered and hung up
        pass
    try:
        response = HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read()), sent
    finally:
        sock.close()


@pytest.mark.timeout(120)
def test_a_chunked_body_over_the_limit_is_refused_without_being_read(server, image, greedy):
    """Finding 6: without a Content-Length, the body used to be read whole before the 413
    (a 2 GB body took the server from 578 MB to 4,674 MB). It is read as it arrives and
    refused at the limit: 256 MB sent, the server's memory grows by less than 64 MB."""
    total = 256 * MB
    with peak_growth(server.pid) as grew:
        status, body, sent = send_chunked(server, total)
    error = assert_error(status, body, 413, str(MAX_REQUEST_BYTES))
    assert error["code"] == "request_too_large"
    assert grew["bytes"] < 64 * MB, f"the server grew by {grew['bytes'] / MB:.0f} MB"
    assert sent < total  # answered before the client was done: the rest was never read
    assert_goes_on(server, image, greedy)


@pytest.mark.timeout(60)
def test_a_client_leaving_mid_body_is_no_error(server, image, greedy):
    """Noticed with finding 6: a client that closed its connection in the middle of its body
    (chunked or with a Content-Length) left a traceback (ClientDisconnect) in the server's
    log. It is nothing to report: the server goes on, its log stays clean."""
    for header, part in (
        ("Transfer-Encoding: chunked", b'5\r\n{"a":\r\n'),
        ("Content-Length: 99", b"{"),
    ):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n"
        sock.sendall(head.encode() + part)
        time.sleep(0.3)  # the handler is reading the body
        sock.close()
    assert_goes_on(server, image, greedy)
    assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]


def bomb_png(side: int = 9400) -> bytes:
    """An 86 KB PNG of side x side pixels (black): some 400 MB to decode and convert."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def image_request(png: bytes) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]
    return request([{"role": "user", "content": parts}])


@pytest.mark.timeout(180)
def test_small_decompression_bombs_are_refused_from_their_header(server, image, greedy):
    """Finding 7: an 86 KB PNG of 9400 x 9400 pixels is under PIL's limit, but decoding it
    costs some 400 MB; 16 at once took the server from 806 MB to 6,600 MB. Over the
    server's pixel limit (a multiple of the model's input), it is refused from its header
    with a 400 naming its size and the limit: six at once, the server grows by less than
    100 MB. An image under the limit is answered."""
    bomb = bomb_png()
    assert len(bomb) < 100_000
    results: list = [None] * 6
    barrier = threading.Barrier(len(results))

    def send(i: int) -> None:
        barrier.wait()
        results[i] = post(server, image_request(bomb))

    with peak_growth(server.pid) as grew:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(results))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(150)
    for status, body in results:
        error = assert_error(status, body, 400, "9400x9400", str(PIXEL_LIMIT))
        assert error["param"] == "messages[0].content" and "--max-image-pixels" in error["message"]
    assert grew["bytes"] < 100 * MB, f"the server grew by {grew['bytes'] / MB:.0f} MB"

    under = io.BytesIO()
    Image.new("RGB", (300, 300), (200, 30, 30)).save(under, "PNG")  # 90,000 pixels
    status, body = post(server, image_request(under.getvalue()))
    assert status == 200 and body["choices"][0]["message"]["content"], body
    assert_goes_on(server, image, greedy)


@pytest.mark.timeout(120)
def test_a_lone_surrogate_in_any_message_is_a_400_naming_it(server, image, greedy):
    """Finding 10: user messages were checked, an earlier assistant message was not (a 500
    from the tokenizer's TypeError). Any message's text: a 400 naming messages[i].content."""
    history = [user("Hi"), {"role": "assistant", "content": "a\ud800b"}, user("Hi")]
    error = assert_error(*post(server, request(history)), 400, "messages[1].content")
    assert error["param"] == "messages[1].content" and "\\ud800" in error["message"]
    history = [user("Hi"), {"role": "assistant", "content": "Yes"}, user("what \udfff ?")]
    error = assert_error(*post(server, request(history)), 400, "messages[2].content")
    assert error["param"] == "messages[2].content"
    parts = [{"type": "text", "text": "Yes"}, {"type": "text", "text": "\ud83d"}]
    history = [user("Hi"), {"role": "assistant", "content": parts}, user("Hi")]
    assert_error(*post(server, request(history)), 400, "messages[1].content")
    assert_goes_on(server, image, greedy)


@pytest.mark.timeout(60)
def test_json_nested_too_deeply_is_a_400(server, image, greedy):
    """Finding 11: JSON nested 100,000 levels was a 500 (RecursionError). A 400 naming the
    problem; nesting the reader takes, in a field that must be a number, is that field's."""
    deep = b'{"model": "tiny-llava", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    error = assert_error(*post(server, deep), 400, "nested too deeply")
    assert error["code"] == "invalid_json"
    error = assert_error(*post(server, request([user("Hi")], temperature=nested(500))), 400)
    assert error["param"] == "temperature"
    assert_goes_on(server, image, greedy)


@pytest.mark.timeout(60)
def test_a_number_of_too_many_digits_is_a_400(server, image, greedy):
    """Finding 12: a 5,000-digit JSON integer was a 500 (Python's digit limit, ValueError).
    A 400 naming the number's digits."""
    huge = json.dumps(request([user("Hi")])).encode()[:-1] + b', "seed": ' + b"7" * 5000 + b"}"
    error = assert_error(*post(server, huge), 400, "5000 digits")
    assert error["code"] == "invalid_json"
    assert_goes_on(server, image, greedy)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# --- the image threads' bound, in this process ------------------------------------------------


class CountingModel:
    """A stand-in for `LoadedModel` whose image decoding takes 0.1 s and counts how many
    run at once."""

    geometry = ImageGeometry.square(28, 1)

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def image_from_bytes(self, data: bytes, what: str = "the image", **limits):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.1)
        with self.lock:
            self.running -= 1
        from llava_jax.inference.load import ModelImage

        return ModelImage(np.zeros((1, 2, 2, 3), np.float32), 1, np.arange(1, dtype=np.int32))

    def user_turn(self, text: str, with_image: bool) -> dict:
        return {"from": "human", "value": text}

    def prompt_ids(self, turns, images=(), system=None) -> np.ndarray:
        return np.asarray([1, 2, 3], np.int32)

    def check_image_tokens(self, ids, images) -> None:
        pass

    def check_prompt(self, ids, wanted: int, clamp: bool = False) -> int:
        return wanted

    def sampling(self, max_new_tokens, temperature, top_k, top_p, seed):
        from llava_jax.inference.sampling import SamplingConfig

        return SamplingConfig(max_new_tokens, temperature=temperature, seed=seed)


class AnsweringBatcher:
    """A stand-in `Batcher` that answers every job at once."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def stats(self) -> dict:
        return {"running": 0, "queued": 0}

    def submit(self, job) -> None:
        from llava_jax.serve.batcher import Done

        job.send(Done("ok", "stop", len(job.prompt), 1))


@pytest.mark.timeout(60)
def test_images_are_decoded_by_a_bounded_number_of_threads():
    """Finding 7: the request thread pool decoded 40 images at once. Twelve requests with
    an image at once, to the app on uvicorn in this process: two images are decoded at a
    time (`IMAGE_WORKERS`), and every request is answered."""
    import uvicorn

    from llava_jax.serve.app import create_app

    model = CountingModel()
    app = create_app(model, AnsweringBatcher(), "counting")
    port = free_port()
    served = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    body = json.dumps(image_request(png.getvalue()) | {"model": "counting"}).encode()
    statuses: list = [None] * 12
    try:
        deadline = time.monotonic() + 30
        while not served.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

        def send(i: int) -> None:
            statuses[i] = http(f"http://127.0.0.1:{port}/v1/chat/completions", body)[0]

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(statuses))]
        for sender in threads:
            sender.start()
        for sender in threads:
            sender.join(30)
    finally:
        served.should_exit = True
        thread.join(10)
    assert statuses == [200] * len(statuses)
    assert model.most == 2, f"{model.most} images were decoded at once"


@pytest.mark.timeout(30)
def test_max_image_pixels_must_be_positive(capsys):
    from llava_jax.serve.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", "unused", "--max-image-pixels", "0"])
    assert exit_.value.code == 2
    assert "--max-image-pixels must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--prefill-chunk", "48"], "--prefill-chunk must be 0 or a power of two, got 48"),
        (
            ["--prefill-chunk", "64", "--prefill-budget", "100"],
            "--prefill-budget must be a multiple of --prefill-chunk=64, got 100",
        ),
        (["--prefill-budget", "-1"], "--prefill-budget must be >= 0, got -1"),
    ],
)
def test_slot_prefill_flags_are_checked_before_loading(flags, message, capsys):
    from llava_jax.serve.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", "unused", "--engine", "slots", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
