"""A small LLaVA-Bench-layout benchmark made from the synthetic shapes dataset.

    python -m llava_jax.evaluation.example_benchmark --out benchmarks/llava_bench_synthetic

Writes a folder in LLaVA-Bench's layout (as the ``liuhaotian/llava-bench-in-the-wild``
dataset ships it, with LLaVA-Bench COCO's form of context)::

    questions.jsonl     {"question_id", "image", "text", "category": conv|detail|complex}
    context.jsonl       {"id", "image", "captions": [...], "instances": [{"category", "bbox"}]}
    answers_gpt4.jsonl  the reference answers: {"question_id", "prompt", "text", "answer_id",
                        "model_id": "reference", "metadata": {}}
    images/001.png ...
    README.md

The context is in LLaVA-Bench COCO's form (captions and boxes, which LLaVA's
``eval_gpt_review_visual.py`` reads), not In-the-Wild's single ``caption``: each box is
``[x1, y1, x2, y2]`` (top left, bottom right) as fractions of the image's width and height,
3 decimals, computed from the same random draws ``synthetic.render_scene`` makes and
checked against the drawn pixels. ``SCENES`` holds 8 scenes, every colour and shape, one to
three shapes; each image gets one question of each category: ``conv`` asks what the tiny
model was trained on (colour, shape, count, position), ``detail`` asks for a detailed
description, ``complex`` a question to reason about, with fluent reference answers written
from the scene.

Everything is a pure function of this file and ``synthetic.py``: generating again writes
byte-identical files. The PNGs are written here (1-bit palette, stored deflate blocks)
rather than by Pillow, whose compressed bytes depend on the zlib it was built with.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import struct
import sys
import uuid
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from llava_jax.data.datasets import synthetic
from llava_jax.data.datasets.synthetic import COUNT_WORDS, QUESTIONS, Scene

IMAGE_SIZE = 48  # the tiny model's (configs/tiny.py): its images exactly as it was trained
SEED = 24  # image i is drawn by np.random.default_rng([SEED, i])
MODEL_ID = "reference"
# answer_id = uuid5(ANSWER_NAMESPACE, "<question_id>\n<text>"): fixed by the answer itself
ANSWER_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "llava_jax/llava_bench_synthetic")
DETAIL_QUESTION = "Describe the image in detail."

# (scene, conv question kind, complex question kind)
SCENES: tuple[tuple[Scene, str, str], ...] = (
    (Scene("red", "circle", 1, "left"), "colour", "mirror"),
    (Scene("blue", "square", 2, None), "count", "corners"),
    (Scene("green", "triangle", 3, None), "shape", "add_one"),
    (Scene("yellow", "cross", 1, "top"), "position", "upside_down"),
    (Scene("purple", "circle", 3, None), "colour", "corners"),
    (Scene("white", "triangle", 1, "bottom"), "shape", "to_centre"),
    (Scene("red", "cross", 2, None), "count", "corners"),
    (Scene("green", "square", 1, "right"), "position", "add_one"),
)
CATEGORIES = ("conv", "detail", "complex")

CORNERS = {"circle": 0, "square": 4, "triangle": 3, "cross": 12}
_CELL_NAMES = {
    (0, 0): "top left",
    (1, 0): "top middle",
    (2, 0): "top right",
    (0, 1): "middle left",
    (1, 1): "centre",
    (2, 1): "middle right",
    (0, 2): "bottom left",
    (1, 2): "bottom middle",
    (2, 2): "bottom right",
}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
          "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
          "seventeen", "eighteen", "nineteen")  # fmt: skip
_TENS = {2: "twenty", 3: "thirty"}


def number_word(n: int) -> str:
    """0 -> 'zero', ..., 24 -> 'twenty-four' (up to 39)."""
    if n < 20:
        return _UNITS[n]
    tens, units = divmod(n, 10)
    return _TENS[tens] + ("" if units == 0 else "-" + _UNITS[units])


# --- the scene's geometry ------------------------------------------------------------------


def shape_layout(
    scene: Scene, size: int, rng: np.random.Generator
) -> list[tuple[tuple[int, int], tuple[float, float, float, float]]]:
    """((column, row) of its 3x3 cell, pixel box (x1, y1, x2, y2)) of each shape that
    ``synthetic.render_scene(scene, size, rng)`` draws, in drawing order (from
    ``synthetic.scene_layout``: pass a copy of the generator given to ``render_scene``);
    ``checked_boxes`` compares the result with the drawn pixels."""
    layout = synthetic.scene_layout(scene, size, rng)
    r = layout.radius
    return [(cell, (cx - r, cy - r, cx + r, cy + r)) for cell, (cx, cy) in layout.shapes]


def checked_boxes(
    image: Image.Image, boxes: Sequence[tuple[float, float, float, float]], tolerance: float = 1.5
) -> None:
    """Raises RuntimeError unless the pixels that are not the background, each taken as
    part of the box it is nearest to, span exactly their boxes (pixel coordinates) within
    ``tolerance`` pixels: ``shape_layout`` no longer matches ``render_scene``'s draws."""
    pixels = np.asarray(image.convert("RGB"))
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    background = colours[np.argmax(counts)]  # the shapes cover under a quarter of it
    ys, xs = np.nonzero(np.any(pixels != background, axis=-1))
    if not len(boxes):
        if len(xs):
            raise RuntimeError(f"{len(xs)} pixels are drawn but there are no boxes")
        return
    # each pixel (centre at x + 0.5, y + 0.5) belongs to the box it is nearest to
    corners = np.array(boxes, dtype=float).reshape(-1, 4)
    px, py = xs[:, None] + 0.5, ys[:, None] + 0.5
    dx = np.maximum(np.maximum(corners[:, 0] - px, px - corners[:, 2]), 0)
    dy = np.maximum(np.maximum(corners[:, 1] - py, py - corners[:, 3]), 0)
    nearest = np.argmin(np.hypot(dx, dy), axis=1)
    for number, box in enumerate(boxes):
        mine = nearest == number
        drawn = None
        if mine.any():
            drawn = (xs[mine].min(), ys[mine].min(), xs[mine].max() + 1, ys[mine].max() + 1)
            drawn = tuple(int(v) for v in drawn)
        if drawn is None or np.abs(np.subtract(drawn, box)).max() > tolerance:
            raise RuntimeError(
                f"box {tuple(round(v, 2) for v in box)} does not match the drawn shape "
                f"{drawn}: synthetic.render_scene draws differently from shape_layout"
            )


