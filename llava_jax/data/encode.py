"""A stored record -> one fixed-shape training example (in grain's workers): its images
decoded and cut into tiles with their feature layouts (data/image_tiles.py), its conversation
rendered and tokenized with LLaVA's targets; and several examples -> one packed row.

A record of one video's frames (`Record.is_video`, LLaVA-OneVision's video) is its one
`<image>`, expanded to `ImageGeometry.video_tokens(frames)` tokens, and the image slots its
frames fill, `max_tiles` frames to a slot (`ImageTiler.encode_video`): slots, not frames,
count against `max_images_per_sample` and `max_images_per_row`. A model that does not take
videos (not OneVision) drops such a record (`video_not_supported`).

An example holds one row of the host batch (`models/inputs.py` `Batch`, without the batch
axis) plus `id` and `drop_reason` ('' when it trains); a record that must not be trained on
becomes its drop report (`id`, `file`, `detail`, a `drop_reason`), counted by the pipeline.
"""

from __future__ import annotations

import numpy as np

from llava_jax.data.config import DataConfig
from llava_jax.data.conversation import (
    DroppedExample,
    TokenizedConversation,
    tokenize_conversation,
)
from llava_jax.data.datasets.record import Record, from_stored
from llava_jax.data.image import decode_image, decoded_size
from llava_jax.data.image_tiles import ImageTiler
from llava_jax.data.tokenizer import LoadedTokenizer
from llava_jax.models.inputs import ImageGeometry, example_shapes


