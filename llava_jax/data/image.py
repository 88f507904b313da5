"""Image decoding and preprocessing: any PIL mode to RGB, pad/resize/crop, normalise.

Matches LLaVA-1.5 + the CLIP image processor: ``pad`` expands to a square filled with
the mean colour (``expand2square``), then a bicubic resize to the model's size, then
``(x / 255 - mean) / std``.

Reading is bounded: ``read_image_file`` opens only regular files (a FIFO would block
forever) inside the image folder it is given; ``decode_image`` refuses images of more than
``PIL.Image.MAX_IMAGE_PIXELS`` pixels (or a caller's smaller ``max_pixels``, as the
server's) from the header, before decoding; and ``pad`` and ``crop`` of a very long, thin
image compute only the output pixels the image reaches, pixel for pixel as PIL would, so
their work follows the image, not the huge square or resized canvas (``resample.py``: PIL's
bicubic resize re-done for the outputs wanted; this module decides when it replaces PIL's).
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

from llava_jax.data import resample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP's image processor (LLaVA-OneVision's tower): a bicubic resize to the square size
# (no crop, no pad: aspect "resize"), then these.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
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


# the square (pad) or the resized image (crop) a resize goes through may be this many
# times the output before the window-only computation takes over
_CANVAS_FACTOR = 4


def _pad_and_resize(image: Image.Image, size: int, fill) -> Image.Image:
    """``expand_to_square`` then a bicubic resize to ``size``, pixel for pixel, without
    the work spent on padding.

    A long, thin image (the square over ``_CANVAS_FACTOR`` times the image) never gets its
    square: ``resample.pad_and_resize_thin`` computes the same pixels in work and memory
    that follow the image's size (a 140-byte 20000x1 PNG would otherwise need a 1.6 GB
    canvas). Otherwise a wide image's rows are resampled alone
    (``resample.pad_and_resize_wide``), and a tall image's square only in the output
    columns it can reach: the rest of a resized constant fill is the fill itself."""
    width, height = image.size
    side = max(width, height)
    if width == height or side <= size:  # no bigger than the output
        return expand_to_square(image, fill).resize((size, size), Image.Resampling.BICUBIC)
    if side > _CANVAS_FACTOR * min(width, height):
        return resample.pad_and_resize_thin(image, size, fill)
    if width > height:
        # not a band of rows through `box`: Pillow 13 may run such a resize vertical
        # pass first, which rounds differently from the full square's resize
        return resample.pad_and_resize_wide(image, size, fill)
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
            return resample.resize_window(image, new_size, left, top, size)
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
