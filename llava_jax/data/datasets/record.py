"""The stored record shared by every builder: id, original image bytes, conversation.

A video (LLaVA-Video's `video` field, llava_json) is stored as its sampled frames, each a
lossless PNG in `image_bytes`, and marked in `image_paths`: frame k of the sample from
`clips/x.mp4` is `clips/x.mp4#frame=k` (`video_frame_path`). So the TFDS features stay
those of images, and `Record.is_video` tells the encoder that its images are one video.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import tensorflow_datasets as tfds


def features() -> tfds.features.FeaturesDict:
    """TFDS features: image bytes are kept exactly as read from disk (no re-encoding)."""
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "image_bytes": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "image_paths": tfds.features.Sequence(tfds.features.Text()),
            # LLaVA's `conversations` list as JSON text, so any turn structure round-trips
            "conversations": tfds.features.Text(),
        }
    )


# `<source>#frame=<k>`: the k-th sampled frame (from 0) of the video at <source>
VIDEO_FRAME_PATH = re.compile(r"(?P<source>.+)#frame=(?P<frame>0|[1-9][0-9]*)")


def video_frame_path(source: str, frame: int) -> str:
    """The stored path of the `frame`-th sampled frame of the video at `source`."""
    return f"{source}#frame={frame}"


@dataclasses.dataclass(frozen=True)
class Record:
    id: str
    image_bytes: tuple[bytes, ...]
    image_paths: tuple[str, ...]
    conversations: tuple[dict, ...]

    @property
    def video_source(self) -> str | None:
        """The video whose frames this record's images are (its path as the JSON wrote it),
        or None for a record of images: every path `video_frame_path(source, k)`, k = 0, 1,
        ... in order, of one source."""
        matches = [VIDEO_FRAME_PATH.fullmatch(path) for path in self.image_paths]
        if not matches or not all(matches):
            return None
        sources = {match["source"] for match in matches}
        frames = [int(match["frame"]) for match in matches]
        if len(sources) != 1 or frames != list(range(len(frames))):
            return None
        return sources.pop()

    @property
    def is_video(self) -> bool:
        """Whether the images are one video's sampled frames (one `<image>` in the text)."""
        return self.video_source is not None

    def to_example(self) -> dict:
        """The dict a TFDS generator yields."""
        return {
            "id": self.id,
            "image_bytes": list(self.image_bytes),
            "image_paths": list(self.image_paths),
            "conversations": json.dumps(list(self.conversations), ensure_ascii=False),
        }


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def from_stored(raw: dict) -> Record:
    """A record as read back from a TFDS data source (text fields come back as bytes)."""
    return Record(
        id=_text(raw["id"]),
        image_bytes=tuple(bytes(b) for b in raw["image_bytes"]),
        image_paths=tuple(_text(p) for p in raw["image_paths"]),
        conversations=tuple(json.loads(_text(raw["conversations"]))),
    )
