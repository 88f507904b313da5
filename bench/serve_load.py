"""Benchmark: `python -m llava_jax.serve` under load: continuous batching, batching, and off.

Builds a small random LLaVA (transformers, saved with `save_pretrained`, with a word-level
tokenizer; LLaVA-1.5's image geometry: 336 px, 576 image tokens), starts the server on it
five times — `--engine slots --max-slots 16` (continuous batching; chunked prefill with its
image and prefix caches, without the caches, and with whole prompts), `--max-batch 16`
(requests arriving together decode as one batch) and `--max-batch 1` (batching off) — and
each time sends `--requests` chat completions from `--clients` concurrent clients (the
official `openai` client): prompts of mixed lengths (4 to 200 words; half of them with an
image, so 600 to 850 tokens), half streamed, greedy and sampled, answers of mixed lengths
(`max_tokens` 16, 32, 64, 128 or 256). Each workload runs twice (`--warm-ups`) untimed first, so
compilation is not measured (the servers share a compilation cache; the warm-ups use other
prompts and images, so the timed load finds nothing of its own in the slot server's
caches). Prints requests/s, generated tokens/s, p50/p99 latency, time to first token and
time per output token (streamed requests: each one's mean gap between its tokens) beside a
lone request's, failed requests for each server, and the ratios against batching off and
the batcher. Then a LLaVA-Bench-shaped load (6 questions on each of 10 images, the
template's system prompt) with the slot server's caches on and off and their hit rates;
four streamed answers disturbed by one prompt of `--long-words` words (the gaps between
their tokens, chunked prefill and whole); and open-loop Poisson arrivals at `--rates`.

    python bench/serve_load.py [--requests 64] [--clients 16] [--max-batch 16] \
        [--max-slots 16] [--rates 2,4,8] [--long-words 2000] [--model quick|default]
"""

from __future__ import annotations

import argparse
import base64
import io
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


def build_model(directory: str, shape: str = "quick") -> None:
    """A small LLaVA (CLIP 336 px, 576 image tokens, as LLaVA-1.5; a LLaMA of
    bench/generate.py's `shape`: "quick", hidden 256 x 4 layers, ~25M parameters, or
    "default", hidden 768 x 8 layers, ~100M; 32000-token vocabulary, context 4096) with a
    word-level tokenizer of VOCAB ids, `<image>` the last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    build_llava(directory, GENERATE_MODELS[shape], image_size=336, context=4096)
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
    other one streamed, a third sampled, answers of mixed lengths (16..256 tokens)."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(count):
        length = int(rng.choice([4, 12, 40, 100, 200]))
        text = " ".join(f"word{w}" for w in rng.integers(0, WORDS, length))
        content: list[dict] = [{"type": "text", "text": text}]
        if i % 2 == 0:
            url = image_url(seed * 100_000 + i)  # another load, other images
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        requests.append(
            dict(
                messages=[{"role": "user", "content": content}],
                max_tokens=int(rng.choice([16, 32, 64, 128, 256])),
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


def run_load(
    url: str,
    requests: list[dict],
    clients: int = 16,
    arrivals: list[float] | None = None,
) -> dict:
    """Send `requests` from `clients` threads (closed loop), or each at its time in
    `arrivals` (seconds from the start: open loop); latencies, tokens, failures, time to
    first token and the gaps between streamed tokens."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    lock = threading.Lock()
    latencies, tokens, failures, first_token, per_token = [], [0], [], [], []

    def one(i: int, request: dict) -> None:
        start = time.perf_counter()
        try:
            if request["stream"]:
                stream = client.chat.completions.create(
                    model="bench", stream_options={"include_usage": True}, **request
                )
                usage, times = None, []
                for chunk in stream:
                    usage = chunk.usage or usage
                    if chunk.choices and chunk.choices[0].delta.content:
                        times.append(time.perf_counter())
                generated = usage.completion_tokens
            else:
                generated = client.chat.completions.create(
                    model="bench", **request
                ).usage.completion_tokens
                times = []
        except Exception as err:  # noqa: BLE001 - counted and reported
            with lock:
                failures.append(f"request {i}: {type(err).__name__}: {err}")
            return
        with lock:
            latencies.append(time.perf_counter() - start)
            tokens[0] += generated
            if times:
                first_token.append(times[0] - start)
                if generated > 1:  # the request's mean time between its tokens
                    per_token.append((times[-1] - times[0]) / (generated - 1))

    start = time.perf_counter()
    if arrivals is None:
        pending = list(enumerate(requests))

        def worker() -> None:
            while True:
                with lock:
                    if not pending:
                        return
                    i, request = pending.pop(0)
                one(i, request)

        threads = [threading.Thread(target=worker) for _ in range(clients)]
    else:

        def at(i: int, when: float) -> None:
            time.sleep(max(0.0, start + when - time.perf_counter()))
            one(i, requests[i])

        threads = [threading.Thread(target=at, args=(i, t)) for i, t in enumerate(arrivals)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start

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
    }


