"""Image decoding and preprocessing: any PIL mode to RGB, pad/resize/crop, normalise.

Matches LLaVA-1.5 + the CLIP image processor: ``pad`` expands to a square filled with
the mean colour (``expand2square``), then a bicubic resize to the model's size, then
``(x / 255 - mean) / std``.

Reading is bounded: ``read_image_file`` opens only regular files (a FIFO would block
forever) inside the image folder it is given; ``decode_image`` refuses images of more than
``PIL.Image.MAX_IMAGE_PIXELS`` pixels (or a caller's smaller ``max_pixels``, as the
server's) from the header, before decoding; and ``pad`` and ``crop`` of a very long, thin
image compute only the output pixels the image reaches, pixel for pixel as PIL would, so
their work follows the image, not the huge square or resized canvas.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import threading
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASPECT_MODES = ("pad", "resize", "crop")


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can read, or one too large to decode."""


class ImageTooLargeError(ImageDecodeError):
    """An image whose header claims more pixels than a limit: refused before decoding.

    ``size``: its (width, height); ``limit``: the pixels allowed; ``limit_name``: what sets
    the limit (``PIL.Image.MAX_IMAGE_PIXELS``, or the caller's ``max_pixels``).
    """

    def __init__(self, size: tuple[int, int], limit: int, limit_name: str):
        width, height = size
        super().__init__(
            f"image too large to decode: {width}x{height} = {width * height} pixels, "
            f"over the limit of {limit} ({limit_name})"
        )
        self.size, self.limit, self.limit_name = (width, height), limit, limit_name


class ImageFileError(ValueError):
    """An image path that is not read: outside the image folder, or not a regular file.

    ``kind`` is ``"outside_image_dir"`` or ``"not_regular_file"``; the message names the
    path and the reason.
    """

    def __init__(self, path: str, kind: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.kind, self.reason = path, kind, reason


_FILE_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(path: str, mode: int) -> ImageFileError:
    what = next((name for test, name in _FILE_TYPES if test(mode)), "a special file")
    return ImageFileError(path, "not_regular_file", f"not a regular file ({what})")


def check_image_path(path: str, root: str | None = None) -> str:
    """The resolved path of the image file ``path``, checked but not opened.

    With ``root``, the path with every symlink resolved must lie inside ``root`` (also
    resolved), so ``../x.png``, ``/abs/x.png`` or a link out of the folder are refused,
    whether or not they exist. Then it must be a regular file. Raises ``ImageFileError``;
    a missing file raises ``FileNotFoundError``.
    """
    resolved = os.path.realpath(path)
    if root is not None:
        top = os.path.realpath(root)
        try:
            inside = os.path.commonpath([resolved, top]) == top
        except ValueError:  # different drives (Windows)
            inside = False
        if not inside:
            reason = f"outside the image folder {root} (resolves to {resolved})"
            raise ImageFileError(path, "outside_image_dir", reason)
    # stat before open: opening a FIFO blocks until a writer comes, a device may act
    mode = os.stat(resolved).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)
    return resolved


