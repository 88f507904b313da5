"""The OpenAI-compatible server (`python -m llava_jax.serve`), from the outside: the official
`openai` client against a real uvicorn process on a free localhost port, serving a tiny
random transformers LLaVA saved here (as in test_inference_cli.py), started once for the
module. Round trips (plain and streamed) give what `generate` gives; concurrent requests are
batched and a greedy answer is the same alone or in a batch; bad inputs get a 4xx in
OpenAI's error shape and the server goes on; a client that leaves mid-stream frees its row;
the chat page works in a headless Chromium. The batcher alone, with stand-in models: a batch
whose clients left ends, and a request that fails does not fail the others of its batch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import numpy as np
import openai
import pytest
from PIL import Image
from test_inference_cli import QUESTION, cli_env, save_tiny_llava, write_scene
from trainer_fixtures import REPO

MODEL = "tiny-llava"
MAX_BATCH = 4
MAX_IMAGE_BYTES = 100_000
CONTEXT = 256  # the tiny model's max_position_embeddings
START_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET (or a POST of `body`), without a client library."""
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def data_url(path) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_llava_serve")
    save_tiny_llava(directory)
    return directory


@pytest.fixture(scope="module")
def loaded(model_dir):
    """The same model in this process, as `generate` loads it."""
    from llava_jax.inference.load import load_model

    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def reference(loaded, image):
    """(run, configs, result): in this process, a batch as the batcher makes one (padded to
    MAX_BATCH rows), each row built with the methods `generate` uses (`load_image`,
    `user_turn`, `prompt_ids`, `sampling`): row 0 greedy, 8 tokens at most; row 1 sampled
    (seed 3), 5 tokens at most; `run(configs)` runs it again with other configs."""
    pixels = loaded.load_image(str(image)).pixels[None]  # float32[1, 1, H, W, 3]: one image
    ids = loaded.prompt_ids([loaded.user_turn(QUESTION, with_image=True)])
    assert np.sum(ids == loaded.config.image_token_id) == loaded.config.num_image_tokens
    configs = [loaded.sampling(8), loaded.sampling(5, temperature=1.0, seed=3)]

    def run(configs):
        images = np.stack([pixels, pixels])
        return loaded.generate([ids, ids], images, None, configs, batch_rows=MAX_BATCH)

    return run, configs, run(configs)


def wait_until_serving(url: str, process: subprocess.Popen, log_path) -> None:
    """Block until the server at `url` answers /health (the test fails with its log if it
    exits or takes over START_TIMEOUT)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            if http(f"{url}/health")[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the server did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def running_server(
    args: list[str], log_path, while_starting: Callable[[], object] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m llava_jax.serve ARGS --port P` (a free port) until the block ends: (its base
    URL, its process), once /health answers (`while_starting` runs meanwhile). Afterwards the
    log must hold no traceback."""
    port = free_port()
    command = [sys.executable, "-m", "llava_jax.serve", *map(str, args), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=log, stderr=log)
        try:
            if while_starting is not None:
                while_starting()
            wait_until_serving(url, process, log_path)
            yield url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, request):
    """The base URL of a server on the tiny model (batches of up to 4, 100 ms to fill one,
    one token per streamed piece). This process compiles its `reference` while the server
    starts."""
    log_path = tmp_path_factory.mktemp("serve_log") / "serve.log"
    args = ["--checkpoint", model_dir, "--model-name", MODEL, "--max-batch", MAX_BATCH]
    args += ["--batch-wait-ms", 100, "--chunk-size", 1, "--max-image-bytes", MAX_IMAGE_BYTES]
    with running_server(args, log_path, lambda: request.getfixturevalue("reference")) as (
        url,
        _,
    ):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    write_scene(path, seed=0)
    return path


def user(text: str, image_path=None) -> dict:
    if image_path is None:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": data_url(image_path)}}]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def ask(client, messages, **knobs):
    knobs = {"max_tokens": 8, "temperature": 0, **knobs}
    return client.chat.completions.create(model=MODEL, messages=messages, **knobs)


def health(server) -> dict:
    return http(f"{server}/health")[1]


