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

A file that cannot be read as a whole (missing, not UTF-8, a JSON list that does not parse,
is nested too deep or holds a number of more digits than Python reads) is a
``DataFileError`` naming the file; in a JSONL file such a line is one ``bad_json`` record.

What a preparation was made from (``source_of``: the JSON's absolute path and SHA-256, the
test JSON's, the image folder, ``on_bad_record``, the builder's version) is written beside
the shards (``SOURCE_FILE``); ``source_key`` of it names the prepared directory, so other
data never reuses it (``datasets.builder_for``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import tensorflow_datasets as tfds
from tqdm import tqdm

from llava_jax.data.conversation import (
    IMAGE_PLACEHOLDER,
    DroppedExample,
    check_roles,
    skip_leading_answer,
)
from llava_jax.data.datasets.record import Record, features
from llava_jax.data.image import (
    ImageDecodeError,
    ImageFileError,
    check_image_path,
    decode_image,
    read_image_file,
)
from llava_jax.errors import InputError
from llava_jax.json_input import JSONInputError, loads

PROBLEMS = (
    "bad_json",
    "missing_file",
    "outside_image_dir",
    "not_regular_file",
    "unreadable_image",
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


def check_record(record, image_dir: str) -> tuple[list[str], list[dict], Problem | None]:
    """Checks one record's structure and files (not the image contents).

    Returns the absolute image paths, the turns to keep (a leading ``gpt`` turn skipped, as
    LLaVA's ``preprocess_v1`` does) and the first problem found, if any.
    """
    if not isinstance(record, dict):
        return [], [], Problem("bad_json", "?", "", "record is not a JSON object")
    record_id = str(record.get("id", "?"))
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return [], [], Problem("bad_json", record_id, "", "`conversations` is not a list of turns")
    paths = _image_paths(record)
    if not all(isinstance(p, str) and p for p in paths):
        return [], [], Problem("bad_json", record_id, "", "`image` is not a path or list of paths")
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
        detail = f"{placeholders} <image> in the text, {len(paths)} image(s)"
        return [], [], Problem("image_count_mismatch", record_id, ",".join(paths), detail)
    full_paths = [os.path.join(image_dir, p) for p in paths]
    for path in full_paths:
        try:
            # containment first: a path outside the folder is refused unlooked-at
            check_image_path(path, image_dir)
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


def validate(
    json_path: str, image_dir: str, num_threads: int = 8, progress: bool = True
) -> tuple[list[Record], ValidationReport]:
    """Validates every record (images decoded fully) and returns the good ones, their
    images not yet read, and the report. Never raises for a bad record."""
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
        candidates.append((record_id, paths, turns))

    all_paths = sorted({p for _, paths, _ in candidates for p in paths})
    with ThreadPoolExecutor(num_threads) as pool:  # PIL decodes outside the GIL
        checks = tqdm(
            pool.map(lambda path: image_problem(path, image_dir), all_paths),
            total=len(all_paths),
            desc="Checking images",
            unit="img",
            disable=not (all_paths and progress),
        )
        unreadable = {path: why for path, why in zip(all_paths, checks, strict=True) if why}
    good = []
    for record_id, paths, turns in candidates:
        bad = [p for p in paths if p in unreadable]
        if bad:
            report.add(Problem("unreadable_image", record_id, bad[0], unreadable[bad[0]]))
            continue
        relative = tuple(os.path.relpath(p, image_dir) for p in paths)
        good.append(Record(record_id, (), relative, tuple(turns)))
    report.kept = len(good)
    return good, report


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime, inode, device) -> SHA-256


def file_sha256(path: str, field: str) -> str:
    """The SHA-256 of the file at `path`, read in chunks (a 1 GB JSON is not held in memory;
    it hashes at the disk's speed); remembered while the file's size, modification time and
    inode stay the same, so a run that opens its splits several times reads it once.
    `field` names the setting in errors."""
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
        if key not in _DIGESTS:
            digest = hashlib.sha256()
            with open(path, "rb") as file:  # (hashlib.file_digest is Python 3.11+)
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
            _DIGESTS[key] = digest.hexdigest()
    except OSError as error:
        raise DataFileError(
            f"config.data.{field}: {path}: cannot read: {error.strerror or error}"
        ) from None
    return _DIGESTS[key]


def source_of(
    json_path: str, image_dir: str, test_json_path: str | None, on_bad_record: str
) -> dict:
    """What a preparation's records depend on: each JSON's absolute path and content hash,
    the image folder (resolved), the bad-record policy and the builder's version. The
    tokenizer and template do not shape the prepared records (they are the length table's
    key)."""

    def path_and_hash(path: str | None, field: str) -> tuple[str | None, str | None]:
        if not path:
            return None, None
        path = os.path.abspath(os.path.expanduser(path))
        return path, file_sha256(path, field)

    json_abs, json_hash = path_and_hash(json_path, "json_path")
    test_abs, test_hash = path_and_hash(test_json_path, "test_json_path")
    return {
        "json_path": json_abs,
        "json_sha256": json_hash,
        "test_json_path": test_abs,
        "test_json_sha256": test_hash,
        "image_dir": os.path.realpath(os.path.expanduser(image_dir)),
        "on_bad_record": on_bad_record,
        "builder_version": BUILDER_VERSION,
    }


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
    ):
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', not {on_bad_record!r}")
        super().__init__(name=name, version=tfds.core.Version(BUILDER_VERSION))
        self.json_path, self.image_dir = json_path, image_dir
        self.test_json_path, self.on_bad_record = test_json_path, on_bad_record
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
        validated = {split: validate(path, config.image_dir) for split, path in sources.items()}
        if config.source is not None:  # the records read are the ones the key names
            for split, path in sources.items():
                field = "json_path" if split == "train" else "test_json_path"
                if file_sha256(path, field) != config.source[field.replace("path", "sha256")]:
                    raise DataFileError(f"{path} changed while it was being prepared; run again")
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
            images = []
            for path in record.image_paths:
                # the original bytes, never re-encoded; checked again, as when validated
                images.append(read_image_file(os.path.join(image_dir, path), image_dir))
            stored = dataclasses.replace(record, image_bytes=tuple(images))
            # ids are not guaranteed unique in LLaVA files; the index keeps keys unique
            yield f"{index:09d}-{record.id}", stored.to_example()
