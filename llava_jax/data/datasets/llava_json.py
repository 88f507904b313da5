"""``llava_json``: LLaVA-format JSON (a list) or JSONL plus an image folder.

Each record: ``id``, ``image`` (a path relative to the image folder, a list of paths,
or absent for text-only samples as in mix665k), ``conversations``
``[{"from": "human"|"gpt", "value": str}, ...]``. Records are validated while
preparing; the report counts problems by kind. An image path must name a regular file
inside the image folder once symlinks are resolved: ``../x.png``, ``/abs/x.png``, a link
out of the folder (``outside_image_dir``) or a FIFO, directory or device
(``not_regular_file``) drop the record, and nothing outside the folder is read. Policy
``on_bad_record``: ``error`` stops before anything is written, listing the first
offending ids and files; ``skip`` leaves them out and reports how many of each.

A LLaVA-Video record has ``video`` instead of ``image``: a video file, or a folder of frame
images, relative to the image folder and checked as image paths are (inside the folder once
resolved; a regular file or a folder, each frame inside too), written in the text as ONE
``<image>`` (LLaVA-NeXT's train.py reads a video as an image of several frames). Its
``video_frames`` frames (``data/video.py`` ``read_video``: uniform sampling) are read while
preparing and stored as the record's images, one lossless PNG each at the video's own size,
marked as one video's frames (``record.py`` ``video_frame_path``). A record with both
fields is ``bad_json``; a video that cannot be read, or has fewer frames than asked, is
``unreadable_video`` (the path and why); another count of ``<image>`` than one is
``image_count_mismatch``. A video is decoded twice, once to check it and once to store it:
a check keeping every frame in memory would not scale to LLaVA-Video-178K.

A file that cannot be read as a whole (missing, not UTF-8, a JSON list that does not parse,
is nested too deep or holds a number of more digits than Python reads) is a
``DataFileError`` naming the file; in a JSONL file such a line is one ``bad_json`` record.

What a preparation was made from (``source_of``: the JSON's absolute path and SHA-256, the
test JSON's, the image folder, ``on_bad_record``, the builder's version, and
``video_frames`` when a JSON has videos) is written beside
the shards (``SOURCE_FILE``); ``source_key`` of it names the prepared directory, so other
data never reuses it (``datasets.builder_for``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor

import tensorflow_datasets as tfds
from PIL import Image
from tqdm import tqdm

from llava_jax.data.conversation import (
    IMAGE_PLACEHOLDER,
    DroppedExample,
    check_roles,
    skip_leading_answer,
)
from llava_jax.data.datasets.record import (
    VIDEO_FRAME_PATH,
    Record,
    features,
    video_frame_path,
)
from llava_jax.data.image import (
    ImageDecodeError,
    ImageFileError,
    check_image_path,
    decode_image,
    read_image_file,
)
from llava_jax.data.video import frame_files, read_video
from llava_jax.errors import InputError
from llava_jax.json_input import JSONInputError, loads

PROBLEMS = (
    "bad_json",
    "missing_file",
    "outside_image_dir",
    "not_regular_file",
    "unreadable_image",
    "unreadable_video",
    "roles_out_of_order",
    "image_count_mismatch",
    "empty_turn",
)
# Kept, but changed as LLaVA changes them before training.
ADJUSTMENTS = ("leading_gpt_turn_skipped",)
REPORT_FILE = "validation_report.json"
SOURCE_FILE = "llava_jax_source.json"  # what the prepared records were made from
BUILDER_VERSION = "1.0.0"


class DataFileError(InputError, ValueError):
    """A data file that cannot be read as a whole; the message names the file."""


@dataclasses.dataclass
class Problem:
    kind: str
    record_id: str
    file: str
    detail: str

    def __str__(self) -> str:
        where = f" file {self.file}" if self.file else ""
        return f"{self.kind}: record {self.record_id}{where}: {self.detail}"


@dataclasses.dataclass
class ValidationReport:
    """Counts of problems by kind, and the first few examples of each."""

    source: str
    total: int = 0
    kept: int = 0
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[Problem] = dataclasses.field(default_factory=list)
    max_examples_per_kind: int = 5
    # kept records changed as LLaVA changes them (`ADJUSTMENTS`), and a few of their ids
    adjusted: dict[str, int] = dataclasses.field(default_factory=dict)
    adjusted_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    kinds: tuple[str, ...] = PROBLEMS  # the problems there are, in the order reported

    def adjust(self, kind: str, record_id: str) -> None:
        seen = self.adjusted.get(kind, 0)
        self.adjusted[kind] = seen + 1
        if seen < self.max_examples_per_kind:
            self.adjusted_examples.setdefault(kind, []).append(record_id)

    def add(self, problem: Problem) -> None:
        seen = self.counts.get(problem.kind, 0)
        self.counts[problem.kind] = seen + 1
        if seen < self.max_examples_per_kind:
            self.examples.append(problem)

    @property
    def dropped(self) -> int:
        return self.total - self.kept

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "total": self.total,
            "kept": self.kept,
            "dropped": self.dropped,
            "counts": {kind: self.counts[kind] for kind in self.kinds if kind in self.counts},
            "examples": [dataclasses.asdict(p) for p in self.examples],
            "adjusted": dict(self.adjusted),
            "adjusted_examples": dict(self.adjusted_examples),
        }

    def summary(self) -> str:
        lines = [f"{self.source}: {self.total} records, {self.kept} kept, {self.dropped} bad"]
        lines += [f"  {kind}: {self.counts[kind]}" for kind in self.kinds if kind in self.counts]
        for kind, count in self.adjusted.items():
            ids = ", ".join(self.adjusted_examples.get(kind, []))
            lines.append(f"  kept with {kind} (as LLaVA does): {count}, e.g. {ids}")
        if self.examples:
            lines.append("  first problems:")
            lines += [f"    {problem}" for problem in self.examples]
        return "\n".join(lines)


class BadRecordsError(ValueError):
    """Raised under ``on_bad_record='error'``; carries the report."""

    def __init__(self, report: ValidationReport):
        super().__init__(
            "Bad records found (on_bad_record='error'; use 'skip' to leave them out):\n"
            + report.summary()
        )
        self.report = report


def read_raw_records(path: str) -> list[tuple[str, dict | None, str]]:
    """``(fallback id, record or None, problem detail)`` for each record of a JSON list
    or a JSONL file; a JSONL line that does not parse becomes ``(line id, None, why)``.

    Raises `DataFileError` naming `path` when the file cannot be read, is not UTF-8, or is a
    JSON list that cannot be parsed (malformed, nested too deep, a number too long)."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as error:
        raise DataFileError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    except OSError as error:
        raise DataFileError(f"{path}: cannot read: {error.strerror or error}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = loads(text)
        except JSONInputError as error:
            raise DataFileError(f"{path}: not a JSON list this program can read: {error}") from None
        return [(f"#{i}", item, "") for i, item in enumerate(items)]
    out = []
    # Lines end at "\n" only: a JSON string may hold U+2028 or U+0085 unescaped, which
    # `str.splitlines` would take for line ends, cutting one record in two.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {number}", loads(line), ""))
        except JSONInputError as error:
            out.append((f"line {number}", None, f"{path}:{number}: {error}"))
    return out


def _image_paths(record: dict) -> list[str]:
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def is_video_record(record) -> bool:
    """Whether a raw JSON record is LLaVA-Video's: a ``video`` field (not null)."""
    return isinstance(record, dict) and record.get("video") is not None


def check_video_path(path: str, image_dir: str) -> str:
    """The resolved path of the video ``path``, checked as an image path is (inside
    ``image_dir`` once resolved) but a folder of frames allowed too. Raises
    ``ImageFileError`` (``outside_image_dir``, ``not_regular_file``) or ``OSError``."""
    try:
        return check_image_path(path, image_dir)
    except ImageFileError as error:
        resolved = os.path.realpath(path)
        if error.kind == "not_regular_file" and os.path.isdir(resolved):
            return resolved
        raise


def check_record(record, image_dir: str) -> tuple[list[str], list[dict], Problem | None]:
    """Checks one record's structure and files (not the image or video contents).

    Returns the absolute image paths (a video record: its one video), the turns to keep (a
    leading ``gpt`` turn skipped, as LLaVA's ``preprocess_v1`` does) and the first problem
    found, if any.
    """
    if not isinstance(record, dict):
        return [], [], Problem("bad_json", "?", "", "record is not a JSON object")
    record_id = str(record.get("id", "?"))
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return [], [], Problem("bad_json", record_id, "", "`conversations` is not a list of turns")
    video = is_video_record(record)
    if video and record.get("image") is not None:
        detail = "a record has `image` or `video`, not both"
        return [], [], Problem("bad_json", record_id, "", detail)
    if video and not (isinstance(record["video"], str) and record["video"]):
        return [], [], Problem("bad_json", record_id, "", "`video` is not a path")
    paths = [record["video"]] if video else _image_paths(record)
    if not all(isinstance(p, str) and p for p in paths):
        return [], [], Problem("bad_json", record_id, "", "`image` is not a path or list of paths")
    if not video and any(VIDEO_FRAME_PATH.fullmatch(p) for p in paths):
        # stored video frames are marked so (record.py): an image may not look like one
        detail = "an `image` path ends like a stored video frame (#frame=N): rename it"
        return [], [], Problem("bad_json", record_id, ",".join(paths), detail)
    turns = skip_leading_answer(turns)
    try:
        check_roles(turns)
        for index, turn in enumerate(turns):
            if not isinstance(turn.get("value"), str) or not turn["value"].strip():
                raise DroppedExample("empty_turn", f"turn {index} is empty")
    except DroppedExample as error:
        return [], [], Problem(error.reason, record_id, "", error.detail)
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != len(paths):
        what = "one video (written as one <image>)" if video else f"{len(paths)} image(s)"
        detail = f"{placeholders} <image> in the text, {what}"
        return [], [], Problem("image_count_mismatch", record_id, ",".join(paths), detail)
    full_paths = [os.path.join(image_dir, p) for p in paths]
    for path in full_paths:
        try:
            # containment first: a path outside the folder is refused unlooked-at
            (check_video_path if video else check_image_path)(path, image_dir)
        except ImageFileError as error:
            return [], [], Problem(error.kind, record_id, path, error.reason)
        except FileNotFoundError:
            return [], [], Problem("missing_file", record_id, path, "no such file")
        except (OSError, ValueError) as error:  # e.g. a path through a file, a NUL byte
            return [], [], Problem("missing_file", record_id, path, str(error))
    return full_paths, turns, None


def image_problem(path: str, image_dir: str) -> str:
    """'' if the image at ``path`` decodes fully, else why not."""
    try:
        decode_image(read_image_file(path, image_dir))
    except (OSError, ImageDecodeError, ImageFileError) as error:
        return str(error)
    return ""


def read_video_frames(path: str, image_dir: str, num_frames: int) -> list[Image.Image]:
    """`num_frames` RGB frames sampled uniformly from the video file or frame folder at
    `path` (`data/video.py` `read_video`), which must lie inside `image_dir`, as must each
    frame file of a folder. Raises `InputError` (unreadable, too few frames: naming the
    path), `ImageFileError` (outside the folder, not a file or folder) or `OSError`."""
    resolved = check_video_path(path, image_dir)
    if os.path.isdir(resolved):
        for frame in frame_files(resolved):  # a frame linked out of the folder is refused
            check_image_path(frame, image_dir)
    return read_video(resolved, num_frames)


def png_bytes(frame: Image.Image) -> bytes:
    """A video frame stored losslessly (PNG)."""
    buffer = io.BytesIO()
    frame.save(buffer, format="PNG")
    return buffer.getvalue()


def video_problem(path: str, image_dir: str, num_frames: int) -> tuple[str, str]:
    """`('', '')` if `num_frames` frames of the video at `path` read, else the problem's
    kind and why (the reason `read_video` gives, naming the path)."""
    try:
        read_video_frames(path, image_dir, num_frames)
    except ImageFileError as error:
        return error.kind, str(error)
    except FileNotFoundError:  # gone since it was checked
        return "missing_file", "no such file"
    except (InputError, OSError, ValueError) as error:
        return "unreadable_video", str(error)
    return "", ""


def validate(
    json_path: str,
    image_dir: str,
    num_threads: int = 8,
    progress: bool = True,
    video_frames: int = 8,  # DataConfig.video_frames' default
) -> tuple[list[Record], ValidationReport]:
    """Validates every record (images decoded fully; `video_frames` frames of each video
    read) and returns the good ones, their images not yet read (a video's frames marked in
    `image_paths`, `video_frame_path`), and the report. Never raises for a bad record."""
    raw = read_raw_records(json_path)
    report = ValidationReport(source=json_path, total=len(raw))
    candidates = []
    for fallback_id, record, parse_error in raw:
        if record is None:
            report.add(Problem("bad_json", fallback_id, json_path, parse_error))
            continue
        paths, turns, problem = check_record(record, image_dir)
        if problem is not None:
            if problem.record_id == "?":
                problem.record_id = fallback_id
            report.add(problem)
            continue
        record_id = str(record.get("id", fallback_id))
        if len(turns) < len(record["conversations"]):
            report.adjust("leading_gpt_turn_skipped", record_id)
        candidates.append((record_id, paths, turns, is_video_record(record)))

    all_paths = sorted({p for _, paths, _, video in candidates if not video for p in paths})
    all_videos = sorted({p for _, paths, _, video in candidates if video for p in paths})
    with ThreadPoolExecutor(num_threads) as pool:  # PIL and FFmpeg decode outside the GIL
        checks = tqdm(
            pool.map(lambda path: image_problem(path, image_dir), all_paths),
            total=len(all_paths),
            desc="Checking images",
            unit="img",
            disable=not (all_paths and progress),
        )
        unreadable = {  # (path, is a video) -> (kind, why)
            (path, False): ("unreadable_image", why)
            for path, why in zip(all_paths, checks, strict=True)
            if why
        }
        video_checks = tqdm(
            pool.map(lambda path: video_problem(path, image_dir, video_frames), all_videos),
            total=len(all_videos),
            desc="Checking videos",
            unit="video",
            disable=not (all_videos and progress),
        )
        unreadable.update(
            ((path, True), why)
            for path, why in zip(all_videos, video_checks, strict=True)
            if why[0]
        )
    good = []
    for record_id, paths, turns, video in candidates:
        bad = [p for p in paths if (p, video) in unreadable]
        if bad:
            kind, why = unreadable[bad[0], video]
            report.add(Problem(kind, record_id, bad[0], why))
            continue
        relative = tuple(os.path.relpath(p, image_dir) for p in paths)
        if video:  # frame k of the video's sample, read when the record is written
            relative = tuple(video_frame_path(relative[0], k) for k in range(video_frames))
        good.append(Record(record_id, (), relative, tuple(turns)))
    report.kept = len(good)
    return good, report


# (path, size, mtime, inode, device) -> (SHA-256, whether the bytes hold `"video"`)
_DIGESTS: dict[tuple, tuple[str, bool]] = {}
VIDEO_KEY = b'"video"'  # how a JSON writes a LLaVA-Video record's key


def _file_facts(path: str, field: str) -> tuple[str, bool]:
    """The SHA-256 of the file at `path`, and whether it holds `"video"` (a video record's
    key, or a false alarm that costs nothing), read in chunks (a 1 GB JSON is not held in
    memory; it hashes at the disk's speed); remembered while the file's size, modification
    time and inode stay the same, so a run that opens its splits several times reads it
    once. `field` names the setting in errors."""
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
        if key not in _DIGESTS:
            digest, mentions_video, tail = hashlib.sha256(), False, b""
            with open(path, "rb") as file:  # (hashlib.file_digest is Python 3.11+)
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
                    # the last bytes of the previous block: a key cut in two is still found
                    mentions_video = mentions_video or VIDEO_KEY in tail + block
                    tail = block[-len(VIDEO_KEY) :]
            _DIGESTS[key] = digest.hexdigest(), mentions_video
    except OSError as error:
        raise DataFileError(
            f"config.data.{field}: {path}: cannot read: {error.strerror or error}"
        ) from None
    return _DIGESTS[key]


def file_sha256(path: str, field: str) -> str:
    """The SHA-256 of the file at `path` (`_file_facts`); `field` names the setting in
    errors."""
    return _file_facts(path, field)[0]


def source_of(
    json_path: str,
    image_dir: str,
    test_json_path: str | None,
    on_bad_record: str,
    video_frames: int,
) -> dict:
    """What a preparation's records depend on: each JSON's absolute path and content hash,
    the image folder (resolved), the bad-record policy, the builder's version, and
    `video_frames` (the frames stored of each video) when a JSON may hold videos (it
    writes `"video"`; a JSON without stays keyed as before videos were read, so data
    prepared then is not prepared again). The tokenizer and template do not shape the
    prepared records (they are the length table's key)."""
    mentions_video = False

    def path_and_hash(path: str | None, field: str) -> tuple[str | None, str | None]:
        nonlocal mentions_video
        if not path:
            return None, None
        path = os.path.abspath(os.path.expanduser(path))
        digest, video = _file_facts(path, field)
        mentions_video = mentions_video or video
        return path, digest

    json_abs, json_hash = path_and_hash(json_path, "json_path")
    test_abs, test_hash = path_and_hash(test_json_path, "test_json_path")
    source = {
        "json_path": json_abs,
        "json_sha256": json_hash,
        "test_json_path": test_abs,
        "test_json_sha256": test_hash,
        "image_dir": os.path.realpath(os.path.expanduser(image_dir)),
        "on_bad_record": on_bad_record,
        "builder_version": BUILDER_VERSION,
    }
    if mentions_video:
        source["video_frames"] = video_frames
    return source


def source_key(source: dict) -> str:
    """A short hash of `source_of`'s answer: the prepared directory's suffix."""
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]


