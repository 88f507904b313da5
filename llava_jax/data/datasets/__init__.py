"""TFDS builders writing array_record shards without TensorFlow: ``llava_json`` and
``synthetic``. Both store the same record (see ``record.py``).

``builder_for(config)`` picks and configures the builder from the data config;
``open_split(config, split)`` returns a random-access source (prepared on first use).

A LLaVA JSON is prepared into ``data_dir/llava_json/<stem>_<key>/1.0.0``, ``key`` a hash of
what the records are made from (``llava_json.source_of``: each JSON's absolute path and
content hash, the image folder, ``on_bad_record``, ``video_frames`` for a JSON with videos):
other data, or the same file edited, gets its own directory (the earlier ones stay, for the
runs that read them), and unchanged data is reused without preparing again. The length
tables live in the same directory, so they follow. ``config.data.dataset_name`` names the
directory instead (no key); it is reused only for the data it was made from
(``llava_jax_source.json`` beside the shards), and other data is refused naming what changed
(``PreparedDataMismatch``): it is never overwritten, since a run may be reading it.
"""

from __future__ import annotations

import json
import logging
import os
import re

import tensorflow_datasets as tfds

from llava_jax.data.datasets.llava_json import (
    SOURCE_FILE,
    LlavaJson,
    LlavaJsonConfig,
    source_changes,
    source_key,
    source_of,
)
from llava_jax.data.datasets.synthetic import Synthetic, SyntheticConfig
from llava_jax.errors import InputError

SOURCES = ("synthetic", "llava_json")


class PreparedDataMismatch(InputError, ValueError):
    """A prepared dataset (named by `config.data.dataset_name`) was made from other data."""


def _data_dir(config) -> str:
    return os.path.expanduser(str(config.data_dir))


def _stem(config) -> str:
    stem = os.path.splitext(os.path.basename(str(config.json_path)))[0]
    return re.sub(r"[^A-Za-z0-9_]+", "_", stem).lower()


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
        source = source_of(
            str(config.json_path),
            str(config.image_dir),
            config.test_json_path,
            config.on_bad_record,
            config.video_frames,
        )
        name = config.dataset_name or f"{_stem(config)}_{source_key(source)}"
        builder_config = LlavaJsonConfig(
            name=name,
            json_path=str(config.json_path),
            image_dir=str(config.image_dir),
            test_json_path=config.test_json_path,
            on_bad_record=config.on_bad_record,
            source=source,
            video_frames=config.video_frames,
        )
        return LlavaJson(
            config=builder_config, data_dir=_data_dir(config), file_format="array_record"
        )
    raise ValueError(f"Unknown data source {config.source!r}; choose from {SOURCES}")


def is_prepared(builder: tfds.core.GeneratorBasedBuilder) -> bool:
    """`builder.is_prepared()` without its warning for a directory not there yet."""
    return os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))


def check_prepared_source(builder: tfds.core.GeneratorBasedBuilder) -> None:
    """Raises `PreparedDataMismatch` when `builder`'s prepared directory was made from other
    data than its config names (only a `dataset_name` directory can be: a keyed one is
    named by its source); a missing record of the source (a preparation by an earlier
    llava_jax) counts as other data."""
    source = getattr(builder.builder_config, "source", None)
    if source is None or not is_prepared(builder):
        return
    path = os.path.join(builder.data_dir, SOURCE_FILE)
    try:
        with open(path) as file:
            saved = json.load(file)
        changes = source_changes(saved, source)
    except (OSError, ValueError, AttributeError):
        changes = [f"{SOURCE_FILE} is missing or unreadable (prepared by an earlier llava_jax)"]
    if changes:
        raise PreparedDataMismatch(
            f"the prepared dataset {builder.data_dir} (config.data.dataset_name="
            f"{builder.builder_config.name!r}) was made from other data than "
            f"{source['json_path']} with images {source['image_dir']}; "
            + "; ".join(changes)
            + ". Leave config.data.dataset_name unset (each source then gets its own "
            "directory), choose another name, or delete that directory to prepare it again"
        )


def prepare(config) -> tfds.core.GeneratorBasedBuilder:
    """Writes the array_record shards if they are not there yet; returns the builder."""
    builder = builder_for(config)
    check_prepared_source(builder)
    fresh = not is_prepared(builder)
    builder.download_and_prepare(
        # everything is local: never look for a pre-built copy on GCS
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    if fresh and config.source == "llava_json" and not config.dataset_name:
        _note_other_preparations(builder, _stem(config))
    return builder


def _note_other_preparations(builder: tfds.core.GeneratorBasedBuilder, stem: str) -> None:
    """Says where earlier preparations of a file of this name are (other data: another
    folder or an earlier version of the file), so their space can be freed; deletes
    nothing, since a run may be reading them."""
    parent = os.path.dirname(os.path.dirname(builder.data_dir))  # .../llava_json
    mine = os.path.basename(os.path.dirname(builder.data_dir))
    others = sorted(
        os.path.join(parent, name)
        for name in os.listdir(parent)
        if name != mine and re.fullmatch(re.escape(stem) + r"_[0-9a-f]{16}", name)
    )
    if others:
        logging.warning(
            "Prepared %s; %d earlier preparation(s) of a %s from other data remain: %s "
            "(delete those no run reads to free their space)",
            builder.data_dir,
            len(others),
            os.path.basename(str(builder.builder_config.json_path)),
            ", ".join(others),
        )


def describe(config) -> str:
    """The prepared dataset a run reads and what it was made from, in one line."""
    builder = builder_for(config)
    if config.source == "synthetic":
        what = (
            f"synthetic ({config.synthetic_style}, seed {config.synthetic_seed}, "
            f"{config.synthetic_num_train} train / {config.synthetic_num_test} test)"
        )
    else:
        source = builder.builder_config.source
        what = f"llava_json {source['json_path']} (sha256 {source['json_sha256'][:12]})"
        if source["test_json_path"]:
            what += f", test {source['test_json_path']} (sha256 {source['test_json_sha256'][:12]})"
        what += f", images {source['image_dir']}"
        if "video_frames" in source:
            what += f", {source['video_frames']} frames a video"
    return f"{what}, prepared in {builder.data_dir}"


def has_split(config, split: str) -> bool:
    """Whether the source has `split`: the synthetic data has 'train' and 'test'; a LLaVA
    JSON has 'test' only with `test_json_path`."""
    if split == "train":
        return True
    return split == "test" and (config.source == "synthetic" or bool(config.test_json_path))


def open_split(config, split: str):
    """A random-access source (``len``, ``[i]`` -> stored record dict) for ``split``."""
    builder = builder_for(config)
    check_prepared_source(builder)
    if not is_prepared(builder):
        builder = prepare(config)
    return builder.as_data_source(split=split)
