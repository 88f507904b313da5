"""LLaVA-NeXT's any-resolution images ("anyres") on the host: an image's tiles (resized to its
best grid resolution, padded centred in black, cut behind an overview) and what the prompt
needs of it. The geometry itself (grids, tokens, the feature layout) is the model's:
`models/inputs.py` `ImageGeometry`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from llava_jax.data.image import normalize, to_rgb
from llava_jax.models.inputs import ImageGeometry, select_best_resolution


def fitted_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """The size an image is resized to inside its grid resolution (aspect kept)."""
    scale_width, scale_height = target_width / width, target_height / height
    if scale_width < scale_height:
        return min(math.ceil(height * scale_width), target_height), target_width
    return target_height, min(math.ceil(width * scale_height), target_width)


class Anyres(ImageGeometry):
    """`ImageGeometry` (models/inputs.py) with the host's work on an image: its tiles and
    everything the prompt needs of it."""

    @classmethod
    def of_geometry(cls, geometry: ImageGeometry) -> Anyres:
        """The host's tiles for a model's geometry (`ImageGeometry.of(model_config)`)."""
        return cls(geometry.tile, geometry.patch, geometry.pinpoints, geometry.square_tokens)

    def encode(
        self, image: Image.Image, mean: Sequence[float], std: Sequence[float]
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Everything the model and the prompt need of one image: its `tiles` float32[T, S,
        S, 3], its `feature_layout` int32[N] and its number of image tokens (the data
        pipeline and inference both prepare images with this)."""
        width, height = image.size
        return (
            self.tiles(image, mean, std),
            self.feature_layout(height, width),
            self.num_tokens(height, width),
        )

    def tiles(self, image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
        """An RGB image -> normalised `float32[max_tiles, tile, tile, 3]`: the overview (the
        whole image resized to one tile), then the grid's tiles row by row, then zeros."""
        image = to_rgb(image)
        width, height = image.size
        best_height, best_width = select_best_resolution(height, width, self.pinpoints)
        new_height, new_width = fitted_size(height, width, best_height, best_width)
        resized = np.asarray(
            image.resize((new_width, new_height), Image.Resampling.BICUBIC), np.uint8
        )
        canvas = np.zeros((best_height, best_width, 3), np.uint8)  # black, as LLaVA-NeXT pads
        top, left = (best_height - new_height) // 2, (best_width - new_width) // 2
        canvas[top : top + new_height, left : left + new_width] = resized
        overview = np.asarray(image.resize((self.tile, self.tile), Image.Resampling.BICUBIC))
        out = np.zeros((self.max_tiles, self.tile, self.tile, 3), np.float32)
        out[0] = normalize(np.asarray(overview, np.uint8), mean, std)
        index = 1
        for y in range(0, best_height, self.tile):
            for x in range(0, best_width, self.tile):
                out[index] = normalize(canvas[y : y + self.tile, x : x + self.tile], mean, std)
                index += 1
        return out
