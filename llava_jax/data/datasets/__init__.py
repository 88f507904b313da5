"""TFDS builders writing array_record shards without TensorFlow: ``llava_json`` and
``synthetic``. Both store the same record (see ``record.py``).

``builder_for(config)`` picks and configures the builder from the data config;
``open_split(config, split)`` returns a random-access source (prepared on first use).
"""

from __future__ import annotations

import os
import re

import tensorflow_datasets as tfds

from llava_jax.data.datasets.llava_json import LlavaJson, LlavaJsonConfig
from llava_jax.data.datasets.synthetic import Synthetic, SyntheticConfig

SOURCES = ("synthetic", "llava_json")


def _data_dir(config) -> str:
    return os.path.expanduser(str(config.data_dir))


def builder_for(config) -> tfds.core.GeneratorBasedBuilder:
    """The configured (not necessarily prepared) builder for ``config.source``."""
    if config.source == "synthetic":
        builder_config = SyntheticConfig(
            style=config.synthetic_style,
            image_size=config.synthetic_image_size,
            num_train=config.synthetic_num_train,
            num_test=config.synthetic_num_test,
            seed=config.synthetic_seed,
        )
        return Synthetic(
            config=builder_config, data_dir=_data_dir(config), file_format="array_record"
        )
    if config.source == "llava_json":
        if not config.json_path or not config.image_dir:
            raise ValueError("source 'llava_json' needs json_path and image_dir")
        stem = os.path.splitext(os.path.basename(str(config.json_path)))[0]
        name = config.dataset_name or re.sub(r"[^A-Za-z0-9_]+", "_", stem).lower()
        builder_config = LlavaJsonConfig(
            name=name,
            json_path=str(config.json_path),
            image_dir=str(config.image_dir),
            test_json_path=config.test_json_path,
            on_bad_record=config.on_bad_record,
        )
        return LlavaJson(
            config=builder_config, data_dir=_data_dir(config), file_format="array_record"
        )
    raise ValueError(f"Unknown data source {config.source!r}; choose from {SOURCES}")


def prepare(config) -> tfds.core.GeneratorBasedBuilder:
    """Writes the array_record shards if they are not there yet; returns the builder."""
    builder = builder_for(config)
    builder.download_and_prepare(
        # everything is local: never look for a pre-built copy on GCS
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder


def has_split(config, split: str) -> bool:
    """Whether the source has `split`: the synthetic data has 'train' and 'test'; a LLaVA
    JSON has 'test' only with `test_json_path`."""
    if split == "train":
        return True
    return split == "test" and (config.source == "synthetic" or bool(config.test_json_path))


def open_split(config, split: str):
    """A random-access source (``len``, ``[i]`` -> stored record dict) for ``split``."""
    builder = builder_for(config)
    if not builder.is_prepared():
        builder = prepare(config)
    return builder.as_data_source(split=split)
