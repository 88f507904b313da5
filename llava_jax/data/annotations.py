"""Image annotations (captions and object boxes) and the context LLaVA's data generation
shows a text-only LLM for an image.

Two inputs:

- COCO's own files: `captions_*.json` (images, annotations with `caption`) and optionally
  `instances_*.json` (images, annotations with `bbox` = [x, y, w, h] in pixels and
  `category_id`, categories with `name`). An image's file is its `images[].file_name`; its
  record id is the file name's stem (`000000033471`), as LLaVA-Instruct has it.
- JSONL, one image a line: `{"image": "a/b.jpg", "captions": ["…"], "boxes": [{"category":
  "dog", "bbox": [x, y, w, h]}], "width": W, "height": H, "id": "…"}`; `bbox` in pixels as
  COCO's; `boxes`, `width`/`height` (else read from the image file) and `id` (else the
  image's stem) may be left out.

The context (`render_context`), as in the LLaVA paper's Table 14: the captions one per line;
with boxes, a blank line, then one `category: [x1, y1, x2, y2]` a line, corners normalised
to 0–1 by the image's width and height, 3 decimals.

A bad annotation is skipped, named and counted (`ValidationReport`, reasons `SKIP_REASONS`):
the rest of its image is kept. An image whose file is not in the image folder, or that has no
usable caption left, is skipped whole. A file that cannot be read as a whole (missing, not
JSON, no `images` list) is an `AnnotationFileError` naming it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from llava_jax.data.datasets.llava_json import Problem, ValidationReport
from llava_jax.data.image import ImageFileError, check_image_path
from llava_jax.errors import InputError
from llava_jax.json_input import JSONInputError, loads

SKIP_REASONS = (
    "bad_json",  # a JSONL line that does not parse or is not an object
    "bad_image_entry",  # no file name, or a width/height that is not a positive integer
    "duplicate_image",  # the same image (file or COCO id) listed again
    "missing_image",  # the file is not in the image folder (the whole image)
    "unknown_image",  # an annotation's image_id names no image
    "caption_not_text",  # a caption that is not a non-empty string
    "unknown_category",  # a box's category_id names no category (or an empty name)
    "bad_box",  # a bbox that is not four finite numbers with width and height > 0
    "box_outside_image",  # a bbox reaching beyond the image by more than a pixel
    "no_image_size",  # boxes, but no width/height and no readable image to take them from
    "no_captions",  # nothing left to describe the image with (the whole image)
)
# COCO's boxes overshoot the image by a fraction of a pixel now and then (float rounding):
# within this they are clipped, beyond it the box is skipped.
OVERSHOOT_PX = 1.0


class AnnotationFileError(InputError):
    """An annotation file that cannot be read as a whole; the message names it."""


@dataclasses.dataclass(frozen=True)
class Box:
    """An object: its category name and its corners, normalised to 0–1."""

    category: str
    x1: float
    y1: float
    x2: float
    y2: float

    def render(self) -> str:
        return f"{self.category}: [{self.x1:.3f}, {self.y1:.3f}, {self.x2:.3f}, {self.y2:.3f}]"


@dataclasses.dataclass
class ImageAnnotations:
    """One image: `image` relative to the image folder, `id` for its LLaVA records."""

    id: str
    image: str
    captions: list[str] = dataclasses.field(default_factory=list)
    boxes: list[Box] = dataclasses.field(default_factory=list)


def render_context(annotations: ImageAnnotations, with_boxes: bool) -> str:
    """What the LLM reads for this image: captions, then (with_boxes) a blank line and boxes."""
    text = "\n".join(annotations.captions)
    if with_boxes and annotations.boxes:
        text += "\n\n" + "\n".join(box.render() for box in annotations.boxes)
    return text


def new_report(source: str) -> ValidationReport:
    return ValidationReport(source=source, kinds=SKIP_REASONS)


def _read_json(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return loads(f.read())
    except OSError as err:
        raise AnnotationFileError(f"{path}: cannot read: {err.strerror or err}") from None
    except JSONInputError as err:
        raise AnnotationFileError(f"{path}: not a JSON file this program can read: {err}") from None


def _caption(value: Any) -> str | None:
    """A caption on one line, or None when it is not text."""
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())  # COCO's captions carry stray newlines and spaces
    return text or None


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _box(bbox: Any, width: int, height: int) -> tuple[tuple[float, ...] | None, str, str]:
    """(normalised corners, '', '') or (None, reason, detail) for a pixel [x, y, w, h]."""
    if not (
        isinstance(bbox, (list, tuple))
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
        and all(math.isfinite(v) for v in bbox)
    ):
        return None, "bad_box", f"bbox {bbox!r} is not four numbers [x, y, w, h]"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, "bad_box", f"bbox {bbox!r} has a width or height <= 0"
    if (
        x < -OVERSHOOT_PX
        or y < -OVERSHOOT_PX
        or x + w > width + OVERSHOOT_PX
        or (y + h > height + OVERSHOOT_PX)
    ):
        return None, "box_outside_image", f"bbox {bbox!r} reaches beyond the {width}x{height} image"
    corners = (x / width, y / height, (x + w) / width, (y + h) / height)
    return tuple(min(1.0, max(0.0, c)) for c in corners), "", ""


def _image_file_problem(image: str, image_dir: str) -> str:
    """'' when `image` is a regular file inside `image_dir`, else why not."""
    path = os.path.join(image_dir, image)
    try:
        check_image_path(path, image_dir)
    except ImageFileError as err:
        return err.reason
    except FileNotFoundError:
        return f"no such file {path}"
    except (OSError, ValueError) as err:
        return f"{path}: {err}"
    return ""


def _stem(image: str) -> str:
    return os.path.splitext(os.path.basename(image))[0]


class _Collector:
    """Images in input order; skips named and counted in `report`."""

    def __init__(self, report: ValidationReport, image_dir: str):
        self.report = report
        self.image_dir = image_dir
        self.images: list[ImageAnnotations] = []

    def skip(self, reason: str, record_id: Any, file: str, detail: str) -> None:
        self.report.add(Problem(reason, str(record_id), file, detail))

    def finish(self) -> list[ImageAnnotations]:
        kept = []
        for image in self.images:
            problem = _image_file_problem(image.image, self.image_dir)
            if problem:
                self.skip("missing_image", image.id, image.image, problem)
            elif not image.captions:
                self.skip("no_captions", image.id, image.image, "no usable caption")
            else:
                kept.append(image)
        self.report.total = len(self.images)
        self.report.kept = len(kept)
        return kept


def read_coco(
    captions_path: str, instances_path: str | None, image_dir: str
) -> tuple[list[ImageAnnotations], ValidationReport]:
    """The images of COCO's captions file (in its order), with the boxes of its instances
    file when given. Returns the usable images and the report of what was skipped."""
    sources = [p for p in (captions_path, instances_path) if p]
    collector = _Collector(new_report(" + ".join(sources)), image_dir)
    by_id: dict[Any, tuple[ImageAnnotations, int, int]] = {}
    files: set[str] = set()

    captions = _read_json(captions_path)
    if not isinstance(captions, dict) or not isinstance(captions.get("images"), list):
        raise AnnotationFileError(f"{captions_path}: not a COCO annotation file (no 'images' list)")
    for index, entry in enumerate(captions["images"]):
        where = f"images[{index}]"
        if not isinstance(entry, dict):
            collector.skip("bad_image_entry", where, captions_path, "not an object")
            continue
        name, width, height = entry.get("file_name"), entry.get("width"), entry.get("height")
        if not (isinstance(name, str) and name and _is_size(width) and _is_size(height)):
            collector.skip(
                "bad_image_entry", entry.get("id", where), captions_path,
                f"{where} needs file_name and positive integer width and height",
            )  # fmt: skip
            continue
        key = entry.get("id")
        if key in by_id or name in files or isinstance(key, (dict, list)):
            collector.skip(
                "duplicate_image", key, captions_path, f"{where}: {name} (id {key}) is listed again"
            )
            continue
        image = ImageAnnotations(_stem(name), name)
        by_id[key] = (image, width, height)
        files.add(name)
        collector.images.append(image)

    def annotations_of(data: Any, path: str) -> list[Any]:
        found = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(found, list):
            raise AnnotationFileError(f"{path}: not a COCO annotation file (no 'annotations' list)")
        return found

    for index, note in enumerate(annotations_of(captions, captions_path)):
        where = f"annotations[{index}]"
        image_id = note.get("image_id") if isinstance(note, dict) else None
        if isinstance(image_id, (dict, list)) or image_id not in by_id:
            collector.skip("unknown_image", image_id, captions_path, f"{where}: no such image")
            continue
        image = by_id[image_id][0]
        text = _caption(note.get("caption"))
        if text is None:
            collector.skip(
                "caption_not_text", image.id, captions_path,
                f"{where}: caption {note.get('caption')!r} is not text",
            )  # fmt: skip
            continue
        image.captions.append(text)

    if instances_path:
        instances = _read_json(instances_path)
        notes = annotations_of(instances, instances_path)
        categories = {}
        for category in instances.get("categories") or []:
            if isinstance(category, dict) and isinstance(category.get("name"), str):
                name = " ".join(category["name"].split())
                if name and not isinstance(category.get("id"), (dict, list)):
                    categories[category.get("id")] = name
        for index, note in enumerate(notes):
            where = f"annotations[{index}]"
            image_id = note.get("image_id") if isinstance(note, dict) else None
            if isinstance(image_id, (dict, list)) or image_id not in by_id:
                collector.skip("unknown_image", image_id, instances_path, f"{where}: no such image")
                continue
            image, width, height = by_id[image_id]
            category_id = note.get("category_id")
            if isinstance(category_id, (dict, list)) or category_id not in categories:
                collector.skip(
                    "unknown_category", image.id, instances_path,
                    f"{where}: category_id {category_id!r} names no category",
                )  # fmt: skip
                continue
            corners, reason, detail = _box(note.get("bbox"), width, height)
            if corners is None:
                collector.skip(reason, image.id, instances_path, f"{where}: {detail}")
                continue
            image.boxes.append(Box(categories[category_id], *corners))
    return collector.finish(), collector.report


def _size_from_file(image: str, image_dir: str) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(os.path.join(image_dir, image)) as opened:  # the header only
            return opened.size
    except Exception:  # noqa: BLE001 - any unreadable file: the size is unknown
        return None


def read_jsonl(path: str, image_dir: str) -> tuple[list[ImageAnnotations], ValidationReport]:
    """The images of an annotation JSONL (see the module docstring), in file order."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except OSError as err:
        raise AnnotationFileError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise AnnotationFileError(f"{path}: not UTF-8 text ({err.reason})") from None
    collector = _Collector(new_report(path), image_dir)
    files: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            entry = loads(line)
        except JSONInputError as err:
            collector.skip("bad_json", where, path, str(err))
            continue
        if not isinstance(entry, dict):
            collector.skip("bad_json", where, path, "not a JSON object")
            continue
        name = entry.get("image")
        record_id = entry.get("id", _stem(name) if isinstance(name, str) and name else where)
        if not (isinstance(name, str) and name) or not isinstance(record_id, (str, int)):
            collector.skip("bad_image_entry", where, path, "needs 'image' (a path) and a text id")
            continue
        if name in files:
            collector.skip("duplicate_image", record_id, path, f"{where}: {name} is listed again")
            continue
        files.add(name)
        image = ImageAnnotations(str(record_id), name)
        collector.images.append(image)
        raw_captions = entry.get("captions")
        if not isinstance(raw_captions, list):
            raw_captions = [raw_captions]
        for k, value in enumerate(raw_captions):
            text = _caption(value)
            if text is None:
                detail = f"{where}: captions[{k}] {value!r} is not text"
                collector.skip("caption_not_text", image.id, path, detail)
            else:
                image.captions.append(text)
        boxes = entry.get("boxes") or []
        if not isinstance(boxes, list):
            collector.skip("bad_box", image.id, path, f"{where}: 'boxes' is not a list")
            continue
        if not boxes:
            continue
        width, height = entry.get("width"), entry.get("height")
        if not (_is_size(width) and _is_size(height)):
            size = _size_from_file(name, image_dir)
            if size is None:
                detail = f"{where}: no width/height, and {name} cannot be read for them"
                for _ in boxes:
                    collector.skip("no_image_size", image.id, path, detail)
                continue
            width, height = size
        for k, box in enumerate(boxes):
            category = box.get("category") if isinstance(box, dict) else None
            category = " ".join(category.split()) if isinstance(category, str) else ""
            if not category:
                detail = f"{where}: boxes[{k}] has no category name"
                collector.skip("unknown_category", image.id, path, detail)
                continue
            corners, reason, detail = _box(box.get("bbox"), width, height)
            if corners is None:
                collector.skip(reason, image.id, path, f"{where}: boxes[{k}]: {detail}")
                continue
            image.boxes.append(Box(category, *corners))
    return collector.finish(), collector.report


def read_annotations(
    *, captions: str | None, instances: str | None, jsonl: str | None, image_dir: str
) -> tuple[list[ImageAnnotations], ValidationReport]:
    """COCO files (`captions`, optional `instances`) or an annotation JSONL."""
    if jsonl:
        if captions or instances:
            raise InputError(
                "give --annotations (JSONL) or COCO's --captions/--instances, not both"
            )
        return read_jsonl(jsonl, image_dir)
    if not captions:
        raise InputError(
            "no annotations: give --captions (COCO captions_*.json, with --instances for "
            "boxes) or --annotations (JSONL)"
        )
    return read_coco(captions, instances, image_dir)