@pytest.mark.timeout(240)
def test_round_trip_plain_and_streamed_as_generate_answers(server, client, reference, image):
    assert [m.id for m in client.models.list().data] == [MODEL]
    plain = ask(client, [user(QUESTION, image)])
    text = plain.choices[0].message.content
    assert plain.model == MODEL and plain.choices[0].finish_reason in ("stop", "length")
    # The checkpoint's template and image preprocessing, as `generate` uses them.
    assert text == reference[2].texts[0].strip() and text
    assert plain.usage.completion_tokens >= 1
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    stream = ask(
        client, [user(QUESTION, image)], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == text and len(pieces) > 1  # token by token
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == plain.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    # A follow-up with the answer in the history; stop strings cut the answer.
    history = [user(QUESTION, image), {"role": "assistant", "content": text}]
    follow = ask(client, [*history, user("How many shapes ?")])
    assert follow.choices[0].message.content
    word = text.split()[-1]
    cut = ask(client, [user(QUESTION, image)], stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(word)].strip()


@pytest.mark.timeout(240)
def test_a_system_message_takes_the_place_of_the_template_s_system_prompt(server, client, loaded):
    """OpenAI clients (a judge, lmms-eval's reasoning tasks) send system messages: their text
    is the prompt's system prompt instead of the template's, in the template's own place."""
    system = "How many shapes ?"  # words of the test tokenizer's vocabulary
    with_system = ask(
        client, [{"role": "system", "content": system}, user(QUESTION)], max_tokens=1
    ).usage.prompt_tokens
    turns = [loaded.user_turn(QUESTION, with_image=False)]
    expected = loaded.prompt_ids(turns, system=system)
    assert with_system == len(expected) != len(loaded.prompt_ids(turns))
    template = loaded.template
    rendered = template.render(turns, generation_prompt=True).text
    assert rendered.startswith(template.system) and template.system != system
    decode = loaded.tokenizer.tokenizer.decode
    assert "many shapes" in decode(expected.tolist()).split("USER")[0]
    assert "curious" in decode(loaded.prompt_ids(turns).tolist())
    assert "curious" not in decode(expected.tolist())


@pytest.mark.timeout(240)
def test_special_token_text_in_a_request_stays_text(server, client, loaded):
    """A question that writes "</s>" gets the tokens of those characters, not the
    end-of-sequence token mid-turn (the prompt is the tokenizer's text, split as text)."""
    written = ask(client, [user("What does </s> mean ?")], max_tokens=1).usage.prompt_tokens
    without = ask(client, [user("What does mean ?")], max_tokens=1).usage.prompt_tokens
    tokenizer = loaded.tokenizer.tokenizer
    as_text = tokenizer("</s>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(as_text) > 1  # "</", "s", ">": the control token would be one
    assert written - without == len(as_text)
    answer = ask(client, [user("</s> <s> <pad> <unk>")]).choices[0]
    assert answer.finish_reason in ("stop", "length")
    # the noncharacters the tokenizer keeps for its control tokens: a 400 naming one
    with pytest.raises(openai.BadRequestError, match="U\\+FDD0"):
        ask(client, [user("What is \ufdd0 ?")])
    assert health(server)["status"] == "ok"


@pytest.mark.timeout(240)
def ask_together(client, requests: list[tuple[list, dict]]) -> list[str]:
    """Each `(messages, knobs)` asked from its own thread, all released at once: the
    answers' texts, in order."""
    together: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def send(i: int) -> None:
        barrier.wait()
        messages, knobs = requests[i]
        together[i] = ask(client, messages, **knobs).choices[0].message.content

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return together


def test_batched_answers_equal_answers_alone(server, client, image):
    requests = [
        ([user(QUESTION, image)], {}),
        ([user("How many shapes ?", image)], {}),
        ([user(f"{QUESTION} How many shapes ? {QUESTION}", image)], {"max_tokens": 12}),
        ([user(QUESTION, image)], {"temperature": 1.0, "top_p": 0.9, "seed": 7}),  # sampled
    ]
    alone = [ask(client, m, **k).choices[0].message.content for m, k in requests]
    before = health(server)["batches"]
    together = ask_together(client, requests)
    stats = health(server)
    assert stats["batches"] - before < len(requests), "the requests were not batched"
    assert stats["largest_batch"] > 1
    # Greedy rows (and a seeded sampled row: its key is its own) do not depend on the batch.
    assert together == alone


def test_engine_rows_with_their_own_sampling_and_stops(reference):
    """What the batcher relies on: one `SamplingConfig` per row, each with its own
    temperature, seed, length and stop strings."""
    run, configs, together = reference
    assert [len(t) for t in together.tokens] == [8, 5]  # each row's own length
    assert together.finish_reasons == ["length", "length"]
    # A stop string that row 0 completes with its last token, as it reaches its length.
    stop = together.texts[0].strip()
    configs = [dataclasses.replace(configs[0], stop_strings=(stop,)), configs[1]]
    cut = run(configs)
    assert cut.finish_reasons[0] == "stop" and cut.texts[0].strip() == ""
    assert cut.texts[1] == together.texts[1]  # the other row's stops are its own


BAD_REQUESTS = {
    "unknown model": (dict(model="gpt-4"), 404, "model_not_found"),
    "missing messages": (dict(messages=None), 400, "missing_required_parameter"),
    "negative max_tokens": (dict(max_tokens=-3), 400, "invalid_value"),
    "remote image url": ("http://example.com/cat.png", 400, "unsupported_image_url"),
    "image not base64": ("data:image/png;base64,%%%not-base64%%%", 400, "invalid_image_url"),
    "undecodable image": (
        "data:image/png;base64," + base64.b64encode(b"not an image at all").decode(),
        400,
        "invalid_value",
    ),
    "oversized image": ("data:image/png;base64," + "A" * (MAX_IMAGE_BYTES * 2), 413, None),
    "prompt over the context": (dict(text="shapes " * CONTEXT), 400, "context_length_exceeded"),
    "system message after the conversation began": (dict(system=True), 400, "invalid_value"),
    "temperature out of range": (dict(temperature=-1), 400, "invalid_value"),
}


@pytest.mark.timeout(240)
def test_bad_inputs_get_a_4xx_and_the_server_goes_on(server, client, image):
    good = ask(client, [user("How many shapes ?", image)]).choices[0].message.content
    for name, (bad, status, code) in BAD_REQUESTS.items():
        body = {"model": MODEL, "messages": [user("How many shapes ?")], "max_tokens": 4}
        if isinstance(bad, str):  # an image URL
            parts = [
                {"type": "image_url", "image_url": {"url": bad}},
                {"type": "text", "text": "Hi"},
            ]
            body["messages"] = [{"role": "user", "content": parts}]
        elif "text" in bad:
            body["messages"] = [user(bad["text"])]
        elif "system" in bad:
            body["messages"] = [user("Hi"), {"role": "system", "content": "Be brief."}]
        else:
            body.update(bad)
            body = {k: v for k, v in body.items() if v is not None}
        if "messages" in body:
            with pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(**body)
            got, error = caught.value.status_code, caught.value.body
        else:  # the client itself refuses to send it
            got, error = http(f"{server}/v1/chat/completions", json.dumps(body).encode())
            error = error["error"]
        assert got == status, (name, error)
        assert set(error) == {"message", "type", "param", "code"}, (name, error)
        assert error["message"] and (code is None or error["code"] == code), (name, error)
        # The next request is served normally.
        assert ask(client, [user("How many shapes ?", image)]).choices[0].message.content == good

    for raw in (b"{not json", b'{"model": "tiny-llava", "messages": [', b"\xff\xfe", b"[1, 2]"):
        status, body = http(f"{server}/v1/chat/completions", raw)
        assert status == 400, (raw, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert ask(client, [user("How many shapes ?", image)]).choices[0].message.content == good
    assert health(server)["status"] == "ok"


@pytest.mark.timeout(240)
def wait_until_one_job_ended(server, before: dict, timeout: float = 30) -> None:
    """Until the server runs and queues nothing and one more job is accounted for since
    `before` (its /health then): cancelled, or, on a fast machine, answered before the
    server saw its client leave."""
    deadline = time.monotonic() + timeout
    while True:
        stats = health(server)
        ended = stats["cancelled"] + stats["completed"] - before["cancelled"] - before["completed"]
        if stats["running"] == 0 and stats["queued"] == 0 and ended == 1:
            return
        assert time.monotonic() < deadline, f"the row was not freed: {stats}"
        time.sleep(0.05)


def test_a_client_leaving_mid_stream_frees_its_row(server, client, image):
    before = health(server)
    # The longest answer the context allows, one token per piece.
    stream = ask(client, [user(QUESTION, image)], max_tokens=CONTEXT - 48, stream=True)
    received = 0
    for chunk in stream:
        assert chunk.choices[0].finish_reason is None
        received += bool(chunk.choices[0].delta.content)
        if received == 2:
            break
    stream.close()
    # (test_batcher_ends_a_batch_whose_clients_left checks the cancelling without a race)
    wait_until_one_job_ended(server, before)
    assert ask(client, [user("How many shapes ?", image)]).choices[0].message.content
    assert health(server)["running"] == 0


class EndlessModel:
    """A stand-in for `LoadedModel` whose rows never stop: one token per chunk."""

    def __init__(self):
        self.chunks = 0

    def decode(self, tokens) -> str:
        return " ".join(f"t{t}" for t in tokens)

    def batch_images(self, rows, min_slots=0) -> dict:
        return {"images": np.zeros((len(rows), min_slots, 2, 2, 3)), "image_mask": None}

    def stream(self, prompts, images, image_mask, sampling, chunk_size, batch_rows):
        model = self

        class Stream:
            finished = [False] * len(prompts)

            def __iter__(self):
                while True:
                    model.chunks += 1
                    time.sleep(0.005)
                    yield [np.asarray([model.chunks]) for _ in prompts]

        return Stream()


@pytest.mark.timeout(30)
def test_batcher_ends_a_batch_whose_clients_left():
    from llava_jax.inference.sampling import SamplingConfig
    from llava_jax.serve.batcher import Batcher, Delta, Job

    loop = asyncio.new_event_loop()
    model = EndlessModel()
    batcher = Batcher(model, max_batch=2, batch_wait_s=0.0, chunk_size=1)
    batcher.start()
    try:
        job = Job(np.ones(3, np.int32), (), SamplingConfig(10**6), stream=True, loop=loop)
        batcher.submit(job)
        first = loop.run_until_complete(asyncio.wait_for(job.events.get(), 10))
        assert isinstance(first, Delta) and batcher.stats()["running"] == 1
        job.cancel()
        deadline = time.monotonic() + 10
        while batcher.stats()["running"] or batcher.stats()["cancelled"] != 1:
            assert time.monotonic() < deadline, batcher.stats()
            time.sleep(0.01)
        chunks = model.chunks
        time.sleep(0.1)
        assert model.chunks == chunks  # the batch has ended: nothing is decoded any more
    finally:
        batcher.stop()
        loop.close()


class PickyModel(EndlessModel):
    """Refuses any batch with a prompt starting with 666; answers others with one token."""

    def stream(self, prompts, images, image_mask, sampling, chunk_size, batch_rows):
        if any(prompt[0] == 666 for prompt in prompts):
            raise ValueError("prompt 666 is refused")

        class Stream:
            finished = [True] * len(prompts)

            def __iter__(self):
                yield [np.asarray([7]) for _ in prompts]

        return Stream()


@pytest.mark.timeout(30)
def test_batcher_a_failing_request_does_not_fail_its_batch():
    from llava_jax.inference.sampling import SamplingConfig
    from llava_jax.serve.batcher import Batcher, Done, Failed, Job

    loop = asyncio.new_event_loop()
    batcher = Batcher(PickyModel(), max_batch=2, batch_wait_s=0.5)
    batcher.start()
    try:
        jobs = [
            Job(np.asarray([first, 1], np.int32), (), SamplingConfig(4), False, loop)
            for first in (666, 5)
        ]
        for job in jobs:
            batcher.submit(job)

        async def results():
            return [await asyncio.wait_for(job.events.get(), 10) for job in jobs]

        bad, good = loop.run_until_complete(results())
        assert isinstance(bad, Failed) and bad.status == 400 and "666" in bad.message
        assert isinstance(good, Done) and good.text == "t7" and good.finish_reason == "stop"
        assert batcher.stats()["largest_batch"] == 2  # they were one batch, then retried
    finally:
        batcher.stop()
        loop.close()


def chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.timeout(240)
@pytest.mark.skipif(chromium() is None, reason="needs chromium and chromium-driver (apt-get)")
def test_chat_page_in_headless_chromium(server, client, image, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=900,800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server)
        wait.until(lambda d: d.find_element(By.ID, "model").text == MODEL)
        driver.find_element(By.ID, "image").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        for field, value in (("temperature", "0"), ("max-tokens", "8")):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        # Count how often the answer's text changes while it streams.
        driver.execute_script(
            "window.updates = 0; new MutationObserver((records) => {"
            " window.updates += records.length; }).observe(document.getElementById('log'),"
            " {subtree: true, childList: true, characterData: true});"
        )

        def answers(count: int):
            def ready(d):
                done = d.find_elements(By.CSS_SELECTOR, ".assistant[data-state='done']")
                errors = d.find_elements(By.CSS_SELECTOR, ".error")
                assert not errors, errors[0].text
                return done if len(done) == count else False

            return [a.text for a in wait.until(ready)]

        driver.find_element(By.ID, "question").send_keys(QUESTION)
        driver.find_element(By.ID, "send").click()
        first = answers(1)[0]
        expected = ask(client, [user(QUESTION, image)]).choices[0].message.content
        assert first == expected and first
        assert driver.execute_script("return window.updates") > 3  # pieces, not one block

        driver.find_element(By.ID, "question").send_keys("How many shapes ?")
        driver.find_element(By.ID, "send").click()
        second = answers(2)[1]
        history = [user(QUESTION, image), {"role": "assistant", "content": first}]
        # The page sent the conversation so far: the same answer as the API with the history.
        expected = ask(client, [*history, user("How many shapes ?")]).choices[0].message.content
        assert second == expected
        shot = tmp_path / "chat_page.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        assert Image.open(io.BytesIO(shot.read_bytes())).size[0] > 0
    finally:
        driver.quit()


def test_static_page_is_package_data():
    """setup.py ships the page: the files are where the server reads them."""
    from llava_jax.serve.app import STATIC_DIR

    assert {"index.html", "chat.js"} <= set(os.listdir(STATIC_DIR))
    with open(os.path.join(REPO, "setup.py")) as f:
        assert '"llava_jax.serve": ["static/*"]' in f.read()
