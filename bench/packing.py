"""Benchmark: real (non-padding) tokens per second of the jitted train step with padded,
modality-length grouped and packed batches, the same model, max length and rows per step.

The conversations are synthetic but shaped like LLaVA-1.5's finetuning mix
(llava_v1_5_mix665k): most records are one image with short question-answer turns
(VQAv2, GQA, OCR-VQA, TextCaps, RefCOCO: a few dozen to a few hundred text tokens), a
minority are long multi-turn conversations (LLaVA-Instruct), and ~6% are text-only
ShareGPT chats, the longest of all. So the text part of a conversation is drawn from a
log-normal (long right tail):

    image conversations (94%): one image (64 image tokens here; 576 in LLaVA-1.5) and
                               text ~ LogNormal(median 100 tokens, sigma 0.9)
    text-only (6%):            text ~ LogNormal(median 400 tokens, sigma 0.8)
    every conversation clipped to max_len (1024 here; 2048 in LLaVA-1.5)

which gives a mean conversation of ~22% of max_len (under a third: the issue's condition),
a median of ~16% and a tail reaching max_len. Each answer's words are random words of the
synthetic vocabulary (one token each), so lengths are exact.

For each batching the same train step runs (`llava_jax.train.step`, AdamW, every tower
trainable, float32), first `--warmup` steps untimed (compilation), then `--steps` timed
steps on the batches that follow; real tokens/s = (tokens that are not padding) / time,
padding fraction = padding / (rows x max_len). Rows per step are the same for all three.
Grouped batches are padded to max_len like the others (this framework's shapes are
static): grouping alone changes which conversations share a step, not the step's cost.

    python bench/packing.py [--steps 6] [--batch 8] [--max-len 1024]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

IMAGE_SIZE, PATCH = 64, 8  # 64 image tokens


def image_png(rng: np.random.Generator) -> bytes:
    from PIL import Image

    pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def conversation(
    rng: np.random.Generator, words: list[str], text_tokens: int, image: bool
) -> list[dict]:
    """Turns of ~`text_tokens` tokens: a short question, an answer of random `words` each
    (words of the synthetic vocabulary: one token each)."""
    turns, left = [], text_tokens
    first = True
    while left > 0 or not turns:
        question = " ".join(rng.choice(words, 6))
        answer_length = int(min(max(left - 12, 2), rng.integers(20, 200)))
        answer = " ".join(rng.choice(words, answer_length))
        if image and first:
            question = "<image>\n" + question
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        left -= answer_length + 20  # the question and the template's words
        first = False
    return turns


def make_records(count: int, seed: int, max_len: int, words: list[str]) -> list[dict]:
    rng = np.random.default_rng(seed)
    images = [image_png(rng) for _ in range(16)]
    records = []
    for index in range(count):
        text_only = rng.random() < 0.06
        median, sigma = (400, 0.8) if text_only else (100, 0.9)
        text = int(min(rng.lognormal(np.log(median), sigma), max_len - 100))
        record = {
            "id": f"bench-{index:06d}",
            "image_bytes": [] if text_only else [images[index % len(images)]],
            "image_paths": [],
            "conversations": json.dumps(conversation(rng, words, max(text, 16), not text_only)),
        }
        records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per batching")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--records", type=int, default=2000)
    args = parser.parse_args()

    import jax

    from llava_jax.data.pipeline import (
        length_table,
        make_train_iterator,
        to_global_batch,
        tokenizer_for,
    )
    from llava_jax.models.inputs import ImageGeometry
    from llava_jax.program import skip_absent_accelerators
    from llava_jax.sharding import make_mesh
    from llava_jax.train.config import RunConfig, base_config
    from llava_jax.train.state import init_train_state
    from llava_jax.train.step import jit_train_step, make_train_step, metrics_to_host
    from llava_jax.train.trainer import initial_model, make_run_setup

    skip_absent_accelerators()
    with tempfile.TemporaryDirectory() as data_dir:
        config = base_config()
        model = config.model
        model.vision.update(
            hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH,
        )  # fmt: skip
        model.text.update(
            vocab_size=128, hidden_size=256, intermediate_size=688, num_layers=4,
            num_heads=4, num_kv_heads=2, max_position_embeddings=args.max_len,
        )  # fmt: skip
        model.vision_feature_layer = -1
        config.data.update(
            data_dir=data_dir, max_len=args.max_len, global_batch_size=args.batch,
            max_images_per_row=8, seed=0,
        )  # fmt: skip
        config.train.update(train_pattern=".*", loss_chunk_size=128)
        run = RunConfig.from_config(config)
        tokenizer = tokenizer_for(run.data)
        model_config, params = initial_model(run, tokenizer)
        data, geometry = run.data, ImageGeometry.of(model_config)
        words = sorted(w for w in tokenizer.tokenizer.get_vocab() if w.isalpha() and w.islower())
        records = make_records(args.records, 0, args.max_len, words)
        table = length_table(data, geometry, tokenizer, records)
        kept = table.lengths[table.lengths > 0]
        print(
            f"jax {jax.__version__} on {jax.default_backend()}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"{len(records)} conversations: mean {kept.mean():.0f} tokens "
            f"({kept.mean() / args.max_len:.0%} of max_len {args.max_len}), median "
            f"{np.median(kept):.0f}, p90 {np.percentile(kept, 90):.0f}, max {kept.max()}; "
            f"{(table.num_images == 0).mean():.0%} text-only; "
            f"{args.batch} rows per step; {(table.lengths == 0).sum()} dropped"
        )
        mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
        setup, schedule = make_run_setup(run, model_config, 1000, mesh=mesh)
        step = jit_train_step(setup, make_train_step(setup, schedule), args.batch)
        batchings = {
            "padded": {},
            "grouped": {"group_by_modality_length": True},
            "packed": {"packing": True},
        }
        results = {}
        for name, settings in batchings.items():
            iterator = make_train_iterator(
                dataclasses.replace(data, **settings), geometry, tokenizer, 0, 1, source=records
            )
            state = init_train_state(setup, jax.random.key(0), params)
            real = conversations = 0
            padding = []
            for index in range(args.warmup + args.steps):
                local = next(iterator)
                if index == args.warmup:
                    jax.block_until_ready(state)
                    start = time.perf_counter()
                state, metrics = step(state, to_global_batch(local, mesh))
                if index >= args.warmup:
                    host = metrics_to_host(metrics)
                    real += host["tokens"]
                    padding.append(host["padding_fraction"])
                    segments = local["attention_mask"].max(axis=1)
                    conversations += int(segments.sum())
            jax.block_until_ready(state)
            seconds = time.perf_counter() - start
            iterator.close()
            results[name] = (real / seconds, float(np.mean(padding)), conversations / seconds)
        print(
            f"{'batching':<8} {'real tok/s':>10} {'vs padded':>9} {'padding':>8} "
            f"{'conversations/s':>15}"
        )
        for name, (rate, padding, per_second) in results.items():
            print(
                f"{name:<8} {rate:>10.0f} {rate / results['padded'][0]:>8.2f}x "
                f"{padding:>8.1%} {per_second:>15.1f}"
            )


if __name__ == "__main__":
    main()
