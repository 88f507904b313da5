"""What the model takes in: the batch's fields, their shapes, and the geometry of its images.

The model owns this contract; the data pipeline fills it, the train step and the plan read it.
It imports nothing of Flax's modules (only `flax.struct`) and nothing of `data/`, so every room
may use it.

`Batch` (one global batch; B rows of T tokens, I image slots a row):

- `input_ids int32[B, T]`: each `<image>` expanded to its image tokens, right-padded;
- `loss_mask float32[B, T]`: 1 where the token is a target;
- `attention_mask int32[B, T]`: segment ids, 1.. per conversation of a (packed) row, 0 padding;
- `positions int32[B, T]`: RoPE positions, restarting at each conversation (None: counted
  from the attention mask, one conversation a row);
- `images float32[B, I, tiles, H, W, 3]`: each image slot's tiles, `ImageGeometry.max_tiles`
  of them. A LLaVA-1.5 image is a grid of one tile (its square image); a LLaVA-NeXT image is
  the overview, then its grid's tiles, then zeros;
- `image_mask bool[B, I]`: which slots hold an image;
- `image_layout int32[B, I, N]`: each image token's row in its image's feature table
  (`ImageGeometry.feature_layout`; -1 after the image's tokens). A one-tile image's
  features are already in token order (0..N-1): the model skips the gather statically, so
  its layout may be None.

An image's tokens on a grid (LLaVA-NeXT's "anyres"): an image of H x W is seen at the grid
resolution from `pinpoints` that keeps the most of it (`select_best_resolution`), resized to
fit it, padded and cut into `tile x tile` tiles behind an overview; each tile becomes
`side x side` features (`side = tile // patch`), laid out as one map cropped back to the
image's aspect ratio ("unpadded") with an `image_newline` closing every row. The order equals
transformers' `LlavaNextModel.pack_image_features`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from flax import struct

if TYPE_CHECKING:  # the config builds and checks its geometry: no import back at run time
    from llava_jax.models.config import ModelConfig


@struct.dataclass
class Batch:
    """One global batch of training inputs (see the module docstring for shapes)."""

    input_ids: Any
    loss_mask: Any
    attention_mask: Any
    images: Any
    image_mask: Any
    positions: Any = None  # None: counted from the attention mask (one conversation a row)
    image_layout: Any = None  # None: images of one tile (their features in token order)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The batch's keys, in order: the one place they are listed."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> Batch:
        """The batch of these arrays (other keys, e.g. an example's id, are left out)."""
        return cls(**{name: arrays[name] for name in cls.fields() if name in arrays})

    def model_inputs(self) -> dict[str, Any]:
        """The arguments of `Llava.__call__`: everything but the targets' mask."""
        return {
            name: getattr(self, name)
            for name in self.fields()
            if name != "loss_mask" and getattr(self, name) is not None
        }


def example_shapes(
    geometry: ImageGeometry, length: int, image_slots: int, channels: int = 3
) -> dict[str, tuple[tuple[int, ...], Any]]:
    """`{field: (shape, dtype)}` of one row of a `Batch` (no batch axis): `length` tokens,
    `image_slots` images at their largest (every image as its largest grid of tiles)."""
    slots = (image_slots,)
    return {
        "input_ids": ((length,), np.int32),
        "loss_mask": ((length,), np.float32),
        "attention_mask": ((length,), np.int32),
        "positions": ((length,), np.int32),
        "images": ((*slots, *geometry.tiles_shape(channels)), np.float32),
        "image_mask": (slots, np.bool_),
        "image_layout": ((*slots, geometry.max_tokens), np.int32),
    }


def batch_shapes(
    config: ModelConfig, batch_size: int, length: int, image_slots: int
) -> dict[str, tuple[tuple[int, ...], Any]]:
    """`{field: (shape, dtype)}` of a `Batch` for `config`: `batch_size` rows of
    `example_shapes`."""
    rows = example_shapes(ImageGeometry.of(config), length, image_slots, config.vision.num_channels)
    return {name: ((batch_size, *shape), dtype) for name, (shape, dtype) in rows.items()}


def abstract_batch(
    config: ModelConfig, batch_size: int, length: int, image_slots: int, sharding: Any = None
) -> Batch:
    """A `Batch` of `jax.ShapeDtypeStruct`s (for compiling ahead of time)."""
    import jax

    return Batch.from_arrays(
        {
            name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for name, (shape, dtype) in batch_shapes(
                config, batch_size, length, image_slots
            ).items()
        }
    )


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


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    """The geometry of one model's images, which the data and inference sides read from the
    model (`of`), never from their own settings.

    `tile`: the vision tower's input size; `patch`: its patch size; `pinpoints`: LLaVA-NeXT's
    grid resolutions `(height, width)`, each a multiple of `tile` (empty: one square image a
    slot, LLaVA-1.5); `square_tokens`: the tokens of one square image (None: `side**2`; the
    model's count, which keeps CLS under the "full" feature strategy).
    """

    tile: int
    patch: int
    pinpoints: tuple[tuple[int, int], ...] = ()
    square_tokens: int | None = None

    def __post_init__(self):
        tile = self.tile
        for pinpoint in self.pinpoints:
            if len(pinpoint) != 2 or min(pinpoint) < tile or any(v % tile for v in pinpoint):
                raise ValueError(
                    f"image_grid_pinpoints entry {tuple(pinpoint)!r} is not a (height, width) "
                    f"whose sides are multiples of vision.image_size={self.tile}"
                )
        pinpoints = tuple(tuple(int(v) for v in p) for p in self.pinpoints)
        object.__setattr__(self, "pinpoints", pinpoints)
        if self.tiled and self.square_tokens not in (None, self.side**2):
            raise ValueError(
                "image_grid_pinpoints (LLaVA-NeXT) lays a tile's features out as a square "
                "grid, which needs vision_feature_select_strategy='default' (CLS dropped)"
            )

    @property
    def side(self) -> int:
        """Features along one side of a tile."""
        return self.tile // self.patch

    @property
    def tiled(self) -> bool:
        """LLaVA-NeXT: an image is its grid's tiles behind an overview, laid out per image."""
        return bool(self.pinpoints)

    @property
    def image_size(self) -> int:
        """Pixels along a side of what the vision tower sees (a square image, or a tile)."""
        return self.tile

    @property
    def tokens_of_square(self) -> int:
        """Image tokens of one square image (LLaVA-1.5's count for every image)."""
        return self.side * self.side if self.square_tokens is None else self.square_tokens

    @property
    def fewest_tokens(self) -> int:
        """Tokens of the smallest image in a prompt (NeXT: a square one tile across)."""
        return self.num_tokens(self.tile, self.tile)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Tiles `(rows, cols)` for an image of `height x width`."""
        best_height, best_width = select_best_resolution(height, width, self.pinpoints)
        return best_height // self.tile, best_width // self.tile

    @property
    def max_tiles(self) -> int:
        """Tiles of the largest grid, plus the overview: the static tile count per image (1
        for a square image)."""
        if not self.tiled:
            return 1
        return 1 + max(h // self.tile * (w // self.tile) for h, w in self.pinpoints)

    @property
    def max_tokens(self) -> int:
        """Image tokens of the largest possible layout: the static feature count per image."""
        if not self.tiled:
            return self.tokens_of_square
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

    def tiles_shape(self, channels: int = 3) -> tuple[int, int, int, int]:
        """An image slot's pixels: `(max_tiles, tile, tile, channels)`."""
        return (self.max_tiles, self.tile, self.tile, channels)

    @property
    def largest_input(self) -> tuple[int, int]:
        """`(height, width)` of the largest image the model sees whole: its largest grid
        resolution, or one tile."""
        return max(self.pinpoints, key=lambda p: p[0] * p[1], default=(self.tile, self.tile))

    def describe(self) -> str:
        """A short account of the images, for a log line."""
        if self.tiled:
            return f"images tiled on {len(self.pinpoints)} grids"
        return f"{self.tokens_of_square} image tokens"

    def empty_layouts(self, *shape: int) -> np.ndarray:
        """`int32[*shape, max_tokens]` of -1: the layouts of empty image slots."""
        return np.full((*shape, self.max_tokens), -1, np.int32)

    def check_layout(self, layout: Any) -> Any:
        """The layout a tiled image needs (`ValueError` when it is None); a one-tile
        image's features are in token order and need none."""
        if layout is None and self.tiled:
            raise ValueError("a LLaVA-NeXT model needs image_layout int32[B, I, N] with its images")
        return layout

    def prompt_counts(self, counts: Sequence[int]) -> int | list[int]:
        """What each `<image>` of a prompt expands to: each image's count in order, or, with
        no image given, a square image's count for every one (it needs no image to count)."""
        return list(counts) if counts or self.tiled else self.tokens_of_square

    def layouts_in_order(self, *shape: int) -> np.ndarray:
        """`int32[*shape, max_tokens]`: one-tile images' layouts, every feature in order (a
        tiled image's depends on its size: `ValueError`)."""
        self.check_layout(None)
        return np.broadcast_to(self.feature_layout(0, 0), (*shape, self.max_tokens))

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens an image of `height x width` takes in the prompt."""
        if not self.tiled:
            return self.tokens_of_square
        _, _, rows, cols = self.unpadded(height, width)
        return self.side * self.side + rows * (cols + 1)

    def feature_layout(self, height: int, width: int) -> np.ndarray:
        """`int32[max_tokens]`: for each image token, its row in the image's feature table
        `[max_tiles * side**2 + 1]` (tile t's patch (y, x) at `t * side**2 + y * side + x`;
        tile 0 the overview; the last row the newline); -1 after the image's tokens. An image
        of one tile: its features in order, 0..N-1."""
        if not self.tiled:
            return np.arange(self.tokens_of_square, dtype=np.int32)
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

    @classmethod
    def of(cls, config: ModelConfig) -> ImageGeometry:
        """The geometry of `config`'s images: its vision tower's, its grids', its counts."""
        vision = config.vision
        return cls(
            vision.image_size, vision.patch_size, config.image_grid_pinpoints,
            config.num_image_tokens,
        )  # fmt: skip

    @classmethod
    def square(cls, image_size: int, tokens: int) -> ImageGeometry:
        """One square image of `image_size` pixels, `tokens` image tokens (LLaVA-1.5)."""
        return cls(image_size, image_size, (), tokens)
