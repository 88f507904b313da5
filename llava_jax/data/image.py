"""Image decoding and preprocessing: any PIL mode to RGB, pad/resize/crop, normalise.

Matches LLaVA-1.5 + the CLIP image processor: ``pad`` expands to a square filled with
the mean colour (``expand2square``), then a bicubic resize to the model's size, then
``(x / 255 - mean) / std``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASPECT_MODES = ("pad", "resize", "crop")


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can read."""


def decode_image(data: bytes) -> Image.Image:
    """Decodes image bytes to an RGB ``PIL.Image``, honouring EXIF orientation.

    Transparent images are composited on white (as Hugging Face's ``convert_to_rgb``);
    16-bit and float images are scaled to 8 bits rather than clipped.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image = ImageOps.exif_transpose(image)
        image.load()
    except Exception as error:  # PIL raises many types for corrupt files
        raise ImageDecodeError(f"cannot decode image ({type(error).__name__}: {error})") from error
    return to_rgb(image)


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


def _pad_and_resize(image: Image.Image, size: int, fill) -> Image.Image:
    """``expand_to_square`` then a bicubic resize to ``size``, pixel for pixel, but only
    the output rows (or columns) the image can reach are resampled: the rest of a
    resized constant fill is the fill itself. Saves the work spent on padding."""
    width, height = image.size
    square = expand_to_square(image, fill)
    side = square.size[0]
    if width == height or side <= size:
        return square.resize((size, size), Image.Resampling.BICUBIC)
    scale = side / size
    support = 2.0 * scale  # bicubic reach, in source pixels, when downscaling
    start = (side - min(width, height)) // 2
    stop = start + min(width, height)
    # band edges on rows where the source coordinate is a whole number, so the band's
    # sampling positions are the full resize's exactly
    step = size // math.gcd(side, size)
    first = max(0, int(np.floor((start - support) / scale - 0.5)) - 1) // step * step
    last = min(size, -(-int(np.ceil((stop + support) / scale - 0.5) + 2) // step) * step)
    out = Image.new("RGB", (size, size), fill)
    if width > height:  # padded above and below: resample the middle rows
        band = square.resize(
            (size, last - first),
            Image.Resampling.BICUBIC,
            box=(0, first * scale, side, last * scale),
        )
        out.paste(band, (0, first))
    else:
        band = square.resize(
            (last - first, size),
            Image.Resampling.BICUBIC,
            box=(first * scale, 0, last * scale, side),
        )
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
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
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
