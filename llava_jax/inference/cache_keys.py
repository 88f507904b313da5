"""What the slot engine's caches are keyed by (inference/slot_engine.py): an image by its
preprocessed pixels and layout; a prompt block by every token up to its end and the images
those tokens show."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from llava_jax.models.inputs import ImageGeometry


def image_key(pixels: np.ndarray, layout: np.ndarray) -> bytes:
    """An image's key: a hash of its tiles (after preprocessing) and its feature layout."""
    return hashlib.sha256(
        np.ascontiguousarray(pixels).tobytes() + np.ascontiguousarray(layout).tobytes()
    ).digest()


def block_keys(
    fields: dict[str, Any], block: int, image_token_id: int, geometry: ImageGeometry
) -> list[bytes]:
    """A key for each whole block of `block` tokens of a one-row prompt (`Engine.prepare`'s
    fields: left-padded ids, images, their mask and layouts `int32[1, I, *layout_shape]`): a
    hash chain over every token up to the block's end and the keys of the image slots those
    tokens show (an image token's slot follows from the layouts' token counts,
    `geometry.layout_tokens`, slots in order: a video's tokens span its slots). None when
    the prompt's image tokens do not match its images (the engine refuses such a prompt)."""
    mask = fields["attention_mask"][0]
    ids = fields["input_ids"][0][mask > 0]
    owners = np.full(len(ids), -1, np.int64)  # which image each image token shows
    keys_of: dict[int, bytes] = {}
    if fields["images"] is not None:
        images, layout = fields["images"], fields["image_layout"]
        valid = np.flatnonzero(fields["image_mask"][0])
        counts = [int(geometry.layout_tokens(layout[0, i])) for i in valid]
        positions = np.flatnonzero(ids == image_token_id)
        if len(positions) != sum(counts):
            return []
        owners[positions] = np.repeat(valid, counts)
        keys_of = {int(i): image_key(images[0, i], layout[0, i]) for i in valid}
    keys, chain = [], b""
    for end in range(block, len(ids) + 1, block):
        start = end - block
        shown = dict.fromkeys(int(o) for o in owners[start:end] if o >= 0)
        pieces = [chain, ids[start:end].tobytes(), *(keys_of[o] for o in shown)]
        chain = hashlib.sha256(b"".join(pieces)).digest()
        keys.append(chain)
    return keys
