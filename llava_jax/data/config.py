"""The data settings: one typed section of the run config (`config.data`).

Also what inference needs to turn a conversation and an image into model inputs the way the
model was trained: the template and the image settings (size, aspect, mean, std) are these
fields, whichever program reads them. Imports nothing heavy (no grain, no TFDS).
"""

from __future__ import annotations

import dataclasses

from llava_jax.data.conversation import (
    TEMPLATE_VERSION,
    TEMPLATE_VERSIONS,
    Template,
    get_template,
)
from llava_jax.data.image import ASPECT_MODES, CLIP_MEAN, CLIP_STD
from llava_jax.section import Section

SOURCES = ("synthetic", "llava_json")
ON_BAD_RECORD = ("error", "skip")
# First-fit looks at every open row for each conversation, so planning an epoch takes time
# in proportion to the window; rows are as full at a few thousand open rows as at any more
# (100K conversations of 60-1,200 tokens into 2,048: 31,279 rows at 64 open rows, 31,041 at
# 4,096 and at 16,384).
MAX_PACKING_WINDOW = 4096
# Keys a data section held while it copied what the model dictates (models/inputs.py
# ImageGeometry reads them from the model now).
MODEL_DICTATED = ("image_size", "num_image_tokens", "image_grid_pinpoints", "image_patch_size")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """Every setting of the data package (`config.data`).

    What the model dictates of its images (their size, tokens, LLaVA-NeXT's grids) is not
    here: the data functions take it from the model, as `models/inputs.py` `ImageGeometry`.
    """

    source: str = "synthetic"  # synthetic | llava_json
    data_dir: str = "~/tensorflow_datasets"  # where TFDS writes the prepared shards
    json_path: str | None = None  # llava_json: LLaVA JSON list or JSONL (split 'train')
    test_json_path: str | None = None  # llava_json: optional split 'test'
    image_dir: str | None = None  # llava_json: folder the `image` paths are relative to
    # llava_json: the prepared directory's name; default `<json stem>_<hash of the source>`
    # (datasets/__init__.py). A given name is reused only for the data it was made from.
    dataset_name: str | None = None
    on_bad_record: str = "error"  # llava_json: error | skip
    # llava_json: frames sampled uniformly from each `video` record (data/video.py) and
    # stored when preparing (a change prepares again). LLaVA-OneVision's published training
    # used 32 (and LLaVA-Video's up to 64); 8 keeps small runs small.
    video_frames: int = 8
    synthetic_style: str = "instruct"  # caption (stage 1) | instruct (stage 2) | several
    synthetic_image_size: int = 32
    synthetic_num_train: int = 4000
    synthetic_num_test: int = 400
    synthetic_seed: int = 0
    template: str = "vicuna_v1"  # plain|vicuna_v1|llava_llama_2|mistral_instruct|chatml|qwen_1_5
    # The conversation format's version (data/conversation.py TEMPLATE_VERSION): 2, LLaVA's
    # own tokens and targets; 1 only to prompt models trained before (a run config without
    # this key is one of those). Training takes the current version only.
    template_version: int = TEMPLATE_VERSION
    tokenizer_path: str | None = None  # None with 'synthetic': the built-in tokenizer
    image_aspect: str = "pad"  # pad | resize | crop
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    max_images_per_sample: int = 1
    max_len: int = 128
    # Whole conversations packed first-fit into rows of max_len tokens (data/packing.py);
    # global_batch_size then counts rows. Attention stays within each conversation.
    packing: bool = False
    max_images_per_row: int = 4  # packing: image slots of a row
    packing_window: int = 64  # packing: open rows a conversation may go into
    # LLaVA's group_by_modality_length: image and text-only batches, each sorted by length.
    group_by_modality_length: bool = False
    global_batch_size: int = 32
    seed: int = 0
    # How many times the iterator reads the data (None: forever, reshuffled each pass); the
    # run's length is config.train's (num_steps or num_epochs).
    passes: int | None = None
    num_workers: int = 0  # grain worker processes (0: preprocess in this process)
    worker_buffer_size: int = 4  # examples each worker prepares ahead

    def __post_init__(self):
        object.__setattr__(self, "image_mean", tuple(self.image_mean))
        object.__setattr__(self, "image_std", tuple(self.image_std))
        if self.source not in SOURCES:
            raise ValueError(f"config.data.source={self.source!r} is not one of {SOURCES}")
        if self.image_aspect not in ASPECT_MODES:
            raise ValueError(
                f"config.data.image_aspect={self.image_aspect!r} is not one of {ASPECT_MODES}"
            )
        if self.template_version not in TEMPLATE_VERSIONS:
            raise ValueError(
                f"config.data.template_version={self.template_version} is not one of "
                f"{TEMPLATE_VERSIONS}"
            )
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(
                f"config.data.on_bad_record={self.on_bad_record!r} is not one of {ON_BAD_RECORD}"
            )
        if self.packing and self.group_by_modality_length:
            raise ValueError(
                "config.data.packing and config.data.group_by_modality_length are two ways to "
                "cut padding; choose one"
            )
        if self.packing and self.max_images_per_row < self.max_images_per_sample:
            raise ValueError(
                f"config.data.max_images_per_row={self.max_images_per_row} is less than "
                f"max_images_per_sample={self.max_images_per_sample}: a conversation's images "
                "would not fit in a row"
            )
        if self.packing_window > MAX_PACKING_WINDOW:
            raise ValueError(
                f"config.data.packing_window={self.packing_window} is more than "
                f"{MAX_PACKING_WINDOW}: packing looks at every open row for each conversation, "
                "so a larger window only slows every epoch's plan (and its memory), and rows "
                f"are already as full at {MAX_PACKING_WINDOW} open rows as at any more"
            )
        for field in (
            "global_batch_size",
            "max_len",
            "max_images_per_sample",
            "max_images_per_row",
            "packing_window",
            "video_frames",
        ):
            if getattr(self, field) < 1:
                raise ValueError(f"config.data.{field}={getattr(self, field)} must be >= 1")

    @classmethod
    def saved(cls, section: dict, where: str) -> DataConfig:
        """The data settings saved with a run's checkpoints. A run config written before the
        conversation format had versions (no `template_version`) was trained with version 1."""
        section = {"template_version": 1, **section}
        # Saved before the model's image settings left the data section: the model's own
        # (its vision tower, grids and counts) are the ones that count.
        for key in MODEL_DICTATED:
            section.pop(key, None)
        # Windows past the bound were accepted before it; a saved one says only how that run
        # packed (no program reads it back to pack), so it is kept within the bound.
        if isinstance(section.get("packing_window"), int):
            section["packing_window"] = min(section["packing_window"], MAX_PACKING_WINDOW)
        return cls.from_section(section, where)

    @property
    def conversation_template(self) -> Template:
        """The `Template` these settings name, in their version."""
        return get_template(self.template, self.template_version)

    @property
    def image_slots(self) -> int:
        """Image slots of a batch row: a packed row's, or one conversation's."""
        return self.max_images_per_row if self.packing else self.max_images_per_sample
