"""Benchmark: tokens per second of `Engine.generate` beside transformers' `generate`.

Both run the same tiny random LLaVA (LLaMA: hidden 256, 4 layers, 32000-token vocabulary;
a small CLIP on one 28px image per prompt), float32, greedy, exactly `--new-tokens` new
tokens (no eos), on prompts of different lengths, left-padded. Compile time and the first
transformers call are excluded: each side is warmed up once before timing.

    python bench/generate.py [--new-tokens 64] [--batch-sizes 1,8] [--repeats 5]
                             [--torch-threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np


def build_model(directory: str):
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vocab = 32000
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        ),
        image_token_index=vocab - 1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    return config, model


def make_batch(batch_size: int, image_token: int, seed: int = 0):
    """Prompts of 24..24+7*(B-1) tokens, each with one image (4 image tokens)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for b in range(batch_size):
        prompt = rng.integers(1, image_token, 24 + 7 * b).astype(np.int32)
        prompt[1:5] = image_token
        prompts.append(prompt)
    images = rng.standard_normal((batch_size, 1, 28, 28, 3)).astype(np.float32)
    return prompts, images


def time_it(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--torch-threads",
        default="0,1",
        help="torch thread counts to time transformers with (0: torch's default); the ratio "
        "is against the fastest. On a busy machine torch's default can be far slower.",
    )
    args = parser.parse_args()

    import jax
    import torch

    from llava_jax.convert import load_hf
    from llava_jax.inference import Engine, SamplingConfig

    default_threads = torch.get_num_threads()
    thread_counts = [int(n) or default_threads for n in args.torch_threads.split(",")]

    with tempfile.TemporaryDirectory() as directory:
        hf_config, hf_model = build_model(directory)
        config, params = load_hf(directory)
    engine = Engine(config)
    params = engine.place(params)
    image_token = hf_config.image_token_index
    hf_model.generation_config.pad_token_id = 0
    hf_model.generation_config.eos_token_id = None
    new = args.new_tokens
    sampling = SamplingConfig(max_new_tokens=new)

    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        f"torch {torch.__version__} (default {default_threads} threads); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} (other processes slow both sides)"
    )
    print(
        f"model: LLaMA hidden 256 x 4 layers, vocab 32000, float32; {new} new tokens, greedy; "
        f"median of {args.repeats}; compile time and warm-up excluded"
    )
    hf_columns = "".join(f" {f'transformers({n} thr)':>19}" for n in thread_counts)
    print(f"{'batch':>5} {'llava_jax tok/s':>16}{hf_columns} {'ratio vs best':>14}")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        prompts, images = make_batch(batch_size, image_token)

        def ours(prompts=prompts, images=images):
            result = engine.generate(params, prompts, images, sampling=sampling)
            assert all(len(t) == new for t in result.tokens)
            return result

        length = max(len(p) for p in prompts)
        ids = np.zeros((batch_size, length), np.int64)
        mask = np.zeros((batch_size, length), np.int64)
        for b, p in enumerate(prompts):
            ids[b, length - len(p) :] = p
            mask[b, length - len(p) :] = 1
        pixel_values = torch.tensor(images[:, 0].transpose(0, 3, 1, 2))

        def theirs(ids=ids, mask=mask, pixel_values=pixel_values, length=length):
            with torch.no_grad():
                out = hf_model.generate(
                    input_ids=torch.tensor(ids),
                    attention_mask=torch.tensor(mask),
                    pixel_values=pixel_values,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                )
            assert out.shape[1] == length + new
            return out

        start = time.perf_counter()
        ours()  # compiles the prefill and the decode loop for this shape
        compile_s = time.perf_counter() - start
        theirs()
        # Interleaved, so a busy machine slows every side alike; medians.
        ours_times, theirs_times = [], {n: [] for n in thread_counts}
        for _ in range(args.repeats):
            ours_times.append(time_it(ours))
            for n in thread_counts:
                torch.set_num_threads(n)
                theirs_times[n].append(time_it(theirs))
        torch.set_num_threads(default_threads)
        ours_tps = batch_size * new / statistics.median(ours_times)
        theirs_tps = [batch_size * new / statistics.median(theirs_times[n]) for n in thread_counts]
        columns = "".join(f" {tps:>19.1f}" for tps in theirs_tps)
        print(
            f"{batch_size:>5} {ours_tps:>16.1f}{columns} {ours_tps / max(theirs_tps):>13.1f}x"
            f"   (first llava_jax call incl. compile: {compile_s:.1f} s)"
        )


if __name__ == "__main__":
    main()
