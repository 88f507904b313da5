"""Image decoding and preprocessing on odd inputs."""

import io

import numpy as np
import pytest
from PIL import Image

from llava_jax.data.image import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDecodeError,
    decode_image,
    load_and_preprocess,
)

SIZE = 16


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def unnormalize(pixels: np.ndarray) -> np.ndarray:
    """float32 normalised -> 0..255 (test-side inverse of CLIP normalisation)."""
    return (pixels * np.array(CLIP_STD) + np.array(CLIP_MEAN)) * 255.0


@pytest.mark.parametrize(
    ("image", "fmt"),
    [
        (Image.new("L", (20, 12), 77), "PNG"),
        (Image.new("LA", (20, 12), (77, 255)), "PNG"),
        (Image.new("RGBA", (20, 12), (10, 200, 30, 255)), "PNG"),
        (Image.new("RGB", (20, 12), (10, 200, 30)).quantize(8), "PNG"),  # palette
        (Image.new("CMYK", (20, 12), (0, 255, 255, 0)), "JPEG"),
        (Image.new("RGB", (1, 1), (200, 100, 50)), "PNG"),
        (Image.new("RGB", (1000, 10), (200, 100, 50)), "JPEG"),
        (Image.fromarray(np.full((12, 20), 40000, np.uint16)), "PNG"),  # 16-bit grey
    ],
)
@pytest.mark.parametrize("aspect", ["pad", "resize", "crop"])
def test_any_mode_becomes_normalised_rgb(image, fmt, aspect):
    out = load_and_preprocess(encode(image, fmt), SIZE, aspect)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert out.min() > -3 and out.max() < 3  # inside the normalised CLIP range


def test_colours_survive_mode_conversion():
    grey = load_and_preprocess(encode(Image.new("L", (8, 8), 77), "PNG"), 8, "resize")
    np.testing.assert_allclose(unnormalize(grey), 77, atol=0.01)
    cmyk_red = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    r, g, b = np.asarray(cmyk_red, np.float32).mean(axis=(0, 1))
    assert r > 200 and g < 60 and b < 60
    sixteen_bit = Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16))
    assert abs(float(np.asarray(decode_image(encode(sixteen_bit, "PNG"))).mean()) - 127.5) < 1
    transparent = decode_image(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG"))
    assert np.all(np.asarray(transparent) == 255)  # composited on white, not black
    palette = Image.new("RGB", (4, 4), (10, 200, 30)).quantize(4)
    assert np.all(np.asarray(decode_image(encode(palette, "PNG"))) == [10, 200, 30])


def test_exif_orientation_is_applied():
    # 30 wide x 10 high, left half red, right half blue; Orientation 6 = rotate 90° CW
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, :15] = (255, 0, 0)
    pixels[:, 15:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes())
    decoded = np.asarray(decode_image(data))
    assert decoded.shape == (30, 10, 3)  # portrait after rotation
    assert decoded[2, 5, 0] > 200 and decoded[2, 5, 2] < 50  # top is the old left: red
    assert decoded[27, 5, 2] > 200 and decoded[27, 5, 0] < 50  # bottom: blue


def test_pad_centres_the_original_on_the_mean_colour():
    wide = Image.new("RGB", (1000, 200), (255, 0, 0))  # becomes rows 40..60 of 100
    out = unnormalize(load_and_preprocess(encode(wide, "PNG"), 100, "pad"))
    fill = np.array([int(m * 255) for m in CLIP_MEAN])
    np.testing.assert_allclose(out[:38], np.broadcast_to(fill, out[:38].shape), atol=0.01)
    np.testing.assert_allclose(out[62:], np.broadcast_to(fill, out[62:].shape), atol=0.01)
    centre = out[43:57]
    assert np.all(centre[..., 0] > 240) and np.all(centre[..., 1:] < 20)
    # a sliver (1000 x 10) still lands in the middle rows, never at the edges
    sliver = unnormalize(
        load_and_preprocess(encode(Image.new("RGB", (1000, 10), "red"), "PNG"), 100)
    )
    red_rows = np.flatnonzero(sliver[:, 50, 0] - fill[0] > 20)
    assert len(red_rows) and red_rows.min() >= 48 and red_rows.max() <= 51


def test_crop_keeps_the_centre_and_resize_keeps_everything():
    # three vertical bands: red | green | blue, 300 x 100
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, :100, 0] = pixels[:, 100:200, 1] = pixels[:, 200:, 2] = 255
    data = encode(Image.fromarray(pixels), "PNG")
    crop = unnormalize(load_and_preprocess(data, 30, "crop"))
    assert np.all(crop[:, 3:27, 1] > 240)  # only the green centre band remains
    stretched = unnormalize(load_and_preprocess(data, 30, "resize"))
    assert stretched[15, 2, 0] > 240 and stretched[15, 15, 1] > 240 and stretched[15, 27, 2] > 240


def test_corrupt_bytes_raise_a_decode_error():
    good = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    for data in (b"not an image", good[: len(good) // 2], b""):
        with pytest.raises(ImageDecodeError):
            decode_image(data)


@pytest.mark.parametrize(
    ("width", "height", "size"),
    [(640, 480, 336), (480, 640, 336), (641, 479, 336), (333, 500, 224), (2000, 30, 336)],
)
def test_pad_equals_llava_expand2square_then_full_resize(width, height, size):
    rng = np.random.default_rng(width)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    fill = tuple(int(m * 255) for m in CLIP_MEAN)
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    expected = np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))
    got = unnormalize(load_and_preprocess(encode(image, "PNG"), size, "pad"))
    np.testing.assert_allclose(got, expected, atol=0.01)


def test_decoded_size_reads_the_header_and_follows_exif_rotation():
    """LLaVA-NeXT's token counts come from `decoded_size`: the size `decode_image` gives,
    a quarter turn (EXIF orientation 6) included, without decoding the pixels."""
    import io

    from PIL import Image

    from llava_jax.data.image import decode_image, decoded_size

    for orientation in (1, 6):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        Image.new("RGB", (40, 10), (200, 10, 10)).save(buffer, format="JPEG", exif=exif)
        data = buffer.getvalue()
        assert decoded_size(data) == decode_image(data).size
        assert decoded_size(data) == ((40, 10) if orientation == 1 else (10, 40))
