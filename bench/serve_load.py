"""Benchmark: `python -m llava_jax.serve` under load: continuous batching, batching, and off.

Builds a small random LLaVA (transformers, saved with `save_pretrained`, with a word-level
tokenizer), starts the server on it three times — `--engine slots --max-slots 8`
(continuous batching), `--max-batch 8` (requests arriving together decode as one batch) and
`--max-batch 1` (batching off) — and each time sends `--requests` chat completions from
`--clients` concurrent clients (the official `openai` client): prompts of mixed lengths,
half of them with an image, half streamed, greedy and sampled, `max_tokens` between 17 and
32. Each workload runs twice untimed first, so compilation is not measured (the servers
share a compilation cache). Prints requests/s, generated tokens/s, p50/p99 latency, time to
first token and time per output token (streamed requests), failed requests for each
server, and the ratios against batching off.

    python bench/serve_load.py [--requests 64] [--clients 16] [--max-batch 8] [--max-slots 8]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
from generate import MODELS as GENERATE_MODELS  # bench/, beside this script
from generate import VOCAB
from generate import build_model as build_llava

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = 200  # real words; the rest of the vocabulary is fillers


def build_model(directory: str) -> None:
    """A small LLaVA (CLIP 28px, 4 image tokens; LLaMA hidden 256, 4 layers, 32000-token
    vocabulary, context 2048: bench/generate.py's "quick" shape, ~25M parameters) with a
    word-level tokenizer of VOCAB ids, `<image>` the last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    build_llava(directory, GENERATE_MODELS["quick"])  # bench/generate.py's quick model
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    template_words = "A chat between a curious human and an artificial intelligence assistant ."
    words = [*specials, *dict.fromkeys(f"{template_words} USER : ASSISTANT".split())]
    words += [f"word{i}" for i in range(WORDS)]
    words += [f"w{i}" for i in range(VOCAB - 1 - len(words))]
    vocab = {word: i for i, word in enumerate([*words, "<image>"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([*specials, "<image>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    ).save_pretrained(directory)


def image_url(seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def workload(count: int, seed: int = 0) -> list[dict]:
    """`count` requests: mixed prompt lengths (4..200 words), half with an image, every
    other one streamed, a third sampled."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(count):
        length = int(rng.choice([4, 12, 40, 100, 200]))
        text = " ".join(f"word{w}" for w in rng.integers(0, WORDS, length))
        content: list[dict] = [{"type": "text", "text": text}]
        if i % 2 == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": image_url(i)}})
        requests.append(
            dict(
                messages=[{"role": "user", "content": content}],
                max_tokens=int(rng.integers(17, 33)),
                temperature=0.7 if i % 3 == 0 else 0.0,
                seed=i,
                stream=i % 2 == 1,
            )
        )
    return requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: str, server_args: list[str], cache: str, log_path: str):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"), HF_HUB_OFFLINE="1")
    command = [
        sys.executable,
        "-m",
        "llava_jax.serve",
        "--checkpoint",
        model_dir,
        "--port",
        str(port),
        "--model-name",
        "bench",
        *server_args,
        "--compilation-cache",
        cache,
    ]
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process, log, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log.close()
                raise SystemExit(f"the server did not start; see {log_path}") from None
            time.sleep(0.2)


def run_load(url: str, requests: list[dict], clients: int) -> dict:
    """Send `requests` from `clients` threads; latencies, generated tokens, failures."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    lock = threading.Lock()
    pending = list(enumerate(requests))
    latencies, tokens, failures, first_token, per_token = [], [0], [], [], []

    def one(request: dict) -> int:
        if request["stream"]:
            start = time.perf_counter()
            stream = client.chat.completions.create(
                model="bench", stream_options={"include_usage": True}, **request
            )
            usage, first = None, None
            for chunk in stream:
                usage = chunk.usage or usage
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
            end = time.perf_counter()
            if first is not None:
                with lock:
                    first_token.append(first - start)
                    if usage.completion_tokens > 1:
                        per_token.append((end - first) / (usage.completion_tokens - 1))
            return usage.completion_tokens
        return client.chat.completions.create(model="bench", **request).usage.completion_tokens

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                i, request = pending.pop(0)
            start = time.perf_counter()
            try:
                generated = one(request)
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(f"request {i}: {type(err).__name__}: {err}")
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += generated

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        stats = json.load(response)

    def percentile(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    return {
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "tokens_per_s": tokens[0] / elapsed,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(first_token, 50),
        "ttft_p99_s": percentile(first_token, 99),
        "tpot_p50_ms": 1000 * percentile(per_token, 50),
        "tpot_p99_ms": 1000 * percentile(per_token, 99),
        "failed": len(failures),
        "failures": failures[:5],
        "together": stats.get("largest_batch", stats.get("most_slots_in_use")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-slots", type=int, default=8)
    args = parser.parse_args()
    requests = workload(args.requests)
    # The longest prompt (200 words, the template, an image: under 256 tokens) and answer.
    slot_cache = 256 + 32
    servers = {
        f"slots {args.max_slots}": [
            "--engine", "slots", "--max-slots", str(args.max_slots),
            "--slot-cache-length", str(slot_cache),
        ],
        f"batch {args.max_batch}": ["--max-batch", str(args.max_batch)],
        "batch 1 (off)": ["--max-batch", "1"],
    }  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model(model_dir)
        cache = os.path.join(tmp, "xla_cache")
        for i, (name, server_args) in enumerate(servers.items()):
            log_path = os.path.join(tmp, f"serve_{i}.log")
            process, log, url = start_server(model_dir, server_args, cache, log_path)
            try:
                for _ in range(2):  # warm-up: compiles the shapes the batches take
                    run_load(url, requests, args.clients)
                results[name] = run_load(url, requests, args.clients)
            finally:
                process.terminate()
                process.wait(timeout=30)
                log.close()
    print(
        f"{args.requests} requests from {args.clients} clients (mixed prompt lengths, half "
        f"streamed, half with an image), {os.cpu_count()} CPUs"
    )
    print(
        f"{'server':<16}{'req/s':>7}{'tok/s':>8}{'p50 s':>7}{'p99 s':>7}{'TTFT p50':>9}"
        f"{'p99':>6}{'TPOT p50 ms':>12}{'p99':>7}{'failed':>7}{'together':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:<16}{r['requests_per_s']:>7.2f}{r['tokens_per_s']:>8.1f}{r['p50_s']:>7.2f}"
            f"{r['p99_s']:>7.2f}{r['ttft_p50_s']:>9.2f}{r['ttft_p99_s']:>6.2f}"
            f"{r['tpot_p50_ms']:>12.1f}{r['tpot_p99_ms']:>7.1f}{r['failed']:>7}"
            f"{r['together']:>9}"
        )
        for failure in r["failures"]:
            print(f"  {failure}")
    off = results["batch 1 (off)"]
    for name, r in results.items():
        if r is not off:
            print(
                f"{name} / off: {r['requests_per_s'] / off['requests_per_s']:.2f}x requests/s, "
                f"{r['tokens_per_s'] / off['tokens_per_s']:.2f}x tokens/s"
            )
    slots, batch = results[f"slots {args.max_slots}"], results[f"batch {args.max_batch}"]
    print(f"slots / batch: {slots['requests_per_s'] / batch['requests_per_s']:.2f}x requests/s")
    return 1 if any(r["failed"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
