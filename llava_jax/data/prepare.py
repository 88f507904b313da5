"""Prepare a dataset's array_record shards (and print the validation report).

    python -m llava_jax.data.prepare --source synthetic --data_dir ~/tensorflow_datasets
    python -m llava_jax.data.prepare --source llava_json --json_path llava_v1_5_mix665k.json \
        --image_dir ./images --data_dir ~/tensorflow_datasets --on_bad_record skip

Progress bars (rate and ETA) come from the image check and from TFDS's writer.

A LLaVA JSON is prepared into a directory keyed by what its records are made from (see
`llava_jax/data/datasets/__init__.py`); preparing the same data again reuses it. Bad records
under `--on_bad_record error`: the report, exit status 1. Anything else the user can fix (a
file that cannot be read or parsed, a setting, a `--dataset_name` directory made from other
data): one line, `error: …`, exit status 2 (`--debug`: the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from llava_jax import program
from llava_jax.data import datasets
from llava_jax.data.config import DataConfig
from llava_jax.data.datasets.llava_json import REPORT_FILE, BadRecordsError
from llava_jax.data.pipeline import tokenizer_for
from llava_jax.errors import InputError


def parse_args(argv: list[str]) -> tuple[DataConfig, bool]:
    """The data settings the flags give, and whether `--debug` was given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    program.add_debug_argument(parser)
    defaults = DataConfig()
    for field in dataclasses.fields(DataConfig):
        if field.name.startswith(("source", "data_dir", "json_path", "test_json_path")) or (
            field.name in ("image_dir", "dataset_name", "on_bad_record", "tokenizer_path")
            or field.name.startswith("synthetic_")
        ):
            default = getattr(defaults, field.name)
            kind = type(default) if default is not None else str
            parser.add_argument(f"--{field.name}", type=kind, default=default)
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug")
    try:
        return dataclasses.replace(defaults, **args), debug
    except ValueError as error:  # a setting DataConfig refuses; it names the field
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    config, debug = parse_args(sys.argv[1:] if argv is None else argv)
    program.setup_logging()  # warnings on the terminal, without the routine ones
    try:
        builder = datasets.prepare(config)
    except BadRecordsError as error:
        print(error, file=sys.stderr)
        return 1
    except (InputError, ValueError) as error:
        if debug:
            raise
        program.report_error(error)
        return program.EXIT_INPUT_ERROR
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