def normalised_box(box: tuple[float, float, float, float], size: int) -> list[float]:
    """A pixel box as LLaVA-Bench COCO writes one: fractions of the side, 3 decimals."""
    return [round(min(max(v / size, 0.0), 1.0), 3) for v in box]


# --- the text --------------------------------------------------------------------------------


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith("s") else shape + "s"


def _noun(scene: Scene) -> str:
    """'circle' or 'circles'."""
    return scene.shape if scene.count == 1 else _plural(scene.shape)


def _count_phrase(scene: Scene) -> str:
    """'a red circle', 'two blue squares'."""
    if scene.count == 1:
        return f"a {scene.colour} {scene.shape}"
    return f"{COUNT_WORDS[scene.count - 1]} {scene.colour} {_noun(scene)}"


def _where(side: str) -> str:
    """'on the left', 'at the top'."""
    return f"on the {side}" if side in ("left", "right") else f"at the {side}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def captions(scene: Scene) -> list[str]:
    """The synthetic dataset's caption (its plural of "cross" spelt right), then a second
    phrasing of the same scene."""
    first = synthetic.caption(scene).replace("crosss", "crosses")
    if scene.count == 1:
        second = (
            f"A single {scene.colour} {scene.shape} near the {scene.position} edge of a "
            "plain dark background."
        )
    else:
        second = f"{_count_phrase(scene).capitalize()} spread over a plain dark background."
    return [first, second]


def conv_question(scene: Scene, kind: str) -> tuple[str, str]:
    """(question, reference answer): the question is one the synthetic data asks."""
    question = QUESTIONS[kind][0]
    one, count = scene.count == 1, COUNT_WORDS[scene.count - 1]
    if kind == "colour":
        text = (
            f"The {scene.shape} is {scene.colour}."
            if one
            else f"The {count} shapes are {scene.colour}: they are all {scene.colour} "
            f"{_noun(scene)}."
        )
    elif kind == "shape":
        text = (
            f"It is a {scene.shape}: the image shows {_count_phrase(scene)}."
            if one
            else f"They are {_noun(scene)}: the image shows {_count_phrase(scene)}."
        )
    elif kind == "count":
        text = (
            f"There is one object: {_count_phrase(scene)}."
            if one
            else f"There are {count} objects: {_count_phrase(scene)}."
        )
    elif kind == "position":
        if scene.position is None:
            raise ValueError("a position question needs a single shape")
        text = f"The {scene.shape} is {_where(scene.position)} of the image."
    else:
        raise ValueError(f"no conv question of kind {kind!r}")
    return question, text