def scrape(url: str) -> dict[str, float]:
    """`/metrics` as {sample: value} (the slot server's cache lookups among them)."""
    out = {}
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
    return out


def hit_rate(before: dict, after: dict, cache: str) -> float:
    name = f"llava_jax_{cache}_cache_lookups_total"
    hits, misses = (
        after.get(f'{name}{{result="{r}"}}', 0) - before.get(f'{name}{{result="{r}"}}', 0)
        for r in ("hits", "misses")
    )
    return hits / (hits + misses) if hits + misses else float("nan")


def bench_like(images: int = 10, questions: int = 6, seed: int = 1) -> list[dict]:
    """LLaVA-Bench's shape: `questions` questions (12-40 words) about each of `images`
    images, all with the template's system prompt, interleaved as clients send them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(questions):
        for i in range(images):
            text = " ".join(f"word{w}" for w in rng.integers(0, WORDS, int(rng.integers(12, 41))))
            content = [
                {"type": "image_url", "image_url": {"url": image_url(seed * 100_000 + i)}},
                {"type": "text", "text": text},
            ]
            out.append(
                dict(
                    messages=[{"role": "user", "content": content}],
                    max_tokens=int(rng.integers(24, 33)),
                    temperature=0.0,
                    stream=True,
                )
            )
    return out


def interference(url: str, long_words: int) -> dict:
    """Four streamed answers of 96 tokens; after their first tokens, one prompt of
    `long_words` words (1 token to answer). Their gaps between tokens: p50 and p99."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    gaps, started, lock = [], threading.Barrier(5), threading.Lock()

    def answer(i: int) -> None:
        stream = client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": f"word{i} word{i + 1}"}],
            max_tokens=96,
            temperature=0.0,
            stream=True,
        )
        times = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter())
                if len(times) == 1:
                    started.wait()
        with lock:
            gaps.extend(np.diff(times).tolist())

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    if long_words:
        started.wait()
        text = " ".join(f"word{w % WORDS}" for w in range(long_words))
        client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": text}],
            max_tokens=1,
        )
    else:
        started.wait()
    for thread in threads:
        thread.join()
    return {
        "gap_p50_ms": 1000 * float(np.percentile(gaps, 50)),
        "gap_p99_ms": 1000 * float(np.percentile(gaps, 99)),
        "gap_max_ms": 1000 * float(np.max(gaps)),
    }


def poisson(count: int, rate: float, seed: int = 2) -> list[float]:
    """`count` arrival times of a Poisson process of `rate` requests/s."""
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, count)).tolist()


