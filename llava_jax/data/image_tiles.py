"""An image on the host as the model takes it: its tiles, its feature layout and its number
of image tokens (`models/inputs.py` `ImageGeometry` owns the geometry: grids, tokens, layout).

A LLaVA-1.5 image is one tile: the square image, padded or resized (`data/image.py`). A
LLaVA-NeXT image ("anyres") is an overview and its grid's tiles: resized to its best grid
resolution, padded centred in black and cut. The data pipeline and inference both prepare
images here, so the two never differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from llava_jax.data.image import decoded_size, normalize, preprocess_image, to_rgb
from llava_jax.models.inputs import ImageGeometry, select_best_resolution


def fitted_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """The size an image is resized to inside its grid resolution (aspect kept)."""
    scale_width, scale_height = target_width / width, target_height / height
    if scale_width < scale_height:
        return min(math.ceil(height * scale_width), target_height), target_width
    return target_height, min(math.ceil(width * scale_height), target_width)


class ImageTiler(ImageGeometry):
    """`ImageGeometry` (models/inputs.py) with the host's work on an image: its tiles and
    everything the prompt needs of it."""

    @classmethod
    def of_geometry(cls, geometry: ImageGeometry) -> ImageTiler:
        """The host's tiles for a model's geometry (`ImageGeometry.of(model_config)`)."""
        return cls(
            geometry.tile,
            geometry.patch,
            geometry.pinpoints,
            geometry.square_tokens,
            geometry.max_grid_features,
        )

    def encode(
        self,
        image: Image.Image,
        mean: Sequence[float],
        std: Sequence[float],
        aspect: str = "pad",
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Everything the model and the prompt need of one image: its `tiles` float32[T, S,
        S, 3], its `feature_layout` int32[N] and its number of image tokens."""
        width, height = image.size
        return (
            self.tiles(image, mean, std, aspect),
            self.feature_layout(height, width),
            self.num_tokens(height, width),
        )

    def encode_in_prompt(
        self,
        image: Image.Image,
        images_in_prompt: int,
        mean: Sequence[float],
        std: Sequence[float],
        aspect: str = "pad",
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """`encode`, or, for one of several images of a OneVision prompt, `encode_several`."""
        if self.blended and images_in_prompt > 1:
            return self.encode_several(image, mean, std)
        return self.encode(image, mean, std, aspect)

    def encode_several(
        self, image: Image.Image, mean: Sequence[float], std: Sequence[float]
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """One image of a OneVision prompt with several: `encode`'s three, its tiles the
        image padded to a square (in the mean colour, as OneVision's processor pads it),
        resized to one tile, then zeros."""
        tiles = np.zeros(self.tiles_shape(), np.float32)
        tiles[0] = preprocess_image(image, self.tile, "pad", mean, std)
        return tiles, self.several_layout(), self.several_tokens

    def encode_video(
        self, frames: Sequence[Image.Image], mean: Sequence[float], std: Sequence[float]
    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        """A video's frames (OneVision) -> the image slots they fill, each `(tiles
        float32[T, S, S, 3], layout int32[N, 8])`, frames `max_tiles` to a slot, each frame
        resized to one tile; and the video's number of tokens (`video_layouts`)."""
        layouts = self.video_layouts(len(frames))
        slots = []
        for index, layout in enumerate(layouts):
            tiles = np.zeros(self.tiles_shape(), np.float32)
            chunk = frames[index * self.max_tiles : (index + 1) * self.max_tiles]
            for tile, frame in enumerate(chunk):
                tiles[tile] = preprocess_image(frame, self.tile, "resize", mean, std)
            slots.append((tiles, layout))
        return slots, self.video_tokens(len(frames))

    def empty(self, slots: int) -> tuple[np.ndarray, np.ndarray]:
        """`slots` empty image slots: tiles `float32[slots, T, S, S, 3]` of zeros and their
        layouts `int32[slots, N]` of -1."""
        return np.zeros((slots, *self.tiles_shape()), np.float32), self.empty_layouts(slots)

    def tokens_from_header(self, data: bytes, images_in_prompt: int = 1) -> int:
        """The image tokens of encoded image bytes, from the header alone where the count
        depends on the size (raises `ImageDecodeError` when unreadable); one of several
        images of a OneVision prompt has `several_tokens`."""
        if not self.tiled:
            return self.tokens_of_square
        width, height = decoded_size(data)
        return self.tokens_in_prompt(height, width, images_in_prompt)

    def tokens_in_prompt(self, height: int, width: int, images_in_prompt: int) -> int:
        """The image tokens of an image of `height x width` in a prompt with
        `images_in_prompt` images (`encode_in_prompt`'s count)."""
        if self.blended and images_in_prompt > 1:
            return self.several_tokens
        return self.num_tokens(height, width)

    def tiles(
        self,
        image: Image.Image,
        mean: Sequence[float],
        std: Sequence[float],
        aspect: str = "pad",
    ) -> np.ndarray:
        """An RGB image -> normalised `float32[max_tiles, tile, tile, 3]`. One tile: the
        square image (`aspect`: LLaVA's "pad" to a square, or a resize or crop). A grid: the
        overview (the whole image resized to one tile), then the grid's tiles row by row,
        then zeros."""
        if not self.tiled:
            return preprocess_image(image, self.tile, aspect, mean, std)[None]
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