def detail_answer(scene: Scene, cells: Sequence[tuple[int, int]]) -> str:
    """A detailed description: what, how many, where, and what else (nothing)."""
    text = f"The image shows {_count_phrase(scene)} on a plain, dark background."
    if scene.count == 1:
        across = "top to bottom" if scene.position in ("left", "right") else "left to right"
        text += (
            f" The {scene.shape} is near the {scene.position} edge of the picture, roughly "
            f"centred from {across}, and about a quarter of the image's width across."
        )
    else:
        # reading order: top row first, left to right
        places = [_CELL_NAMES[cell] for cell in sorted(cells, key=lambda c: (c[1], c[0]))]
        alike = "both" if scene.count == 2 else "all"
        text += (
            f" The {_noun(scene)} are {alike} the same size and colour: "
            f"{_join([f'one in the {p}' for p in places])}. They are well apart and do "
            "not overlap."
        )
    text += " Apart from that, the picture is empty: no text, no other objects, no texture."
    return text


def complex_question(scene: Scene, kind: str) -> tuple[str, str]:
    """(question, reference answer) that takes a step of reasoning about the scene."""
    side = scene.position
    if side is None and kind in ("mirror", "upside_down", "to_centre"):
        raise ValueError(f"a {kind} question needs a single shape")
    n = scene.count
    if kind == "corners":
        corners = CORNERS[scene.shape]
        question = "How many corners do the shapes in this image have altogether?"
        if corners == 0:
            text = (
                f"None. The image shows {_count_phrase(scene)}, and a circle is a smooth "
                "curve with no corners, so however many there are, the total is zero."
            )
        else:
            each = {
                "square": "four corners",
                "triangle": "three corners",
                "cross": "twelve corners (it is a plus sign: eight corners point outwards "
                "and four lie where its arms meet)",
            }[scene.shape]
            them = "it has" if n == 1 else f"the {COUNT_WORDS[n - 1]} of them have"
            text = (
                f"{number_word(n * corners).capitalize()}. The image shows "
                f"{_count_phrase(scene)}; each {scene.shape} has {each}, so {them} "
                f"{n} x {corners} = {n * corners} corners in total."
            )
    elif kind == "add_one":
        question = (
            f"If one more {scene.shape} of the same colour were drawn, how many "
            f"{_plural(scene.shape)} would the image hold?"
        )
        text = (
            f"{number_word(n + 1).capitalize()}. The image shows {_count_phrase(scene)}, "
            f"and one more makes {number_word(n + 1)} {scene.colour} "
            f"{_plural(scene.shape)}."
        )
    elif kind == "mirror":
        question = f"If the image were mirrored left to right, where would the {scene.shape} be?"
        after = _OPPOSITE[side] if side in ("left", "right") else side
        how = (
            "mirroring left to right swaps the two sides"
            if side in ("left", "right")
            else "mirroring left to right does not move what is centred between the sides"
        )
        text = (
            f"{_where(after).capitalize()}. The {scene.shape} is {_where(side)} of the "
            f"image, and {how}, so it would be {_where(after)}, still {scene.colour} and the "
            "same size."
        )
    elif kind == "upside_down":
        question = f"If the picture were turned upside down, where would the {scene.shape} be?"
        after = _OPPOSITE[side]
        text = (
            f"{_where(after).capitalize()}. The {scene.shape} is {_where(side)} of the image, "
            f"and turning the picture upside down moves what was {_where(side)} to the "
            f"opposite side, so it would be {_where(after)}."
        )
    elif kind == "to_centre":
        question = (
            f"Which edge of the image is the {scene.shape} closest to, and which way would "
            "it have to move to reach the centre?"
        )
        direction = {"left": "right", "right": "left", "top": "down", "bottom": "up"}[side]
        extent = "width" if side in ("left", "right") else "height"
        text = (
            f"It is closest to the {side} edge. To reach the centre it would have to move "
            f"{direction}, by about a third of the image's {extent}."
        )
    else:
        raise ValueError(f"no complex question of kind {kind!r}")
    return question, text