def source_changes(saved: dict, current: dict) -> list[str]:
    """What differs between two `source_of` answers, each as `key: was A, now B`."""
    return [
        f"{key}: was {saved.get(key)!r}, now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


class LlavaJsonConfig(tfds.core.BuilderConfig):
    """One LLaVA JSON/JSONL file (``train``, and optionally ``test``) + its image folder."""

    def __init__(
        self,
        *,
        name: str,
        json_path: str,
        image_dir: str,
        test_json_path: str | None = None,
        on_bad_record: str = "error",
        source: dict | None = None,
        video_frames: int = 8,  # DataConfig.video_frames' default
    ):
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', not {on_bad_record!r}")
        super().__init__(name=name, version=tfds.core.Version(BUILDER_VERSION))
        self.json_path, self.image_dir = json_path, image_dir
        self.test_json_path, self.on_bad_record = test_json_path, on_bad_record
        self.video_frames = video_frames  # frames stored of each video
        # `source_of` these settings: written beside the shards, checked when reused
        self.source = source


class LlavaJson(tfds.core.GeneratorBasedBuilder):
    """LLaVA-format conversations with the original image bytes."""

    # Nothing is downloaded, so no checksums file; TFDS 4.9's lookup of one next to the
    # code needs `importlib_resources`, which it does not install on Python >= 3.9.
    code_path = None

    VERSION = tfds.core.Version(BUILDER_VERSION)
    BUILDER_CONFIGS = []  # always built from an explicit LlavaJsonConfig

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features())

    def _split_generators(self, dl_manager):
        del dl_manager
        config = self.builder_config
        sources = {"train": config.json_path}
        if config.test_json_path:
            sources["test"] = config.test_json_path
        validated = {
            split: validate(path, config.image_dir, video_frames=config.video_frames)
            for split, path in sources.items()
        }
        if config.source is not None:  # the records read are the ones the key names
            for split, path in sources.items():
                field = "json_path" if split == "train" else "test_json_path"
                if file_sha256(path, field) != config.source[field.replace("path", "sha256")]:
                    raise DataFileError(f"{path} changed while it was being prepared; run again")
            has_video = any(r.is_video for records, _ in validated.values() for r in records)
            if has_video and "video_frames" not in config.source:
                raise DataFileError(  # the key would not follow data.video_frames
                    f"{config.json_path}: a record's `video` key is written with escapes "
                    f"(not as {VIDEO_KEY.decode()}); write it plainly"
                )
        reports = {split: report for split, (_, report) in validated.items()}
        self.validation_reports = reports
        for report in reports.values():
            if report.dropped and config.on_bad_record == "error":
                raise BadRecordsError(report)  # before anything is written
            print(report.summary())
        os.makedirs(self.data_dir, exist_ok=True)
        with open(os.path.join(self.data_dir, REPORT_FILE), "w") as file:
            json.dump({s: r.to_json() for s, r in reports.items()}, file, indent=2)
        if config.source is not None:
            # in TFDS's temporary folder: it appears with the shards, or not at all
            with open(os.path.join(self.data_dir, SOURCE_FILE), "w") as file:
                json.dump(config.source, file, indent=2)
        return {
            split: self._generate_examples(records) for split, (records, _) in validated.items()
        }

    def _generate_examples(self, records: list[Record]):
        image_dir = self.builder_config.image_dir
        for index, record in enumerate(records):
            if record.is_video:  # its sampled frames, read again as when validated
                path = os.path.join(image_dir, record.video_source)
                frames = read_video_frames(path, image_dir, len(record.image_paths))
                images = [png_bytes(frame) for frame in frames]
            else:  # the original bytes, never re-encoded; checked again, as when validated
                images = [
                    read_image_file(os.path.join(image_dir, path), image_dir)
                    for path in record.image_paths
                ]
            stored = dataclasses.replace(record, image_bytes=tuple(images))
            # ids are not guaranteed unique in LLaVA files; the index keeps keys unique
            yield f"{index:09d}-{record.id}", stored.to_example()
