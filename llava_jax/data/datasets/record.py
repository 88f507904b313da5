"""The stored record shared by every builder: id, original image bytes, conversation."""

from __future__ import annotations

import dataclasses
import json

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


@dataclasses.dataclass(frozen=True)
class Record:
    id: str
    image_bytes: tuple[bytes, ...]
    image_paths: tuple[str, ...]
    conversations: tuple[dict, ...]

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