class ExampleEncoder:
    """Stored record -> one fixed-shape example (runs in grain workers).

    Returns the example dict with ``input_ids int32[T]``, ``loss_mask float32[T]``,
    ``attention_mask int32[T]``, ``positions int32[T]``, ``images float32[I, tiles, H, W,
    3]``, ``image_mask bool[I]``, ``image_layout int32[I, N]``, ``id`` and
    ``drop_reason == ''``; or, for a sample that must not be trained on,
    only ``id``, ``file``, ``detail`` and a non-empty ``drop_reason``.
    """

    def __init__(self, config: DataConfig, geometry: ImageGeometry, tokenizer: LoadedTokenizer):
        self.config = config
        self.tiler = ImageTiler.of_geometry(geometry)  # the model's images, cut on the host
        self.template = config.conversation_template
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.image_token_id
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, stored: dict) -> dict:
        """The record's example, or, for a record dropped here (e.g. an unreadable image),
        its drop report: ``id``, ``drop_reason``, ``detail``, ``file``; ``BatchIterator``
        fills its place from the stream. Under ``group_by_modality_length`` the place is a
        slot of a planned batch and stays: an all-padding example (``input_ids`` the pad id,
        ``loss_mask``, ``attention_mask`` 0, no image; ``id`` '') with the report in
        ``dropped``, as a packed row reports a record it leaves out."""
        record = from_stored(stored)
        try:
            return self.encode(record)
        except DroppedExample as error:
            report = {
                "id": record.id,
                "drop_reason": error.reason,
                "detail": error.detail,
                "file": error.file,
            }
        if not self.config.group_by_modality_length:
            return report
        # Refilling the slot would shift every later batch across mega-batch boundaries.
        return {**self.empty_example(self.config.max_images_per_sample), "dropped": [report]}

    def empty_example(self, slots: int) -> dict:
        """An example of the batch's shapes holding nothing: every token the pad id, no
        segment, no target, `slots` empty image slots (layouts all -1)."""
        shapes = example_shapes(self.tiler, self.config.max_len, slots)
        example = {name: np.zeros(shape, dtype) for name, (shape, dtype) in shapes.items()}
        example["input_ids"][:] = self.pad_token_id
        example["image_layout"][:] = -1
        return {"id": "", "drop_reason": "", **example}

    def image_slots(self, record: Record) -> int:
        """The image slots `record` fills: one an image; a video's frames `max_tiles` to a
        slot."""
        if record.is_video:
            return -(-len(record.image_bytes) // self.tiler.max_tiles)
        return len(record.image_bytes)

    def _too_many_images(self, record: Record) -> str:
        """The drop detail when the record fills more image slots than a sample may, else ''."""
        count, most = self.image_slots(record), self.config.max_images_per_sample
        if count <= most:
            return ""
        if record.is_video:
            frames = len(record.image_bytes)
            return f"a video of {frames} frames fills {count} image slots > {most}"
        return f"{count} > {most}"

    def _check_video(self, record: Record) -> None:
        """Raises `DroppedExample` for a video record when the model takes no video."""
        if record.is_video and not self.tiler.blended:
            raise DroppedExample(
                "video_not_supported",
                "a video trains only a LLaVA-OneVision model (vision_aspect_ratio "
                "'anyres_max_N'); this model's images are not blended",
                record.video_source,
            )

    @staticmethod
    def _unreadable(record: Record, index: int, error: ValueError) -> DroppedExample:
        paths = record.image_paths
        file = paths[index] if index < len(paths) else ""
        return DroppedExample("unreadable_image", str(error), file)

    def images(self, record: Record) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """The record's images (data/image_tiles.py): their tiles ``float32[I, T, S, S, 3]``,
        ``bool[I]``, feature layouts ``int32[I, N]`` and numbers of image tokens (a
        video's: one, for its one ``<image>``)."""
        c = self.config
        self._check_video(record)
        if detail := self._too_many_images(record):
            raise DroppedExample("too_many_images", detail)
        tiles, layouts = self.tiler.empty(c.max_images_per_sample)
        mask = np.zeros((c.max_images_per_sample,), bool)
        if record.is_video:
            slots, count = self._video_slots(record)
            for index, (slot_tiles, slot_layout) in enumerate(slots):
                tiles[index], layouts[index], mask[index] = slot_tiles, slot_layout, True
            return tiles, mask, layouts, [count]
        counts = []
        for index, data in enumerate(record.image_bytes):
            try:
                image = decode_image(data)
                header_width, header_height = decoded_size(data)
            except ValueError as error:  # ImageDecodeError: corrupt bytes
                raise self._unreadable(record, index, error) from error
            in_prompt = len(record.image_bytes)  # OneVision: several images count apart
            tiles[index], layouts[index], count = self.tiler.encode_in_prompt(
                image, in_prompt, c.image_mean, c.image_std, c.image_aspect
            )
            # The length table counted the tokens from the header (`image_tokens`); a format
            # that settles its size on load (ICO) may count otherwise.
            if self.tiler.tokens_in_prompt(header_height, header_width, in_prompt) != count:
                raise DroppedExample(
                    "image_size_changed",
                    f"image {index}: header {(header_width, header_height)}, decoded "
                    f"{image.size} (width, height)",
                    record.image_paths[index] if index < len(record.image_paths) else "",
                )
            counts.append(count)
            mask[index] = True
        return tiles, mask, layouts, counts

    def _video_slots(self, record: Record) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        """A video record's slots `[(tiles float32[T, S, S, 3], layout int32[N, 8])]` and
        its number of tokens (`ImageTiler.encode_video`)."""
        frames = []
        for index, data in enumerate(record.image_bytes):
            try:
                frames.append(decode_image(data))
            except ValueError as error:  # ImageDecodeError: corrupt bytes
                raise self._unreadable(record, index, error) from error
        c = self.config
        return self.tiler.encode_video(frames, c.image_mean, c.image_std)

    def image_tokens(self, record: Record) -> list[int]:
        """Each image's number of image tokens, from its header where the count depends on
        the size (nothing decoded; raises ``DroppedExample`` for an unreadable one); a
        video's one count, from its number of frames."""
        self._check_video(record)
        if record.is_video:
            return [self.tiler.video_tokens(len(record.image_bytes))]
        counts = []
        for index, data in enumerate(record.image_bytes):
            try:
                counts.append(self.tiler.tokens_from_header(data, len(record.image_bytes)))
            except ValueError as error:
                raise self._unreadable(record, index, error) from error
        return counts

    def tokenize(self, record: Record, image_tokens: list[int]) -> TokenizedConversation:
        """The record's tokens, unpadded (raises ``DroppedExample``); `image_tokens`: each
        image's token count."""
        return tokenize_conversation(
            record.conversations,
            self.tokenizer,
            self.template,
            num_images=1 if record.is_video else len(record.image_bytes),
            num_image_tokens=image_tokens,
            max_len=self.config.max_len,
        )

    def measure(self, stored: dict) -> tuple[int, int, str]:
        """(tokens, image slots, drop reason or '') of a stored record, no image decoded (a
        NeXT image's token count comes from its header's size)."""
        record = from_stored(stored)
        images = self.image_slots(record)
        if record.is_video and not self.tiler.blended:
            return 0, images, "video_not_supported"  # as `images` would drop it
        if self._too_many_images(record):
            return 0, images, "too_many_images"  # as `images` would drop it
        try:
            return len(self.tokenize(record, self.image_tokens(record)).input_ids), images, ""
        except DroppedExample as error:
            return 0, images, error.reason

    def encode(self, record: Record) -> dict:
        images, image_mask, layouts, counts = self.images(record)  # the counts set the tokens
        tokens = self.tokenize(record, counts)
        length = len(tokens.input_ids)
        example = self.empty_example(self.config.max_images_per_sample)
        example["input_ids"][:length] = tokens.input_ids
        example["loss_mask"][:length] = tokens.loss_mask
        example["attention_mask"][:length] = 1
        example["positions"][:] = np.arange(self.config.max_len)
        example.update(id=record.id, images=images, image_mask=image_mask, image_layout=layouts)
        return example


class RowEncoder:
    """A packed row's stored records -> one example of the shapes ``ExampleEncoder`` gives
    (``I`` = ``max_images_per_row``), conversation k of the row as segment k + 1 with
    positions from 0. A record that fails here (an unreadable image) leaves its place
    empty and is reported in ``dropped``; the row itself is never dropped, so every
    process keeps the same rows."""

    def __init__(self, config: DataConfig, geometry: ImageGeometry, tokenizer: LoadedTokenizer):
        self.config = config
        self.encoder = ExampleEncoder(config, geometry, tokenizer)

    def __call__(self, row: dict) -> dict:
        c = self.config
        example = self.encoder.empty_example(c.max_images_per_row)
        input_ids, loss_mask = example["input_ids"], example["loss_mask"]
        segments, positions = example["attention_mask"], example["positions"]
        images, image_mask = example["images"], example["image_mask"]
        layouts = example["image_layout"]
        ids, dropped = [], []
        start, image_slot = 0, 0
        for stored in row["records"]:
            record = from_stored(stored)
            try:
                pictures, valid, layout, counts = self.encoder.images(record)
                tokens = self.encoder.tokenize(record, counts)
            except DroppedExample as error:
                dropped.append(
                    {
                        "id": record.id,
                        "drop_reason": error.reason,
                        "detail": error.detail,
                        "file": error.file,
                    }
                )
                continue
            end = start + len(tokens.input_ids)
            count = int(valid.sum())
            if end > c.max_len or image_slot + count > c.max_images_per_row:
                raise RuntimeError(  # the length table and this encoder disagree: a bug
                    f"record {record.id} does not fit its packed row ({end} tokens, "
                    f"{image_slot + count} images)"
                )
            input_ids[start:end] = tokens.input_ids
            loss_mask[start:end] = tokens.loss_mask
            # Position `start` is predicted from the previous conversation's last token:
            # never a target, as a row's first token never is.
            loss_mask[start] = 0.0
            segments[start:end] = len(ids) + 1
            positions[start:end] = np.arange(end - start)
            images[image_slot : image_slot + count] = pictures[valid]
            image_mask[image_slot : image_slot + count] = True
            layouts[image_slot : image_slot + count] = layout[valid]
            ids.append(record.id)
            start, image_slot = end, image_slot + count
        return {**example, "id": ",".join(ids), "dropped": dropped}  # (filled in place)