# --- the files -------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    """The image as a PNG whose bytes depend on its pixels only: indexed colour (palette in
    sorted order, the fewest bits a pixel), unfiltered, in stored (uncompressed) deflate
    blocks; RGB if it has more than 256 colours."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width, _ = pixels.shape
    colours, index = np.unique(pixels.reshape(-1, 3), axis=0, return_inverse=True)
    if len(colours) <= 256:
        depth = next(d for d in (1, 2, 4, 8) if len(colours) <= 1 << d)
        index = index.reshape(height, width).astype(np.uint8)
        per_byte = 8 // depth
        padded = np.zeros((height, -(-width // per_byte) * per_byte), np.uint8)
        padded[:, :width] = index
        groups = padded.reshape(height, -1, per_byte).astype(np.uint16)
        shifts = np.arange(per_byte - 1, -1, -1, dtype=np.uint16) * depth
        rows = (groups << shifts).sum(axis=-1).astype(np.uint8)
        header = struct.pack(">IIBBBBB", width, height, depth, 3, 0, 0, 0)
        chunks = [(b"IHDR", header), (b"PLTE", colours.astype(np.uint8).tobytes())]
    else:
        rows = pixels.reshape(height, -1)
        chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on each row
    stream = bytearray(b"\x78\x01")  # zlib header: deflate, 32K window, no dictionary
    for start in range(0, max(len(raw), 1), 65535):
        block = raw[start : start + 65535]
        final = start + 65535 >= len(raw)
        stream += struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF) + block
    stream += struct.pack(">I", zlib.adler32(raw))
    chunks += [(b"IDAT", bytes(stream)), (b"IEND", b"")]
    out = bytearray(b"\x89PNG\r\n\x1a\n")
    for kind, data in chunks:
        out += struct.pack(">I", len(data)) + kind + data
        out += struct.pack(">I", zlib.crc32(kind + data))
    return bytes(out)


def _jsonl(rows: Sequence[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


README = """\
# llava_bench_synthetic

A small benchmark in LLaVA-Bench's layout, made from llava_jax's synthetic shapes dataset by
`python -m llava_jax.evaluation.example_benchmark --out benchmarks/llava_bench_synthetic`
(generating again writes byte-identical files; do not edit them by hand).

- `questions.jsonl`: {n_questions} questions, one `conv`, one `detail` and one `complex` per image.
- `context.jsonl`: per image, in LLaVA-Bench COCO's form: `captions` (the synthetic caption
  and a second phrasing) and `instances` (`category`: the shape, `bbox`: [x1, y1, x2, y2] as
  fractions of the width and height).
- `answers_gpt4.jsonl`: reference answers written from the scenes (`model_id` "reference"),
  in the place of LLaVA-Bench's GPT-4 answers.
- `images/`: {n_images} PNGs of {size}x{size} pixels, the size the tiny model
  (`configs/tiny.py`) is trained on.
"""


def build(image_size: int = IMAGE_SIZE) -> dict[str, bytes]:
    """Every file of the benchmark: relative path -> bytes."""
    files: dict[str, bytes] = {}
    questions, contexts, answers = [], [], []
    for index, (scene, conv_kind, complex_kind) in enumerate(SCENES):
        name = f"{index + 1:03d}"
        image_name = f"{name}.png"
        rng = np.random.default_rng([SEED, index])
        layout = shape_layout(scene, image_size, copy.deepcopy(rng))
        image = synthetic.render_scene(scene, image_size, rng)
        checked_boxes(image, [box for _, box in layout])
        files[f"images/{image_name}"] = png_bytes(image)
        contexts.append(
            {
                "id": name,
                "image": image_name,
                "captions": captions(scene),
                "instances": [
                    {"category": scene.shape, "bbox": normalised_box(box, image_size)}
                    for _, box in layout
                ],
            }
        )
        cells = [cell for cell, _ in layout]
        texts = {
            "conv": conv_question(scene, conv_kind),
            "detail": (DETAIL_QUESTION, detail_answer(scene, cells)),
            "complex": complex_question(scene, complex_kind),
        }
        for category in CATEGORIES:
            question_id = len(questions)
            question, reference = texts[category]
            questions.append(
                {
                    "question_id": question_id,
                    "image": image_name,
                    "text": question,
                    "category": category,
                }
            )
            answers.append(
                {
                    "question_id": question_id,
                    "prompt": question,
                    "text": reference,
                    "answer_id": uuid.uuid5(ANSWER_NAMESPACE, f"{question_id}\n{reference}").hex,
                    "model_id": MODEL_ID,
                    "metadata": {},
                }
            )
    files["questions.jsonl"] = _jsonl(questions)
    files["context.jsonl"] = _jsonl(contexts)
    files["answers_gpt4.jsonl"] = _jsonl(answers)
    files["README.md"] = README.format(
        n_questions=len(questions), n_images=len(SCENES), size=image_size
    ).encode("utf-8")
    return files


def write(out_dir: str, image_size: int = IMAGE_SIZE) -> list[str]:
    """Writes the benchmark under ``out_dir`` (made if missing; files of the same names are
    replaced, others left alone); returns the relative paths written, sorted."""
    files = build(image_size)
    for relative, data in sorted(files.items()):
        path = os.path.join(out_dir, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return sorted(files)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.evaluation.example_benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="the benchmark folder to write")
    parser.add_argument(
        "--image-size", type=int, default=IMAGE_SIZE, help="side of the square images, pixels"
    )
    args = parser.parse_args(argv)
    if args.image_size < 12:
        parser.error(f"--image-size must be >= 12, got {args.image_size}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file, not a folder")
    written = write(args.out, args.image_size)
    print(json.dumps({"out": args.out, "files": len(written)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
