"""Prepare a dataset's array_record shards (and print the validation report).

    python -m llava_jax.data.prepare --source synthetic --data_dir ~/tensorflow_datasets
    python -m llava_jax.data.prepare --source llava_json --json_path llava_v1_5_mix665k.json \
        --image_dir ./images --data_dir ~/tensorflow_datasets --on_bad_record skip

Progress bars (rate and ETA) come from the image check and from TFDS's writer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from llava_jax.data import datasets
from llava_jax.data.config import DataConfig
from llava_jax.data.datasets.llava_json import REPORT_FILE, BadRecordsError
from llava_jax.data.pipeline import tokenizer_for


def parse_args(argv: list[str]) -> DataConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = DataConfig()
    for field in dataclasses.fields(DataConfig):
        if field.name.startswith(("source", "data_dir", "json_path", "test_json_path")) or (
            field.name in ("image_dir", "dataset_name", "on_bad_record", "tokenizer_path")
            or field.name.startswith("synthetic_")
        ):
            default = getattr(defaults, field.name)
            kind = type(default) if default is not None else str
            parser.add_argument(f"--{field.name}", type=kind, default=default)
    args = parser.parse_args(argv)
    return dataclasses.replace(defaults, **vars(args))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        builder = datasets.prepare(config)
    except BadRecordsError as error:
        print(error, file=sys.stderr)
        return 1
    for split, info in builder.info.splits.items():
        print(f"{split}: {info.num_examples} records")
    report_path = os.path.join(builder.data_dir, REPORT_FILE)
    if os.path.exists(report_path):
        with open(report_path) as file:
            print(json.dumps(json.load(file), indent=2))
    if config.source == "synthetic" or config.tokenizer_path:
        loaded = tokenizer_for(config)
        print(f"tokenizer: vocabulary {loaded.vocab_size}, image token {loaded.image_token_id}")
    print(f"prepared in {builder.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
