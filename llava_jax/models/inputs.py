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
  its layout may be None. A OneVision model's tokens may blend features (a bilinear
  resize): its layout is `int32[B, I, N, 8]`, each token's 4 rows then their 4 weights
  (float32 bits; `blend_layout`), so that one array still carries an image's layout.

An image's tokens on a grid (LLaVA-NeXT's "anyres"): an image of H x W is seen at the grid
resolution from `pinpoints` that keeps the most of it (`select_best_resolution`), resized to
fit it, padded and cut into `tile x tile` tiles behind an overview; each tile becomes
`side x side` features (`side = tile // patch`), laid out as one map cropped back to the
image's aspect ratio ("unpadded") with an `image_newline` closing every row. The order equals
transformers' `LlavaNextModel.pack_image_features`.

LLaVA-OneVision (`max_grid_features`, from `vision_aspect_ratio="anyres_max_N"`) changes
three things, as transformers' `LlavaOnevisionModel` does: a lone image's unpadded map larger
than N tiles' features by more than 10% is resized bilinearly to about N tiles' worth before
its newlines; each image of a prompt with several is one square tile (padded) and a newline
(`several_layout`); a video is its frames, each a tile whose features are pooled 2x2
bilinearly, then one newline (`video_layouts`, its frames over as many slots as they need).
"""

from __future__ import annotations

import dataclasses
import functools
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
        "image_layout": ((*slots, *geometry.layout_shape), np.int32),
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


BLEND_TAPS = 4  # a blended token mixes up to 4 features (bilinear)


def blend_layout(rows: np.ndarray, weights: np.ndarray, length: int) -> np.ndarray:
    """`int32[length, 8]`: tokens' 4 feature rows `int32[n, 4]` then their weights
    `float32[n, 4]` as float32 bits; -1 after the n tokens (`unblend` reads it back)."""
    out = np.full((length, 2 * BLEND_TAPS), -1, np.int32)
    out[: len(rows), :BLEND_TAPS] = rows
    out[: len(rows), BLEND_TAPS:] = np.asarray(weights, np.float32).view(np.int32)
    return out


def bilinear_taps(size: int, resized: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(low, high, weight of high)` `[resized]` of a 1-D bilinear resize from `size`, as
    torch's `interpolate(mode="bilinear", align_corners=False)` computes them (float32)."""
    scale = np.float32(size) / np.float32(resized)
    source = np.maximum((np.arange(resized, dtype=np.float32) + 0.5) * scale - 0.5, 0)
    low = np.minimum(np.floor(source).astype(np.int64), size - 1)
    high = np.minimum(low + 1, size - 1)
    return low, high, np.clip(source - low, 0, 1).astype(np.float32)


def resize_rows(table_rows: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A map of feature rows `int[h, w]` resized bilinearly to `height x width`: each new
    position's 4 rows `int[height, width, 4]` and weights `float32[height, width, 4]`."""
    y0, y1, wy = bilinear_taps(table_rows.shape[0], height)
    x0, x1, wx = bilinear_taps(table_rows.shape[1], width)
    rows = np.stack(
        [table_rows[np.ix_(y, x)] for y in (y0, y1) for x in (x0, x1)], axis=-1
    )  # (y0,x0), (y0,x1), (y1,x0), (y1,x1)
    wy, wx = wy[:, None], wx[None, :]
    weights = np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], axis=-1)
    return rows, weights.astype(np.float32)


