"""Benchmark (not a test): data pipeline throughput, examples per second per core.

336-pixel images (``pad``, CLIP normalisation) from COCO-sized JPEGs (640x480) with
multi-turn ``vicuna_v1`` conversations, tokenized by a LLaMA-style (Metaspace BPE)
tokenizer built locally. Measures:

1. one core: records from the prepared array_record split -> fixed-shape examples,
   in this process, one thread;
2. the whole grain pipeline (read, shuffle, ``num_workers`` processes, batch).

    python bench/data_pipeline.py [--records 256] [--workers 2] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from llava_jax.data import datasets
from llava_jax.data.config import DataConfig
from llava_jax.data.encode import ExampleEncoder
from llava_jax.data.pipeline import make_train_iterator
from llava_jax.data.tokenizer import prepare_tokenizer
from llava_jax.models.inputs import ImageGeometry

WORDS = [
    "the",
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "street",
    "car",
    "red",
    "blue",
    "green",
    "table",
    "picture",
    "image",
    "shows",
    "is",
    "are",
    "on",
    "in",
    "of",
    "with",
    "near",
    "sitting",
    "standing",
    "holding",
    "white",
    "black",
    "large",
    "small",
    "two",
    "three",
    "there",
    "what",
    "where",
    "how",
    "many",
    "color",
    "doing",
    "background",
    "left",
    "right",
    "top",
    "person",
    "people",
    "building",
]


def sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n)).capitalize() + "."


def write_dataset(root: str, count: int, rng: np.random.Generator) -> str:
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    records = []
    for index in tqdm(range(count), desc="Writing JPEGs", unit="img"):
        # smooth gradient + noise: compresses like a photo, not like a flat colour
        y, x = np.mgrid[0:480, 0:640]
        base = np.stack([x * 0.3, y * 0.4, (x + y) * 0.2], axis=-1) + rng.integers(0, 255, 3)
        noise = rng.normal(0, 20, size=(480, 640, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "images", f"{index}.jpg"), quality=90)
        turns = []
        for turn in range(int(rng.integers(2, 6))):
            question = ("<image>\n" if turn == 0 else "") + sentence(rng, 10)[:-1] + "?"
            turns += [
                {"from": "human", "value": question},
                {"from": "gpt", "value": " ".join(sentence(rng, 12) for _ in range(3))},
            ]
        records.append({"id": str(index), "image": f"{index}.jpg", "conversations": turns})
    path = os.path.join(root, "records.json")
    with open(path, "w") as file:
        json.dump(records, file)
    return path


def llama_like_tokenizer(rng: np.random.Generator):
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [sentence(rng, 20) for _ in range(2000)] + ["USER: ASSISTANT: A chat between"]
    tokenizer.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return prepare_tokenizer(
        PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        json_path = write_dataset(root, args.records, rng)
        config = DataConfig(
            source="llava_json",
            json_path=json_path,
            image_dir=os.path.join(root, "images"),
            data_dir=os.path.join(root, "tfds"),
            template="vicuna_v1",
            max_len=2048,
            global_batch_size=16,
            num_workers=args.workers,
        )
        geometry = ImageGeometry.square(336, 576)  # LLaVA-1.5's CLIP ViT-L/14-336
        source = datasets.open_split(config, "train")
        tokenizer = llama_like_tokenizer(rng)
        encoder = ExampleEncoder(config, geometry, tokenizer)

        stored = [source[i] for i in range(min(len(source), 64))]
        for record in stored[:8]:  # warm up
            encoder(record)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 10.0:
            for record in stored:
                assert encoder(record)["drop_reason"] == ""
                count += 1
        one_core = count / (time.perf_counter() - start)
        print(f"one core (preprocess only): {one_core:.0f} examples/s")

        iterator = make_train_iterator(config, geometry, tokenizer, 0, 1)
        next(iterator)  # start the workers
        start = time.perf_counter()
        for _ in range(args.batches):
            next(iterator)
        elapsed = time.perf_counter() - start
        iterator.close()
        rate = args.batches * config.global_batch_size / elapsed
        print(
            f"full pipeline, {args.workers} workers: {rate:.0f} examples/s "
            f"({rate / max(args.workers, 1):.0f} examples/s per worker core)"
        )


if __name__ == "__main__":
    main()
