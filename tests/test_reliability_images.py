"""Image files as untrusted input: paths that leave the image folder, files that are not
regular files (a FIFO blocks an ``open`` forever), and images whose size is a bomb (a
140-byte 20000x1 PNG padded to a 20000x20000 square, a header claiming 10^10 pixels).

Each is refused by name, or computed in bounded memory, wherever an image file is read:
LLaVA-JSON preparation, ``evaluate``'s questions, and ``LoadedModel.load_image`` (the
``generate --image`` and ``chat`` path).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import types
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from llava_jax.data import image as image_lib
from llava_jax.data.datasets.llava_json import validate
from llava_jax.data.image import (
    CLIP_MEAN,
    ImageDecodeError,
    ImageFileError,
    decode_image,
    expand_to_square,
    mean_colour,
    read_image_file,
    resize_and_crop,
)
from llava_jax.data.image_tiles import ImageTiler
from llava_jax.errors import InputError
from llava_jax.evaluation.batch import Question, _prepare, answer_questions
from llava_jax.inference.load import LoadedModel
from llava_jax.models.inputs import ImageGeometry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILL = mean_colour(CLIP_MEAN)
SIZE = 16
SAMPLING = types.SimpleNamespace(max_new_tokens=4)  # all `answer_questions` reads of it here
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")


def png_bytes(width: int, height: int, colour=(90, 30, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` RGB pixels and holds a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def folders(tmp_path):
    """An image folder with ``good.png``, and beside it a ``secret`` folder holding a
    valid image and a text file that must never be read through the image folder."""
    images = tmp_path / "images"
    secret = tmp_path / "secret"
    images.mkdir()
    secret.mkdir()
    (images / "good.png").write_bytes(png_bytes(12, 8))
    (secret / "outside.png").write_bytes(png_bytes(12, 8, (1, 2, 3)))
    (secret / "notes.txt").write_text("password=hunter2\n")
    return images, secret


def record(record_id: str, image: str) -> dict:
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A square."},
        ],
    }


def write_records(path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


class FakeModel:
    """What `_prepare` and `answer_questions` use of a `LoadedModel`, with its real
    `load_image` (the function `generate --image` and `chat` call)."""

    load_image = LoadedModel.load_image
    preprocess_image = LoadedModel.preprocess_image

    def __init__(self):
        self.data = types.SimpleNamespace(
            image_aspect="pad",
            image_mean=CLIP_MEAN,
            image_std=image_lib.CLIP_STD,
        )
        self.geometry = ImageGeometry.square(SIZE, 4)
        self.tiler = ImageTiler.of_geometry(self.geometry)
        self.config = types.SimpleNamespace(
            vision=types.SimpleNamespace(num_channels=3), num_image_tokens=4
        )
        self.image_shape = (1, SIZE, SIZE, 3)

    def user_turn(self, text: str, with_image: bool) -> dict:
        return {"text": text, "with_image": with_image}

    def prompt_ids(self, turns, images=(), system=None) -> np.ndarray:
        return np.arange(4, dtype=np.int32)

    def check_prompt(self, prompt_ids, max_new_tokens) -> None:
        return None

    def check_image_tokens(self, prompt_ids, images) -> None:
        return None


def question(image: str, question_id: str = "q1", line: int = 3) -> Question:
    return Question(question_id, "What is it?", image, None, line)


# --- finding 7: image paths outside the image folder -------------------------------------


@pytest.mark.timeout(60)
def test_llava_json_drops_records_whose_image_is_outside_the_folder(folders, tmp_path, monkeypatch):
    images, secret = folders
    (images / "escape.png").symlink_to(secret / "outside.png")  # a link out of the folder
    (images / "alias.png").symlink_to(images / "good.png")  # a link that stays inside
    reads = []
    real_read = image_lib.read_image_file

    def spying_read(path, root=None):
        reads.append(os.path.realpath(path))
        return real_read(path, root)

    monkeypatch.setattr("llava_jax.data.datasets.llava_json.read_image_file", spying_read)
    records = [
        record("good", "good.png"),
        record("alias", "alias.png"),
        record("dotdot", "../secret/outside.png"),
        record("absolute", str(secret / "outside.png")),
        record("link", "escape.png"),
        record("text", "../secret/notes.txt"),
    ]
    good, report = validate(write_records(tmp_path / "r.jsonl", records), str(images))

    assert {r.id for r in good} == {"good", "alias"}
    assert report.counts == {"outside_image_dir": 4}
    assert report.dropped == 4
    dropped = {p.record_id: p for p in report.examples}
    assert set(dropped) == {"dotdot", "absolute", "link", "text"}
    for problem in dropped.values():
        assert problem.kind == "outside_image_dir"
        assert "outside the image folder" in problem.detail
    assert dropped["dotdot"].file.endswith("../secret/outside.png")
    assert dropped["link"].file.endswith("escape.png")
    assert "outside_image_dir: 4" in report.summary()
    # nothing outside the folder was read, only the two kept images
    assert all(path.startswith(str(images.resolve())) for path in reads), reads
    assert {os.path.basename(p) for p in reads} == {"good.png"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["../secret/outside.png", "../secret/notes.txt", "ABS", "LINK"])
def test_evaluate_question_image_outside_the_folder_is_an_error_entry(folders, name):
    images, secret = folders
    if name == "ABS":
        name = str(secret / "outside.png")
    if name == "LINK":
        (images / "escape.png").symlink_to(secret / "outside.png")
        name = "escape.png"
    model = FakeModel()

    with pytest.raises(InputError) as caught:
        _prepare(model, question(name, "q7", line=5), str(images), max_new_tokens=4)
    message = str(caught.value)
    assert message.startswith("question 'q7' (line 5): ")
    assert name in message and "outside the image folder" in message
    # refused before reading: a text file would otherwise be "unreadable", not "outside"
    assert "unreadable" not in message

    entries = list(answer_questions(model, [question(name, "q7", line=5)], str(images), SAMPLING))
    assert len(entries) == 1 and entries[0]["text"] == ""
    assert "outside the image folder" in entries[0]["error"] and name in entries[0]["error"]


@pytest.mark.timeout(60)
def test_evaluate_image_inside_the_folder_still_loads(folders):
    images, _ = folders
    (images / "sub").mkdir()
    (images / "sub" / "b.png").write_bytes(png_bytes(5, 9))
    (images / "alias.png").symlink_to(images / "good.png")
    for name in ("good.png", "sub/b.png", "sub/../good.png", "alias.png"):
        prepared = _prepare(FakeModel(), question(name), str(images), max_new_tokens=4)
        assert prepared.image.pixels.shape == (1, SIZE, SIZE, 3)  # one tile


# --- finding 10: FIFOs, directories, devices -------------------------------------------------


@needs_fifo
@pytest.mark.timeout(60)
def test_a_fifo_is_refused_everywhere_an_image_is_read(folders, tmp_path):
    images, _ = folders
    fifo = images / "pipe.png"
    os.mkfifo(fifo)  # no writer: an open() for reading would block forever

    with pytest.raises(ImageFileError) as caught:
        read_image_file(str(fifo), str(images))
    assert caught.value.kind == "not_regular_file"
    assert str(fifo) in str(caught.value) and "not a regular file (a FIFO)" in str(caught.value)

    # generate --image / chat
    with pytest.raises(InputError, match=r"pipe\.png: not a regular file \(a FIFO\)"):
        FakeModel().load_image(str(fifo))
    # evaluate
    with pytest.raises(InputError, match=r"^question 'q1' \(line 3\): .*not a regular file"):
        _prepare(FakeModel(), question("pipe.png"), str(images), max_new_tokens=4)
    # LLaVA-JSON preparation
    path = write_records(
        tmp_path / "r.jsonl", [record("good", "good.png"), record("p", "pipe.png")]
    )
    good, report = validate(path, str(images))
    assert [r.id for r in good] == ["good"]
    assert report.counts == {"not_regular_file": 1}
    (problem,) = report.examples
    assert problem.record_id == "p" and problem.file.endswith("pipe.png")
    assert problem.detail == "not a regular file (a FIFO)"


@pytest.mark.timeout(60)
def test_a_directory_or_device_is_not_a_regular_file(folders, tmp_path):
    images, _ = folders
    (images / "folder.png").mkdir()
    with pytest.raises(InputError, match=r"folder\.png: not a regular file \(a directory\)"):
        FakeModel().load_image(str(images / "folder.png"))
    if os.path.exists("/dev/null"):
        with pytest.raises(InputError, match=r"not a regular file \(a character device\)"):
            FakeModel().load_image("/dev/null")
    path = write_records(tmp_path / "r.jsonl", [record("d", "folder.png")])
    _, report = validate(path, str(images))
    assert report.counts == {"not_regular_file": 1}
    assert report.examples[0].detail == "not a regular file (a directory)"


@needs_fifo
@pytest.mark.timeout(60)
def test_a_fifo_swapped_in_after_the_check_is_still_not_read(tmp_path, monkeypatch):
    fifo = tmp_path / "late.png"
    os.mkfifo(fifo)
    # the path check passes (as it would have a moment before the swap)
    monkeypatch.setattr(image_lib, "check_image_path", lambda path, root=None: path)
    with pytest.raises(ImageFileError, match=r"not a regular file \(a FIFO\)"):
        read_image_file(str(fifo))


# --- finding 11: images whose size is a bomb ------------------------------------------------


def naive_pad(image: Image.Image, size: int) -> np.ndarray:
    square = expand_to_square(image, FILL)
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))


def naive_crop(image: Image.Image, size: int) -> np.ndarray:
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    resized = image.resize(new, Image.Resampling.BICUBIC)
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("width", "height"),
    [(4000, 3), (3, 4000), (1, 5000), (5000, 1), (3000, 7), (7, 3000), (2000, 30), (350, 80)],
)
@pytest.mark.parametrize("size", [336, 224, 17])
def test_pad_of_an_extreme_aspect_ratio_equals_the_full_square_resize(width, height, size):
    image = random_image(width, height, seed=width * 7 + height)
    got = np.asarray(resize_and_crop(image, size, "pad", FILL))
    np.testing.assert_array_equal(got, naive_pad(image, size))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("width", "height"), [(1000, 7), (7, 1000), (300, 2), (2, 300)])
@pytest.mark.parametrize("size", [336, 17])
def test_crop_of_an_extreme_aspect_ratio_equals_resize_then_crop(width, height, size):
    image = random_image(width, height, seed=width * 5 + height)
    got = np.asarray(resize_and_crop(image, size, "crop", FILL))
    np.testing.assert_array_equal(got, naive_crop(image, size))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("width", "height", "size"),
    [(360, 235, 336), (420, 268, 384), (497, 168, 336), (640, 480, 336), (480, 640, 336)],
)
def test_pad_of_a_moderate_aspect_ratio_equals_the_full_square_resize(width, height, size):
    """Pillow 13 runs a resize whose height shrinks much more than its width vertical pass
    first; a band of the square resized on its own must not fall into that order."""
    image = random_image(width, height, seed=width + height)
    got = np.asarray(resize_and_crop(image, size, "pad", FILL))
    np.testing.assert_array_equal(got, naive_pad(image, size))


MEMORY_PROBE = """
import io, resource, sys
from PIL import Image
from llava_jax.data.image import load_and_preprocess