def table(title: str, results: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(
        f"{'server':<26}{'req/s':>7}{'tok/s':>8}{'p50 s':>7}{'p99 s':>7}{'TTFT p50':>9}"
        f"{'p99':>6}{'TPOT p50 ms':>12}{'p99':>7}{'failed':>7}"
    )
    for name, r in results.items():
        print(
            f"{name:<26}{r['requests_per_s']:>7.2f}{r['tokens_per_s']:>8.1f}{r['p50_s']:>7.2f}"
            f"{r['p99_s']:>7.2f}{r['ttft_p50_s']:>9.2f}{r['ttft_p99_s']:>6.2f}"
            f"{r['tpot_p50_ms']:>12.1f}{r['tpot_p99_ms']:>7.1f}{r['failed']:>7}"
        )
        for failure in r["failures"]:
            print(f"  {failure}")


def compare(results: dict[str, dict], batch: str) -> None:
    """Each server's requests/s against batching off, and the slot servers' against the
    batcher's."""
    off = results.get("batch 1 (off)")
    for name, r in results.items() if off else ():
        print(f"  {name} / off: {r['requests_per_s'] / off['requests_per_s']:.2f}x requests/s")
    for name in (n for n in results if n.startswith("slots") and batch in results):
        ratio = results[name]["requests_per_s"] / results[batch]["requests_per_s"]
        print(f"  {name} / {batch}: {ratio:.2f}x requests/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-slots", type=int, default=16)
    parser.add_argument("--rates", default="2,4,8", help="open-loop request rates, per s")
    parser.add_argument("--long-words", type=int, default=2000, help="the long prompt's words")
    parser.add_argument(
        "--prefill-budget", type=int, default=256, help="the chunked slot servers' --prefill-budget"
    )
    parser.add_argument(
        "--warm-ups", type=int, default=2, help="untimed runs of the mixed load first"
    )
    parser.add_argument(
        "--model",
        choices=sorted(GENERATE_MODELS),
        default="quick",
        help="the decoder's shape (bench/generate.py): quick ~25M parameters, default ~100M",
    )
    parser.add_argument(
        "--servers", default="", help="only these servers, by name prefix, comma-separated"
    )
    args = parser.parse_args()
    # Warm-ups compile with loads of other prompts and images, so the timed loads find
    # nothing of theirs in the slot server's caches.
    requests, warm_up = workload(args.requests), workload(args.requests, seed=7)
    shaped, shaped_warm_up = bench_like(), bench_like(images=2, questions=5, seed=8)
    alone = {**workload(2, seed=9)[1], "max_tokens": 128}  # streamed, greedy, no image
    rates = [float(r) for r in args.rates.split(",") if r]
    slots = ["--engine", "slots", "--max-slots", str(args.max_slots)]
    # The long prompt's bucket (2048) and its one token; the mixed load's longest prompt
    # (an image, 200 words, the template: bucket 1024) and answer (256) fit as well.
    slots += ["--slot-cache-length", "2112", "--kv-cache-gib", "1"]
    chunked = [*slots, "--prefill-chunk", "64", "--prefill-budget", str(args.prefill_budget)]
    servers = {
        "slots (chunk 64, caches)": chunked,
        "slots (chunk 64, no caches)": [
            *chunked, "--image-cache-gib", "0", "--prefix-cache-gib", "0",
        ],
        "slots (whole prompts)": slots,
        f"batch {args.max_batch}": ["--max-batch", str(args.max_batch)],
        "batch 1 (off)": ["--max-batch", "1"],
    }  # fmt: skip
    if args.servers:
        wanted = args.servers.split(",")
        servers = {n: a for n, a in servers.items() if any(n.startswith(w) for w in wanted)}
    closed, opened, shaped_runs, hits, disturbed, lone = {}, {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model(model_dir, args.model)
        cache = os.path.join(tmp, "xla_cache")
        for i, (name, server_args) in enumerate(servers.items()):
            log_path = os.path.join(tmp, f"serve_{i}.log")
            process, log, url = start_server(model_dir, server_args, cache, log_path)
            try:
                for _ in range(args.warm_ups):  # compiles the shapes the load takes
                    run_load(url, warm_up, args.clients)
                lone[name] = run_load(url, [alone], clients=1)
                closed[name] = run_load(url, requests, args.clients)
                run_load(url, shaped_warm_up, args.clients)  # its shapes, not timed
                before = scrape(url)
                shaped_runs[name] = run_load(url, shaped, args.clients)
                after = scrape(url)
                hits[name] = (
                    hit_rate(before, after, "image"),
                    hit_rate(before, after, "prefix"),
                )
                if name.startswith("slots (chunk 64, caches)") or name == "slots (whole prompts)":
                    interference(url, args.long_words)  # compile its shapes, not timed
                    disturbed[name] = (interference(url, 0), interference(url, args.long_words))
                if name != "slots (chunk 64, no caches)":
                    for k, rate in enumerate(rates):  # each rate its own prompts and images
                        load = workload(args.requests, seed=20 + k)
                        opened[(name, rate)] = run_load(
                            url, load, arrivals=poisson(len(load), rate)
                        )
            finally:
                process.terminate()
                process.wait(timeout=30)
                log.close()
    print(
        f"{os.cpu_count()} CPUs; the {args.model} model of bench/generate.py at 336 px; figures "
        f"after {args.warm_ups} untimed runs of the mixed load"
    )
    table(
        f"closed loop: {args.requests} requests from {args.clients} clients (mixed prompt "
        "and answer lengths, half streamed, half with an image)",
        closed,
    )
    compare(closed, f"batch {args.max_batch}")
    for name, r in closed.items():
        alone_ms = lone[name]["tpot_p50_ms"]
        print(
            f"  {name}: a lone request's TPOT {alone_ms:.1f} ms; under load p99 / lone "
            f"{r['tpot_p99_ms'] / alone_ms:.2f}x"
        )
    table(f"LLaVA-Bench-shaped: 10 images x 6 questions from {args.clients} clients", shaped_runs)
    compare(shaped_runs, f"batch {args.max_batch}")
    for name, (image, prefix) in hits.items():
        if not np.isnan(image):
            print(f"  {name}: image cache hit rate {image:.2f}, prefix cache (blocks) {prefix:.2f}")
    cached, uncached = (
        shaped_runs.get("slots (chunk 64, caches)"),
        shaped_runs.get("slots (chunk 64, no caches)"),
    )
    if cached and uncached:
        ratio = uncached["seconds"] / cached["seconds"]
        print(f"  caches on / off: {ratio:.2f}x faster end to end")
    print(f"\nfour streamed answers, then a prompt of {args.long_words} words (their token gaps):")
    for name, (alone, with_long) in disturbed.items():
        print(
            f"  {name}: undisturbed p99 {alone['gap_p99_ms']:.1f} ms, max "
            f"{alone['gap_max_ms']:.1f} ms; with the long prompt p99 "
            f"{with_long['gap_p99_ms']:.1f} ms "
            f"({with_long['gap_p99_ms'] / alone['gap_p99_ms']:.2f}x), max "
            f"{with_long['gap_max_ms']:.1f} ms"
        )
    for rate in rates:
        table(
            f"open loop: Poisson arrivals at {rate:g} requests/s",
            {n: r for (n, q), r in opened.items() if q == rate},
        )
    runs = [*closed.values(), *opened.values(), *shaped_runs.values()]
    return 1 if any(r["failed"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
