"""The server with continuous batching (`python -m llava_jax.serve --engine slots`, chunked
prefill, image and prefix caches), from the outside as test_serve.py drives it: answers
(plain, streamed, cut by a stop string) are `generate`'s; concurrent requests share the
decode slots and each answer equals it alone; a client that leaves mid-stream frees its
slot; a request that cannot fit a slot's cache gets a 400 naming the limit; `/metrics`
parses and moves."""

from __future__ import annotations

import openai
import pytest
from test_inference_cli import QUESTION
from test_serve import (  # noqa: F401 - fixtures
    MAX_IMAGE_BYTES,
    MODEL,
    ask,
    ask_together,
    health,
    image,
    loaded,
    model_dir,
    reference,
    running_server,
    user,
    wait_until_one_job_ended,
)

SLOTS = 3
SLOT_CACHE = 128


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, request, loaded):  # noqa: F811
    """The slot server: up to 8 slots of SLOT_CACHE tokens, but a KV cache budget that holds
    only SLOTS of them."""
    from llava_jax.inference.kv_budget import kv_bytes_per_token

    per_token = kv_bytes_per_token(loaded.config, loaded.engine.cache_dtype)
    budget_gib = (SLOTS * SLOT_CACHE + 8) * per_token / (1 << 30)  # 3 slots and a bit
    log_path = tmp_path_factory.mktemp("serve_slots_log") / "serve.log"
    args = ["--checkpoint", model_dir, "--model-name", MODEL, "--engine", "slots"]
    args += ["--max-slots", 8, "--slot-cache-length", SLOT_CACHE, "--steps-per-round", 2]
    args += ["--kv-cache-gib", repr(budget_gib)]
    args += ["--prefill-chunk", 16]  # and so the prefix cache
    args += ["--max-image-bytes", MAX_IMAGE_BYTES]
    with running_server(args, log_path, lambda: request.getfixturevalue("reference")) as (
        url,
        _,
    ):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.timeout(240)
def test_answers_plain_streamed_and_cut_are_generate_s(server, client, reference, image):  # noqa: F811
    plain = ask(client, [user(QUESTION, image)])
    text = plain.choices[0].message.content
    assert text and text == reference[2].texts[0].strip()
    assert plain.usage.completion_tokens == len(reference[2].tokens[0])
    stream = ask(client, [user(QUESTION, image)], stream=True)
    pieces = [
        c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == text and len(pieces) > 1
    word = text.split()[-1]
    cut = ask(client, [user(QUESTION, image)], stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(word)].strip()
    assert health(server)["slots_in_use"] == 0


@pytest.mark.timeout(240)
def test_concurrent_requests_share_slots_and_answer_as_alone(server, client, image):  # noqa: F811
    requests = [
        ([user(QUESTION, image)], {}),
        ([user("How many shapes ?", image)], {}),
        ([user(f"{QUESTION} How many shapes ? {QUESTION}", image)], {"max_tokens": 12}),
        ([user(QUESTION)], {"max_tokens": 20}),
        ([user(QUESTION, image)], {"temperature": 1.0, "top_p": 0.9, "seed": 7}),  # sampled
    ]
    alone = [ask(client, m, **k).choices[0].message.content for m, k in requests]
    assert ask_together(client, requests) == alone
    assert health(server)["most_slots_in_use"] > 1  # they decoded together


@pytest.mark.timeout(240)
def test_a_client_leaving_mid_stream_frees_its_slot(server, client):
    before = health(server)
    stream = ask(client, [user(QUESTION)], stream=True, max_tokens=60)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices[0].delta.content)
        if received == 2:
            break
    stream.close()
    wait_until_one_job_ended(server, before)  # (test_slots.py: the cancelling, without a race)
    assert health(server)["slots_in_use"] == 0


@pytest.mark.timeout(240)
def test_a_request_too_long_for_a_slot_gets_a_400_naming_the_limit(server, client, image):  # noqa: F811
    with pytest.raises(openai.BadRequestError, match=f"cache_length={SLOT_CACHE}.*KV cache"):
        ask(client, [user(QUESTION, image)], max_tokens=SLOT_CACHE)
    assert ask(client, [user(QUESTION)], max_tokens=2).choices[0].message.content is not None


def scrape(server) -> dict:
    """`/metrics` read with Prometheus' own text parser: {sample name + labels: value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{server}/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.mark.timeout(240)
def test_metrics_parse_and_move_as_requests_are_served(server, client, image):  # noqa: F811
    before = scrape(server)
    answer = ask(client, [user(QUESTION, image)], max_tokens=6)
    with pytest.raises(openai.BadRequestError):
        ask(client, [user(QUESTION, image)], max_tokens=SLOT_CACHE)
    after = scrape(server)

    def moved(name: str) -> float:
        return after[name] - before[name]

    assert moved("llava_jax_requests_total{outcome=completed}") == 1
    assert moved("llava_jax_requests_total{outcome=refused}") == 1
    assert moved("llava_jax_generated_tokens_total") == answer.usage.completion_tokens
    assert moved("llava_jax_prompt_tokens_total") == answer.usage.prompt_tokens
    assert moved("llava_jax_time_to_first_token_seconds_count") == 1
    assert moved("llava_jax_time_to_first_token_seconds_bucket{le=+Inf}") == 1
    assert moved("llava_jax_time_per_output_token_seconds_count") == (
        answer.usage.completion_tokens > 1
    )
    lookups = [f"llava_jax_image_cache_lookups_total{{result={r}}}" for r in ("hits", "misses")]
    assert sum(moved(name) for name in lookups) == 1  # the answered request's one image
    assert after["llava_jax_image_cache_bytes"] > 0
    # Its prompt's whole blocks of 16 were looked up (all but the last token's), and kept.
    blocks = (answer.usage.prompt_tokens - 1) // 16
    lookups = [f"llava_jax_prefix_cache_lookups_total{{result={r}}}" for r in ("hits", "misses")]
    assert moved(lookups[0]) == blocks  # the same question was asked before: every block hits
    assert after["llava_jax_prefix_cache_bytes"] > 0
    assert after["llava_jax_slots"] == SLOTS and after["llava_jax_slots_in_use"] == 0
    assert health(server)["cache_length"] == SLOT_CACHE  # the budget held SLOTS of them
    assert after["llava_jax_requests_waiting"] == 0