def downsampled_size(rows: int, cols: int, side: int, max_grid_features: int) -> tuple[int, int]:
    """OneVision's size of an unpadded `rows x cols` map: resized when larger than
    `max_grid_features` tiles' features by more than 10% (`pack_image_features`'s rule)."""
    ratio = math.sqrt(rows * cols / (max_grid_features * side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
    """The geometry of one model's images, which the data and inference sides read from the
    model (`of`), never from their own settings.

    `tile`: the vision tower's input size; `patch`: its patch size; `pinpoints`: LLaVA-NeXT's
    grid resolutions `(height, width)`, each a multiple of `tile` (empty: one square image a
    slot, LLaVA-1.5); `square_tokens`: the tokens of one square image (None: `side**2`; the
    model's count, which keeps CLS under the "full" feature strategy); `max_grid_features`:
    OneVision's N of `anyres_max_N` (None: LLaVA-1.5 or NeXT).
    """

    tile: int
    patch: int
    pinpoints: tuple[tuple[int, int], ...] = ()
    square_tokens: int | None = None
    max_grid_features: int | None = None

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
        if self.blended and not self.tiled:
            raise ValueError("vision_aspect_ratio='anyres_max_N' needs image_grid_pinpoints")
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
    def blended(self) -> bool:
        """OneVision: layouts blend features (`int32[N, 8]`), images in several count apart,
        videos are taken."""
        return self.max_grid_features is not None

    @property
    def layout_shape(self) -> tuple[int, ...]:
        """One image slot's layout: `(N,)`, or OneVision's `(N, 8)` (`blend_layout`)."""
        return (self.max_tokens, 2 * BLEND_TAPS) if self.blended else (self.max_tokens,)

    def layout_tokens(self, layout: np.ndarray) -> np.ndarray:
        """The image tokens of layouts `int32[..., *layout_shape]` -> `int[...]`."""
        layout = np.asarray(layout)
        rows = layout[..., 0] if self.blended else layout
        return (rows >= 0).sum(axis=-1)

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
        if self.blended:
            return _most_onevision_tokens(
                side, self.max_tiles, self.pinpoints_in_tiles, self.max_grid_features
            )
        return side * side + max(
            rows * side * (cols * side + 1) for rows, cols in self.pinpoints_in_tiles
        )

    @property
    def pinpoints_in_tiles(self) -> tuple[tuple[int, int], ...]:
        """The grids as `(rows, cols)` of tiles."""
        return tuple((h // self.tile, w // self.tile) for h, w in self.pinpoints)

    # --- OneVision: several images, video -----------------------------------------------
    @property
    def pooled_side(self) -> int:
        """Features along a side of a video frame's tile, pooled 2x2 (rounded up)."""
        return math.ceil(self.side / 2)

    @property
    def several_tokens(self) -> int:
        """Tokens of each image of a OneVision prompt with several: a tile and a newline."""
        return self.side * self.side + 1

    def several_layout(self) -> np.ndarray:
        """`int32[max_tokens, 8]`: an image of a prompt with several (OneVision): its one
        tile's features in order, then the newline."""
        per_tile = self.side * self.side
        rows = np.append(np.arange(per_tile), self.max_tiles * per_tile)
        return _unblended(rows, self.max_tokens)

    def video_tokens(self, frames: int) -> int:
        """A video's tokens: each frame's pooled features, then one newline."""
        return frames * self.pooled_side**2 + 1

    def video_layouts(self, frames: int) -> list[np.ndarray]:
        """`int32[max_tokens, 8]` for each image slot a video of `frames` frames fills, its
        frames `max_tiles` to a slot, in order: each frame's features pooled 2x2 (bilinear
        to `pooled_side`, as transformers' `apply_pooling`), the last slot then the newline."""
        if frames < 1:
            raise ValueError(f"a video needs at least one frame, got {frames}")
        side, per_tile, tiles = self.side, self.side * self.side, self.max_tiles
        frame_rows = np.arange(per_tile).reshape(side, side)
        pooled, weights = resize_rows(frame_rows, self.pooled_side, self.pooled_side)
        pooled, weights = pooled.reshape(-1, BLEND_TAPS), weights.reshape(-1, BLEND_TAPS)
        layouts = []
        for first in range(0, frames, tiles):
            count = min(tiles, frames - first)
            rows = np.concatenate([pooled + t * per_tile for t in range(count)])
            slot_weights = np.concatenate([weights] * count)
            if first + count == frames:  # the video's one newline, after its last frame
                rows = np.concatenate([rows, np.full((1, BLEND_TAPS), tiles * per_tile)])
                slot_weights = np.concatenate([slot_weights, [[1, 0, 0, 0]]])
            layouts.append(blend_layout(rows, slot_weights, self.max_tokens))
        return layouts

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
        """`int32[*shape, *layout_shape]` of -1: the layouts of empty image slots."""
        return np.full((*shape, *self.layout_shape), -1, np.int32)

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

    def kept_size(self, height: int, width: int) -> tuple[int, int]:
        """`(rows, cols)` of an image's grid features in the prompt: its unpadded map,
        OneVision's downsampled when too large."""
        _, _, rows, cols = self.unpadded(height, width)
        if self.blended:
            return downsampled_size(rows, cols, self.side, self.max_grid_features)
        return rows, cols

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens an image of `height x width` takes in the prompt (alone in it, for
        OneVision: see `several_tokens`)."""
        if not self.tiled:
            return self.tokens_of_square
        rows, cols = self.kept_size(height, width)
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
        if self.blended:
            return self._onevision_layout(rows_of_map, newline)
        with_newline = np.concatenate(
            [rows_of_map, np.full((rows, 1), newline, rows_of_map.dtype)], axis=1
        )
        layout = np.concatenate([np.arange(per_tile), with_newline.reshape(-1)])
        out = np.full(self.max_tokens, -1, np.int32)
        out[: len(layout)] = layout
        return out

    def _onevision_layout(self, rows_of_map: np.ndarray, newline: int) -> np.ndarray:
        """A lone OneVision image's `int32[max_tokens, 8]`: the overview's features, then
        the unpadded map (resized bilinearly when too large), a newline after each row."""
        rows, cols = downsampled_size(*rows_of_map.shape, self.side, self.max_grid_features)
        if (rows, cols) == rows_of_map.shape:
            taps = np.repeat(rows_of_map[..., None], BLEND_TAPS, axis=-1)
            weights = np.zeros((*rows_of_map.shape, BLEND_TAPS), np.float32)
            weights[..., 0] = 1
        else:
            taps, weights = resize_rows(rows_of_map, rows, cols)
        newline_taps = np.full((rows, 1, BLEND_TAPS), newline)
        newline_weights = np.zeros((rows, 1, BLEND_TAPS), np.float32)
        newline_weights[..., 0] = 1
        per_tile = self.side * self.side
        overview = np.repeat(np.arange(per_tile)[:, None], BLEND_TAPS, axis=1)
        overview_weights = np.zeros((per_tile, BLEND_TAPS), np.float32)
        overview_weights[:, 0] = 1
        all_rows = np.concatenate(
            [overview, np.concatenate([taps, newline_taps], axis=1).reshape(-1, BLEND_TAPS)]
        )
        all_weights = np.concatenate(
            [
                overview_weights,
                np.concatenate([weights, newline_weights], 1).reshape(-1, BLEND_TAPS),
            ]
        )
        return blend_layout(all_rows, all_weights, self.max_tokens)

    @classmethod
    def of(cls, config: ModelConfig) -> ImageGeometry:
        """The geometry of `config`'s images: its vision tower's, its grids', its counts."""
        vision = config.vision
        return cls(
            vision.image_size, vision.patch_size, config.image_grid_pinpoints,
            config.num_image_tokens, config.max_grid_features,
        )  # fmt: skip

    @classmethod
    def square(cls, image_size: int, tokens: int) -> ImageGeometry:
        """One square image of `image_size` pixels, `tokens` image tokens (LLaVA-1.5)."""
        return cls(image_size, image_size, (), tokens)


def _unblended(rows: np.ndarray, length: int) -> np.ndarray:
    """A blended layout whose tokens each take one feature row whole."""
    weights = np.zeros((len(rows), BLEND_TAPS), np.float32)
    weights[:, 0] = 1
    return blend_layout(np.repeat(np.asarray(rows)[:, None], BLEND_TAPS, axis=1), weights, length)


@functools.lru_cache(maxsize=32)
def _most_onevision_tokens(
    side: int, tiles: int, grids: tuple[tuple[int, int], ...], max_grid_features: int
) -> int:
    """The most tokens one OneVision image slot can take: a lone image on any grid (an
    unpadded map spans its grid's full height or its full width), an image of several, or
    a slot of video frames."""
    most = 0
    for grid_rows, grid_cols in grids:
        full_rows, full_cols = grid_rows * side, grid_cols * side
        shapes = [(full_rows, cols) for cols in range(1, full_cols + 1)]
        shapes += [(rows, full_cols) for rows in range(1, full_rows + 1)]
        for shape in shapes:
            rows, cols = downsampled_size(*shape, side, max_grid_features)
            most = max(most, rows * (cols + 1))
    video = tiles * math.ceil(side / 2) ** 2 + 1
    return max(side * side + most, side * side + 1, video)
