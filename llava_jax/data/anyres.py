"""LLaVA-NeXT's any-resolution images ("anyres"), on the host: geometry, tiles, token layout.

An image of H x W is seen at the grid resolution from `pinpoints` that keeps the most of it
(`select_best_resolution`), resized to fit it, padded (centred, black) and cut into
`tile x tile` tiles, behind an overview of the whole image resized to one tile. The vision
tower turns each tile into `side x side` features (`side = tile // patch`); the grid's
features are laid out as one `rows*side x cols*side` map, cropped back to the image's aspect
ratio ("unpadded") and closed by an `image_newline` embedding at the end of every row. The
image's tokens are the overview's `side**2` features, then that map, row by row.

Everything here depends only on the image's size, so the host computes it: the number of
image tokens for the prompt, and `feature_layout`, which the model uses as a gather index
into the image's `[tiles * side**2 + 1, D]` feature table (the last row: the newline), so
shapes stay static under `jit` (`max_tiles`, `max_tokens`). The order equals transformers'
`LlavaNextModel.pack_image_features`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from llava_jax.data.image import normalize, to_rgb


def select_best_resolution(
    height: int, width: int, pinpoints: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """The `(height, width)` of `pinpoints` that shows the most of an image of this size
    (most pixels kept after downscaling to fit), then wastes the fewest."""
    best, most_kept, least_wasted = None, 0, math.inf
    for grid_height, grid_width in pinpoints:
        scale = min(grid_width / width, grid_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = grid_width * grid_height - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (int(grid_height), int(grid_width)), kept, wasted
    return best


def fitted_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """The size an image is resized to inside its grid resolution (aspect kept)."""
    scale_width, scale_height = target_width / width, target_height / height
    if scale_width < scale_height:
        return min(math.ceil(height * scale_width), target_height), target_width
    return target_height, min(math.ceil(width * scale_height), target_width)


@dataclasses.dataclass(frozen=True)
class Anyres:
    """The geometry of one model's any-resolution images.

    `tile`: the vision tower's input size; `patch`: its patch size; `pinpoints`: the grid
    resolutions `(height, width)`, each a multiple of `tile`.
    """

    tile: int
    patch: int
    pinpoints: tuple[tuple[int, int], ...]

    def __post_init__(self):
        pinpoints = tuple(tuple(int(v) for v in p) for p in self.pinpoints)
        object.__setattr__(self, "pinpoints", pinpoints)
        for height, width in self.pinpoints:
            if height % self.tile or width % self.tile:
                raise ValueError(
                    f"image_grid_pinpoints entry {(height, width)} is not a multiple of the "
                    f"vision tower's image size {self.tile}"
                )

    @property
    def side(self) -> int:
        """Features along one side of a tile."""
        return self.tile // self.patch

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Tiles `(rows, cols)` for an image of `height x width`."""
        best_height, best_width = select_best_resolution(height, width, self.pinpoints)
        return best_height // self.tile, best_width // self.tile

    @property
    def max_tiles(self) -> int:
        """Tiles of the largest grid, plus the overview: the static tile count per image."""
        return 1 + max(h // self.tile * (w // self.tile) for h, w in self.pinpoints)

    @property
    def max_tokens(self) -> int:
        """Image tokens of the largest possible layout: the static feature count per image."""
        side = self.side
        return side * side + max(
            h // self.tile * side * (w // self.tile * side + 1) for h, w in self.pinpoints
        )

    def unpadded(self, height: int, width: int) -> tuple[int, int, int, int]:
        """`(top, left, rows, cols)` of the feature map that covers the image itself."""
        grid_rows, grid_cols = self.grid(height, width)
        rows, cols = grid_rows * self.side, grid_cols * self.side
        if width / height > cols / rows:  # wider than the grid: padded above and below
            kept = int(round(height * (cols / width), 7))
            pad = (rows - kept) // 2
            return pad, 0, rows - 2 * pad, cols
        kept = int(round(width * (rows / height), 7))
        pad = (cols - kept) // 2
        return 0, pad, rows, cols - 2 * pad

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens an image of `height x width` takes in the prompt."""
        _, _, rows, cols = self.unpadded(height, width)
        return self.side * self.side + rows * (cols + 1)

    def feature_layout(self, height: int, width: int) -> np.ndarray:
        """`int32[max_tokens]`: for each image token, its row in the image's feature table
        `[max_tiles * side**2 + 1]` (tile t's patch (y, x) at `t * side**2 + y * side + x`;
        tile 0 the overview; the last row the newline); -1 after the image's tokens."""
        side, per_tile = self.side, self.side * self.side
        newline = self.max_tiles * per_tile
        _, grid_cols = self.grid(height, width)
        top, left, rows, cols = self.unpadded(height, width)
        y = np.arange(rows)[:, None] + top  # row in the whole grid's map
        x = np.arange(cols)[None, :] + left
        tile = 1 + (y // side) * grid_cols + x // side
        rows_of_map = tile * per_tile + (y % side) * side + x % side
        with_newline = np.concatenate(
            [rows_of_map, np.full((rows, 1), newline, rows_of_map.dtype)], axis=1
        )
        layout = np.concatenate([np.arange(per_tile), with_newline.reshape(-1)])
        out = np.full(self.max_tokens, -1, np.int32)
        out[: len(layout)] = layout
        return out

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