def read_image_file(path: str, root: str | None = None) -> bytes:
    """The bytes of the image file ``path``: the one safe way to read an image file.

    Refuses (``ImageFileError``, naming the path and the reason) a path outside ``root``
    when ``root`` is given, and anything but a regular file; other failures are the
    ``OSError`` of ``os.stat`` / ``open`` (``FileNotFoundError`` for a missing file).
    """
    resolved = check_image_path(path, root)
    # non-blocking, and checked again on the open file, should a FIFO replace the file
    # between the check and the open
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(resolved, flags | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        return file.read()


# PIL warns (DecompressionBombWarning) while opening an image over MAX_IMAGE_PIXELS;
# the warning filter that makes it an error is process-wide, so openings take turns.
_OPEN_LOCK = threading.Lock()


def _open_lazily(data: bytes) -> Image.Image:
    """``Image.open`` (header only), PIL's bomb warning raised as an error."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _check_pixels(
    size: tuple[int, int], max_pixels: int | None = None, limit_name: str = "max_pixels"
) -> None:
    """Raises `ImageTooLargeError` when `size` is over PIL's pixel limit or `max_pixels`
    (the smaller one is named)."""
    width, height = size
    limits = [(Image.MAX_IMAGE_PIXELS, "PIL.Image.MAX_IMAGE_PIXELS"), (max_pixels, limit_name)]
    for limit, name in sorted((pair for pair in limits if pair[0] is not None), key=lambda p: p[0]):
        if width * height > limit:
            raise ImageTooLargeError((width, height), limit, name)


@contextlib.contextmanager
def _decoding(
    data: bytes, max_pixels: int | None = None, limit_name: str = "max_pixels"
) -> Iterator[Image.Image]:
    """The image `data` opened lazily, its claimed size checked; whatever PIL raises inside
    (corrupt bytes, a decompression bomb) comes out as one `ImageDecodeError`."""
    try:
        image = _open_lazily(data)
        _check_pixels(image.size, max_pixels, limit_name)
        yield image
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(f"image too large to decode: {error}") from None
    except Exception as error:  # PIL raises many types for corrupt files
        raise ImageDecodeError(f"cannot decode image ({type(error).__name__}: {error})") from error


def decode_image(
    data: bytes, max_pixels: int | None = None, limit_name: str = "max_pixels"
) -> Image.Image:
    """Decodes image bytes to an RGB ``PIL.Image``, honouring EXIF orientation.

    Transparent images are composited on white (as Hugging Face's ``convert_to_rgb``);
    16-bit and float images are scaled to 8 bits rather than clipped. An image of more
    than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (None: no limit), or than ``max_pixels``
    when given (e.g. a server's own, smaller limit; ``limit_name`` says what sets it in
    the message), is refused from its header, never decoded (``ImageTooLargeError``): a
    few hundred bytes can claim gigabytes of pixels.
    """
    with _decoding(data, max_pixels, limit_name) as image:
        image = ImageOps.exif_transpose(image)
        image.load()
        # a few formats (ICO, ICNS) settle their size on load
        _check_pixels(image.size, max_pixels, limit_name)
    return to_rgb(image)


def decoded_size(data: bytes) -> tuple[int, int]:
    """`(width, height)` of the image `decode_image` gives (EXIF orientation applied), read
    from the header: no pixel is decoded. Raises `ImageDecodeError` as `decode_image`."""
    with _decoding(data) as image:
        width, height = image.size
        if image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):  # turned 90 degrees
            width, height = height, width
    return width, height


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode (L, LA, P, PA, RGBA, CMYK, I;16, I, F, ...) to RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        # integer modes hold 16-bit samples; float images are scaled by their own range
        top = 65535.0 if image.mode != "F" else max(float(pixels.max()), 1.0)
        pixels = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def mean_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The fill colour of ``pad``: LLaVA's ``tuple(int(x * 255) for x in mean)``."""
    return tuple(int(value * 255) for value in mean)


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: the image centred on a square of colour ``fill``."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


# --- PIL's bicubic resize, output pixel by output pixel ------------------------------
#
# PIL resizes in two passes, horizontal then vertical, each a 1-D convolution with
# fixed-point coefficients and an 8-bit result. The functions below compute one pass for
# chosen output positions, with the same float operations in the same order as PIL's
# `precompute_coeffs` and `normalize_coeffs_8bpc` (Resample.c) and exact integer sums, so
# the pixels are PIL's own; a line may be mostly a constant fill, summed in one product.

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


def _pad_and_resize_thin(image: Image.Image, size: int, fill) -> Image.Image:
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


def _resize_window(
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


# the square (pad) or the resized image (crop) a resize goes through may be this many
# times the output before the window-only computation takes over
_CANVAS_FACTOR = 4


def _pad_wide(image: Image.Image, size: int, fill) -> Image.Image:
    """``_pad_and_resize`` of an image wider than tall: PIL's two passes done apart, so
    the horizontal one runs on the image's rows only (a fill row passes once)."""
    width, height = image.size
    top = (width - height) // 2
    fill_row = Image.new("RGB", (width, 1), fill).resize((size, 1), Image.Resampling.BICUBIC)
    passed = np.empty((width, size, 3), np.uint8)
    passed[:] = np.asarray(fill_row)
    passed[top : top + height] = np.asarray(image.resize((size, height), Image.Resampling.BICUBIC))
    # same width: PIL runs only the vertical pass, the full resize's second one
    return Image.fromarray(passed).resize((size, size), Image.Resampling.BICUBIC)


def _pad_and_resize(image: Image.Image, size: int, fill) -> Image.Image:
    """``expand_to_square`` then a bicubic resize to ``size``, pixel for pixel, without
    the work spent on padding.

    A long, thin image (the square over ``_CANVAS_FACTOR`` times the image) never gets its
    square: ``_pad_and_resize_thin`` computes the same pixels in work and memory that
    follow the image's size (a 140-byte 20000x1 PNG would otherwise need a 1.6 GB canvas).
    Otherwise a wide image's rows are resampled alone (``_pad_wide``), and a tall image's
    square only in the output columns it can reach: the rest of a resized constant fill
    is the fill itself."""
    width, height = image.size
    side = max(width, height)
    if width == height or side <= size:  # no bigger than the output
        return expand_to_square(image, fill).resize((size, size), Image.Resampling.BICUBIC)
    if side > _CANVAS_FACTOR * min(width, height):
        return _pad_and_resize_thin(image, size, fill)
    if width > height:
        # not a band of rows through `box`: Pillow 13 may run such a resize vertical
        # pass first, which rounds differently from the full square's resize
        return _pad_wide(image, size, fill)
    square = expand_to_square(image, fill)
    scale = side / size
    support = 2.0 * scale  # bicubic reach, in source pixels, when downscaling
    start = (side - width) // 2
    stop = start + width
    # band edges on columns where the source coordinate is a whole number, so the band's
    # sampling positions are the full resize's exactly
    step = size // math.gcd(side, size)
    first = max(0, int(np.floor((start - support) / scale - 0.5)) - 1) // step * step
    last = min(size, -(-int(np.ceil((stop + support) / scale - 0.5) + 2) // step) * step)
    # padded left and right: resample the middle columns (Pillow 13 runs this resize
    # horizontal pass first, as the full one, since the height shrinks no more)
    band = square.resize(
        (last - first, size),
        Image.Resampling.BICUBIC,
        box=(first * scale, 0, last * scale, side),
    )
    out = Image.new("RGB", (size, size), fill)
    out.paste(band, (first, 0))
    return out


def resize_and_crop(image: Image.Image, size: int, aspect: str, fill) -> Image.Image:
    """Brings ``image`` to ``size x size`` by the ``aspect`` mode (bicubic)."""
    if aspect == "pad":
        return _pad_and_resize(image, size, fill)
    if aspect == "crop":
        width, height = image.size
        scale = size / min(width, height)
        # CLIP: the short side becomes `size`, the long side keeps the aspect ratio
        new_size = (max(size, int(round(width * scale))), max(size, int(round(height * scale))))
        left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
        if new_size[0] * new_size[1] > _CANVAS_FACTOR * size * size:
            # a thin image's resized copy is huge (20000x1 -> 6720000x336): the window only
            return _resize_window(image, new_size, left, top, size)
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        return image.crop((left, top, left + size, top + size))
    if aspect != "resize":
        raise ValueError(f"Unknown image aspect mode {aspect!r}; choose from {ASPECT_MODES}")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``uint8[H, W, 3] -> float32[H, W, 3]``: ``(x / 255 - mean) / std``."""
    height, width, channels = pixels.shape
    std = np.asarray(std, np.float32)
    # per-channel constants tiled along a row: a long inner loop is much faster than
    # broadcasting over a trailing axis of 3
    scale = np.tile(1.0 / (255.0 * std), width).astype(np.float32)
    shift = np.tile(np.asarray(mean, np.float32) / std, width).astype(np.float32)
    out = pixels.reshape(height, width * channels).astype(np.float32)
    out *= scale
    out -= shift
    return out.reshape(height, width, channels)


def preprocess_image(
    image: Image.Image,
    size: int,
    aspect: str = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """RGB ``PIL.Image`` -> normalised ``float32[size, size, 3]`` (NHWC without N)."""
    image = resize_and_crop(to_rgb(image), size, aspect, mean_colour(mean))
    return normalize(np.asarray(image, dtype=np.uint8), mean, std)


def load_and_preprocess(
    data: bytes,
    size: int,
    aspect: str = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """Image bytes -> ``float32[size, size, 3]``; raises ``ImageDecodeError`` if unreadable."""
    return preprocess_image(decode_image(data), size, aspect, mean, std)