def png(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()

load_and_preprocess(png(64, 48), 336, "pad")  # warm up: plugins, numpy
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sizes = []
for width, height, aspect in [(20000, 1, "pad"), (1, 20000, "pad"), (30000, 1, "pad"),
                              (20000, 1, "crop"), (1, 20000, "crop")]:
    data = png(width, height)
    sizes.append(len(data))
    out = load_and_preprocess(data, 336, aspect)
    assert out.shape == (336, 336, 3), out.shape
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(max(sizes), (after - before) * (1 if sys.platform == "darwin" else 1024))
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.platform == "win32", reason="resource is POSIX")
def test_a_tiny_thin_png_preprocesses_in_small_memory():
    """PIL's pixels are not seen by tracemalloc: the peak RSS of a fresh process is."""
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stderr
    largest_file, grown = map(int, result.stdout.split())
    assert largest_file < 300  # a few hundred bytes of PNG...
    # ...which took 1.5 GB (pad: the 20000x20000 square) and 9 GB (crop: a 6720000x336
    # resize) before; now the output and a few rows of work
    assert grown < 100 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MB"


@pytest.mark.timeout(60)
def test_an_image_over_the_pixel_limit_is_refused_from_its_header(monkeypatch):
    # 10^10 pixels in 80 bytes: PIL's own bomb error, named by us
    with pytest.raises(ImageDecodeError, match="image too large to decode"):
        decode_image(png_header(100_000, 100_000))
    # 10^8 pixels: over PIL's limit but under twice it, where PIL only warns
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError, match="image too large to decode"):
            decode_image(png_header(10_000, 10_000))
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]

    # never decoded: loading the pixels is an error of its own, with another message
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = png_bytes(40, 30)  # 1200 pixels: over the (lowered) limit
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data)
    assert "too large" in str(caught.value) and "decoded" not in str(caught.value)
    # our own check, should PIL's not fire (it is skipped when MAX_IMAGE_PIXELS is None)
    monkeypatch.setattr(Image, "_decompression_bomb_check", lambda *a, **k: None)
    with pytest.raises(ImageDecodeError, match=r"40x30 = 1200 pixels, over the limit of 1000"):
        decode_image(data)


@pytest.mark.timeout(60)
def test_an_over_limit_image_drops_its_record_and_fails_its_question(folders, tmp_path):
    images, _ = folders
    (images / "bomb.png").write_bytes(png_header(100_000, 100_000))
    path = write_records(
        tmp_path / "r.jsonl", [record("good", "good.png"), record("b", "bomb.png")]
    )
    good, report = validate(path, str(images))
    assert [r.id for r in good] == ["good"]
    assert report.counts == {"unreadable_image": 1}
    (problem,) = report.examples
    assert problem.record_id == "b" and "image too large to decode" in problem.detail

    with pytest.raises(InputError, match=r"bomb\.png: image too large to decode"):
        _prepare(FakeModel(), question("bomb.png"), str(images), max_new_tokens=4)
