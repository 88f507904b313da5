"""PIL's bicubic resize, computed only where the output needs it, pixel for pixel as PIL.

Why it exists: preprocessing must give exactly Pillow's pixels, as LLaVA-1.5 and the CLIP
image processor (which resize with PIL) do, but a long, thin image makes PIL work on a huge
canvas: ``pad`` first expands the image to a square (a 140-byte 20000x1 PNG would need a
1.6 GB canvas), and ``crop`` first resizes the short side to the output (20000x1 ->
6720000x336). A few hundred bytes of request could claim gigabytes. ``pad_and_resize_thin``,
``pad_and_resize_wide`` and ``resize_window`` compute the same pixels in work and memory
that follow the image and the output, not the canvas; ``llava_jax/data/image.py`` decides
when they replace a plain PIL resize.

How: PIL resizes in two passes, horizontal then vertical, each a 1-D convolution with
fixed-point coefficients and an 8-bit result. ``_resample_line`` computes one pass for
chosen output positions, with the same float operations in the same order as PIL's
`precompute_coeffs` and `normalize_coeffs_8bpc` (Resample.c) and exact integer sums, so
the pixels are PIL's own; a line may be mostly a constant fill, summed in one product.
Pillow 13 may run the vertical pass first (``_horizontal_first``), which rounds
differently: the passes here follow the installed Pillow's order.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

_PRECISION_BITS = 22  # PIL: 32 - 8 - 2
_CHUNK = 1 << 21  # elements of a working array: bounds the memory of a pass


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's ``bicubic_filter`` (a = -0.5), operation for operation."""
    x = np.abs(x)
    near = (1.5 * x - 2.5) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _taps(in_size: int, out_size: int, outs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """First source position and count of taps of each output in ``outs`` when PIL resizes
    a line of ``in_size`` to ``out_size`` (box: the whole line), and the kernel size."""
    # box coordinates are C floats in PIL
    scale = float(np.float32(in_size)) / out_size
    support = 2.0 * max(scale, 1.0)
    center = (outs + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    stop = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    return first, stop - first, int(math.ceil(support)) * 2 + 1


def _coefficients(in_size: int, out_size: int, outs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first tap int64[n], coefficients int64[n, ksize])`` of the outputs ``outs``."""
    scale = float(np.float32(in_size)) / out_size
    filterscale = max(scale, 1.0)
    first, count, ksize = _taps(in_size, out_size, outs)
    center = (outs + 0.5) * scale
    taps = np.arange(ksize)
    position = (first[:, None] + taps).astype(np.float64)
    weights = _pil_bicubic((position - center[:, None] + 0.5) * (1.0 / filterscale))
    weights[taps >= count[:, None]] = 0.0
    # summed in order, as PIL does (numpy's sum is pairwise): same rounding
    total = np.add.accumulate(weights, axis=1)[:, -1]
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0.0)
    scaled = weights * (1 << _PRECISION_BITS)
    coefficients = np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5))
    return first, coefficients.astype(np.int64)


def _outputs_touching(in_size: int, out_size: int, lo: int, hi: int) -> np.ndarray:
    """The output positions whose taps reach source positions ``[lo, hi)``."""
    first, count, _ = _taps(in_size, out_size, np.arange(out_size))
    return np.nonzero((first < hi) & (first + count > lo))[0]


def _tap_span(in_size: int, out_size: int, outs: np.ndarray) -> tuple[int, int]:
    """The source positions ``[lo, hi)`` the outputs ``outs`` read."""
    first, count, _ = _taps(in_size, out_size, outs)
    return int(first.min()), int((first + count).max())


def _resample_line(
    segment: np.ndarray,
    offset: int,
    in_size: int,
    out_size: int,
    outs: np.ndarray,
    fill: np.ndarray,
) -> np.ndarray:
    """One PIL bicubic pass along axis 0, for the outputs ``outs`` only.

    The source line has ``in_size`` positions: ``segment`` (``uint8[n, m, C]``) at
    ``offset`` and ``fill`` (``int[m, C]``, broadcast) everywhere else. Returns
    ``uint8[len(outs), m, C]``, equal to PIL's.
    """
    n, inner = segment.shape[0], segment.shape[1:]
    lines = segment.reshape(n, int(np.prod(inner)))
    fill = np.broadcast_to(np.asarray(fill, np.int64), inner).reshape(-1)
    out = np.empty((len(outs), lines.shape[1]), np.uint8)
    ksize = _taps(in_size, out_size, np.zeros(1))[2]
    rows = max(1, min(64, _CHUNK // ksize))
    columns = max(1, _CHUNK // rows)
    for start in range(0, len(outs), rows):
        chunk = np.asarray(outs[start : start + rows])
        first, coefficients = _coefficients(in_size, out_size, chunk)
        position = first[:, None] + np.arange(ksize)
        lo = max(offset, int(position.min()))
        hi = min(offset + n, int(position.max()) + 1)
        dense = None
        if lo < hi:  # some taps on the segment: its coefficients as a matrix
            dense = np.zeros((len(chunk), hi - lo))
            inside = (position >= lo) & (position < hi)
            dense[np.nonzero(inside)[0], position[inside] - lo] = coefficients[inside]
        # the fill's share: all coefficients but the segment's, times the fill
        on_fill = coefficients.sum(axis=1)
        if dense is not None:
            on_fill = on_fill - dense.sum(axis=1).astype(np.int64)
        for col in range(0, lines.shape[1], columns):
            part = slice(col, col + columns)
            total = (1 << (_PRECISION_BITS - 1)) + on_fill[:, None] * fill[None, part]
            if dense is not None:
                # float64 is exact here: every partial sum is an integer below 2**31
                pixels = lines[lo - offset : hi - offset, part].astype(np.float64)
                total += (dense @ pixels).astype(np.int64)
            out[start : start + len(chunk), part] = np.clip(total >> _PRECISION_BITS, 0, 255)
    return out.reshape(len(outs), *inner)


def _fill_line(in_size: int, out_size: int, fill: np.ndarray) -> np.ndarray:
    """A pass over a line that is all ``fill`` (``int[m, C]``): ``uint8[out_size, m, C]``."""
    fill = np.asarray(fill, np.int64)
    empty = np.zeros((0, *fill.shape), np.uint8)
    return _resample_line(empty, 0, in_size, out_size, np.arange(out_size), fill)


def pad_and_resize_thin(image: Image.Image, size: int, fill) -> Image.Image:
    """``expand_to_square`` then the bicubic resize to ``size``, PIL's pixels, without the
    square: the pass across the padding reads the image and sums the fill in one product,
    the pass along the image runs in PIL on the image (or the band it reaches). Both sides
    of the square shrink alike, so PIL's full resize runs horizontal pass first."""
    width, height = image.size
    side = max(width, height)
    fill = np.asarray(fill, np.int64)
    # what the first (horizontal) pass makes of a row that is all fill
    fill_row = _fill_line(side, size, fill[None])[:, 0]  # uint8[size, 3]
    if width > height:  # fill above and below: rows of the image, then the vertical pass
        rows = np.asarray(image.resize((size, height), Image.Resampling.BICUBIC))
        top = (side - height) // 2
        out = _resample_line(rows, top, side, size, np.arange(size), fill_row)
        return Image.fromarray(out)
    # fill left and right: the horizontal pass gives the fill row on every row except in
    # the columns the image reaches; then the vertical pass, in PIL, on those columns
    left = (side - width) // 2
    band = _outputs_touching(side, size, left, left + width)
    columns = np.asarray(image).transpose(1, 0, 2)  # the image, a line along x per row
    reached = _resample_line(columns, left, side, size, band, fill)  # [band, side, 3]
    reached = Image.fromarray(np.ascontiguousarray(reached.transpose(1, 0, 2)))
    out = _fill_line(side, size, fill_row)  # [size, size, 3]: the fill-row columns
    out[:, band] = np.asarray(reached.resize((len(band), size), Image.Resampling.BICUBIC))
    return Image.fromarray(out)


_PILLOW_MAJOR = int(Image.__version__.split(".")[0])


def _horizontal_first(width: int, height: int, new_width: int, new_height: int) -> bool:
    """Whether PIL resizes ``width x height`` to ``new_width x new_height`` horizontal pass
    first. Pillow 13 runs the vertical pass first when the height shrinks by more than
    twice as many pixels as the width; older Pillows always start horizontally."""
    if _PILLOW_MAJOR < 13:
        return True
    shrink = height - new_height
    return not (shrink > 0 and shrink > (width - new_width) * 2)


def resize_window(
    image: Image.Image, new_size: tuple[int, int], left: int, top: int, size: int
) -> Image.Image:
    """``image.resize(new_size, BICUBIC).crop((left, top, left + size, top + size))``,
    PIL's pixels, computing only the window (the resized image may be huge)."""
    width, height = image.size
    new_width, new_height = new_size
    xs, ys = np.arange(left, left + size), np.arange(top, top + size)
    pixels = np.asarray(image)
    zero = np.zeros(3)
    if _horizontal_first(width, height, new_width, new_height):
        # the source rows the vertical pass reads; the horizontal pass on those only
        lo, hi = _tap_span(height, new_height, ys) if new_height != height else (top, top + size)
        rows = pixels[lo:hi]
        if new_width != width:
            lines = rows.transpose(1, 0, 2)
            rows = _resample_line(lines, 0, width, new_width, xs, zero).transpose(1, 0, 2)
        else:
            rows = rows[:, left : left + size]
        if new_height != height:
            rows = _resample_line(rows, lo, height, new_height, ys, zero)
        return Image.fromarray(np.ascontiguousarray(rows))
    # vertical pass first, on the source columns the horizontal pass reads
    lo, hi = _tap_span(width, new_width, xs) if new_width != width else (left, left + size)
    columns = pixels[:, lo:hi]
    columns = _resample_line(columns, 0, height, new_height, ys, zero)  # height shrinks
    if new_width != width:
        lines = columns.transpose(1, 0, 2)
        columns = _resample_line(lines, lo, width, new_width, xs, zero).transpose(1, 0, 2)
    else:
        columns = columns[:, left - lo : left - lo + size]
    return Image.fromarray(np.ascontiguousarray(columns))


def pad_and_resize_wide(image: Image.Image, size: int, fill) -> Image.Image:
    """``image._pad_and_resize`` of an image wider than tall: PIL's two passes done apart, so
    the horizontal one runs on the image's rows only (a fill row passes once)."""
    width, height = image.size
    top = (width - height) // 2
    fill_row = Image.new("RGB", (width, 1), fill).resize((size, 1), Image.Resampling.BICUBIC)
    passed = np.empty((width, size, 3), np.uint8)
    passed[:] = np.asarray(fill_row)
    passed[top : top + height] = np.asarray(image.resize((size, height), Image.Resampling.BICUBIC))
    # same width: PIL runs only the vertical pass, the full resize's second one
    return Image.fromarray(passed).resize((size, size), Image.Resampling.BICUBIC)
