"""Batch inference on LLaVA's benchmark question format (`llava/eval/model_vqa*.py`).

Questions file, one JSON object per line::

    {"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": "What is ...?",
     "category": "adversarial"}

`image` is relative to the image folder (and optional: a text-only question), or a list of
such names for a question about several images (each gets its `<image>\\n` in front, in
order, unless the text writes `<image>` once for each; a LLaVA-OneVision model sees each
as one tile); `category` is optional. Answers, one per question and in the questions'
order, in LLaVA's format::

    {"question_id": 1, "prompt": "What is ...?", "text": "A dog.", "answer_id": "…",
     "model_id": "llava-tiny", "metadata": {}}

(`metadata` carries `category` when the question has one.) A question whose image is
missing or unreadable, whose prompt does not fit the model's context, whose text is not
valid Unicode (a lone surrogate such as JSON's "\\ud800", or bytes that are not UTF-8), or
that writes `<image>` more often than it has images (a question with an image may place
it with one `<image>`; a text-only question may not have one) gets the same entry with
`"text": ""` and an `"error"` naming the cause; the run goes on, and the scorers count it
as wrong. A malformed questions file (a line that is not a JSON object, lacks
`question_id` or `text`, or repeats a `question_id`) is refused before any generation,
with a `QuestionFileError` naming the file and the line.

`evaluate_file` writes each answer as soon as it is produced (a line, flushed) to
`OUT.partial` beside the output and renames it to `OUT` at the end: a run cut short never
leaves a truncated `OUT`, and its answers so far are in `OUT.partial`. It refuses an `OUT`
that is the questions file (`OutputFileError`).

Batches: questions are taken in file order, `batch_size` with a readable image at a time,
and every batch is padded to `batch_size` rows or the number of questions if fewer (by the
generator), so one compiled program serves them all and a `--batch-size` larger than the
file allocates for the questions there are; prompts share compilations through length
buckets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any

import numpy as np

from llava_jax.errors import ArgumentError, InputError, Named
from llava_jax.evaluation.jsonl import read_records
from llava_jax.inference.engine import Engine
from llava_jax.inference.load import LoadedModel, Media
from llava_jax.inference.prompting import Turn, prepare_prompt
from llava_jax.inference.sampling import SamplingConfig


class QuestionFileError(InputError):
    """The questions file cannot be used; the message names the file and the line."""


class OutputFileError(ArgumentError):
    """The answers cannot be written where asked: an `ArgumentError` about `out_path`,
    whose message names the path (`say`: as `ArgumentError`'s)."""

    def __init__(self, say: Callable[[Named], str]) -> None:
        super().__init__("out_path", say)


PARTIAL_SUFFIX = ".partial"  # the answers file while it is being written


def check_output_path(questions_path: str, out_path: str) -> None:
    """Raises `OutputFileError` (about `out_path`; `evaluate` says `--out`) when `out_path`
    (or its `.partial`) is the questions file, under any spelling (a relative path, `..`, a
    symbolic or hard link), is a folder, or lies in a folder that is a file."""
    for path in (out_path, out_path + PARTIAL_SUFFIX):
        same = os.path.realpath(path) == os.path.realpath(questions_path)
        if not same and os.path.exists(path) and os.path.exists(questions_path):
            same = os.path.samefile(path, questions_path)
        if same:
            what = "" if path == out_path else f" (its file in progress, {path})"
            raise OutputFileError(
                lambda arg, what=what: (
                    f"{arg(out_path)}{what} is the questions file {questions_path}: "
                    f"the answers would replace the questions; choose another {arg}"
                )
            )
    if os.path.isdir(out_path):
        raise OutputFileError(
            lambda arg: f"{arg(out_path)} is a folder; give the answers file's path"
        )
    parent = os.path.dirname(os.path.abspath(out_path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise OutputFileError(lambda arg: f"{arg(out_path)}: {parent} is a file, not a folder")
    if parent and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFileError(
            lambda arg: f"{arg(out_path)}: cannot write in {parent} (permission denied)"
        )


@dataclasses.dataclass(frozen=True)
class Question:
    """One line of a questions file (`line`: its 1-based line number). image: a file name,
    a tuple of them (several images), or None."""

    question_id: Any
    text: str
    image: str | tuple[str, ...] | None
    category: str | None
    line: int

    @property
    def image_files(self) -> tuple[str, ...]:
        """The question's image file names, in order (none for a text-only question)."""
        if self.image is None:
            return ()
        return (self.image,) if isinstance(self.image, str) else tuple(self.image)


def read_questions(path: str) -> list[Question]:
    """Every question of a LLaVA questions JSONL file; blank lines are skipped.

    Raises `QuestionFileError` naming `path:line` for a line that is not a JSON object, a
    missing or non-string `text`, a missing `question_id`, an `image` that is neither a
    string nor a non-empty list of strings, or a `question_id` seen before.
    """
    if not os.path.exists(path):
        raise QuestionFileError(f"questions file not found: {path}")
    questions, seen = [], {}
    # Bytes that are not UTF-8 stay in the text as lone surrogates: that question gets an
    # error entry, the others their answers.
    for number, obj in read_records(path, QuestionFileError, errors="surrogateescape"):
        where = f"{path}:{number}"
        if not isinstance(obj.get("text"), str):
            raise QuestionFileError(f"{where}: 'text' must be a string")
        image = obj.get("image")
        if isinstance(image, list):
            if not image or not all(isinstance(name, str) and name for name in image):
                raise QuestionFileError(
                    f"{where}: 'image' must be a file name or a non-empty list of file names"
                )
            image = tuple(image)
        elif image is not None and not isinstance(image, str):
            raise QuestionFileError(
                f"{where}: 'image' must be a file name or a non-empty list of file names"
            )
        key = str(obj["question_id"])  # 1 and "1" name the same question, as in the scorers
        if key in seen:
            raise QuestionFileError(
                f"{where}: duplicate question_id {obj['question_id']!r} (first on line {seen[key]})"
            )
        seen[key] = number
        category = obj.get("category")
        questions.append(
            Question(
                question_id=obj["question_id"],
                text=obj["text"],
                image=image or None,
                category=None if category is None else str(category),
                line=number,
            )
        )
    return questions


@dataclasses.dataclass
class _Prepared:
    """A question ready for the model: prompt `int32[L]`, its images as the prompt shows
    them (none for a text-only question)."""

    question: Question
    prompt_ids: np.ndarray
    images: tuple[Media, ...]

    @property
    def image(self) -> Media | None:
        """The first image, or None (a question of one image: its image)."""
        return self.images[0] if self.images else None

    def slots(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The image slots its images fill, in order: tiles float32[I, T, H, W, 3] and
        layouts int32[I, *layout_shape]; (None, None) for a text-only question."""
        filled = [slot for item in self.images for slot in item.slots]
        if not filled:
            return None, None
        return np.stack([p for p, _ in filled]), np.stack([layout for _, layout in filled])


def _entry(question: Question, model_id: str, text: str = "", error: str | None = None) -> dict:
    metadata = {} if question.category is None else {"category": question.category}
    entry = {
        "question_id": question.question_id,
        "prompt": question.text,
        "text": text,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": metadata,
    }
    if error is not None:
        entry["error"] = error
    return entry


def _prepare(
    model: LoadedModel, question: Question, image_dir: str, max_new_tokens: int
) -> _Prepared:
    """Raises `InputError` (image missing, unreadable, not a regular file or outside
    `image_dir`, prompt too long) naming the cause; an image error names the question.

    The image paths are the question's, under `image_dir`; `../x.png`, `/abs/x.png` or a
    symlink that resolves outside the folder is refused, never opened.
    """
    images = []
    for name in question.image_files:
        path = os.path.join(image_dir, name)
        try:
            images.append(model.load_image(path, root=image_dir))
        except InputError as err:
            where = f"question {question.question_id!r} (line {question.line})"
            raise InputError(f"{where}: {err}") from None
    count = len(images)
    turn = Turn("user", question.text, with_image=count)
    # the whole answer must fit: a batch's rows share one sampling config
    prompt = prepare_prompt(model, [turn], images, max_new_tokens=max_new_tokens, clamp=False)
    return _Prepared(question, prompt.ids, prompt.images)


def generate_answers(
    engine: Engine,
    params: Any,
    prompts: Sequence[np.ndarray],
    images: Sequence[np.ndarray | None],
    image_masks: Sequence[np.ndarray | None],
    sampling: SamplingConfig,
    *,
    batch_size: int,
    image_slots: tuple[int, ...],
    length: int | None = None,
    image_layouts: Sequence[np.ndarray | None],
    batch_rows: int | None = None,
) -> list[str]:
    """Answers to `prompts` (int32[L] each) about their `images` (float32[I', T, H, W, 3],
    each image's tiles, with `image_masks` bool[I'] and `image_layouts`
    int32[I', *layout_shape]; I' <= I, the slots after masked; None for text only), in
    order, `batch_size` at a time.

    `image_slots` is (I, T, H, W, 3). Every batch is padded to `batch_rows` rows (default:
    `batch_size`, or the number of prompts if fewer: rows for prompts there are not would
    only cost memory), so one compiled program serves them all (and, with `length`, one
    prompt length).
    """
    if batch_rows is None:
        batch_rows = min(batch_size, len(prompts))
    answers: list[str] = []
    geometry = engine.geometry
    for start in range(0, len(prompts), batch_size):
        rows = range(start, min(start + batch_size, len(prompts)))
        pixels = np.zeros((len(rows), *image_slots), np.float32)
        image_mask = np.zeros((len(rows), image_slots[0]), bool)
        layout = geometry.empty_layouts(len(rows), image_slots[0])
        for row, index in enumerate(rows):
            if images[index] is not None:
                used = len(images[index])  # the slots after stay empty (masked)
                pixels[row, :used] = images[index]
                image_mask[row, :used] = image_masks[index]
                layout[row, :used] = image_layouts[index]
        result = engine.generate(
            params,
            [prompts[i] for i in rows],
            pixels,
            image_mask,
            sampling,
            batch_rows=batch_rows,
            length=length,
            image_layout=layout,
        )
        answers.extend(text.strip() for text in result.texts)
    return answers


def answer_questions(
    model: LoadedModel,
    questions: Iterable[Question],
    image_dir: str,
    sampling: SamplingConfig,
    *,
    batch_size: int = 8,
    model_id: str = "llava_jax",
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[dict]:
    """Yield one answer entry per question, in order (see the module docstring).

    sampling: e.g. `model.sampling(max_new_tokens=128, temperature=0)`; the model's one
    engine (and its compiled programs) serves every call. on_progress(n): called with the
    number of questions just finished.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    # every batch padded alike (one compilation), but never past the questions there are
    rows = min(batch_size, len(questions)) if isinstance(questions, Sized) else batch_size
    # image slots: the most a question has (a file's questions known ahead: one compilation)
    slots = 1
    if isinstance(questions, Sized):
        slots = max([1, *(len(q.image_files) for q in questions)])
    window: list[dict | _Prepared] = []  # entries in question order; _Prepared to generate

    def flush() -> Iterator[dict]:
        nonlocal slots
        todo = [item for item in window if isinstance(item, _Prepared)]
        filled = [item.slots() for item in todo]
        slots = max([slots, *(len(pixels) for pixels, _ in filled if pixels is not None)])
        answers = iter(
            generate_answers(
                model.engine,
                model.params,
                [item.prompt_ids for item in todo],
                [pixels for pixels, _ in filled],
                [None if pixels is None else np.ones(len(pixels), bool) for pixels, _ in filled],
                sampling,
                batch_size=batch_size,
                image_slots=(slots, *model.image_shape),
                image_layouts=[layouts for _, layouts in filled],
                batch_rows=rows,
            )
            if todo
            else []
        )
        for item in window:
            if isinstance(item, _Prepared):
                yield _entry(item.question, model_id, text=next(answers))
            else:
                yield item
        if on_progress is not None:
            on_progress(len(window))
        window.clear()

    ready = 0
    for question in questions:
        try:
            window.append(_prepare(model, question, image_dir, sampling.max_new_tokens))
            ready += 1
        except InputError as err:
            window.append(_entry(question, model_id, error=str(err)))
        if ready == batch_size:
            yield from flush()
            ready = 0
    if window:
        yield from flush()


def evaluate_file(
    model: LoadedModel,
    questions_path: str,
    image_dir: str,
    out_path: str,
    sampling: SamplingConfig,
    *,
    batch_size: int = 8,
    model_id: str = "llava_jax",
    progress: bool = True,
) -> dict[str, int]:
    """Answer every question of `questions_path` into `out_path` (JSONL).

    Each answer is written as it is produced (a line, flushed) to `out_path + ".partial"`,
    which is renamed to `out_path` when every question has its entry: a run cut short
    leaves `out_path` as it was (never empty or truncated) and its answers so far in the
    `.partial` file.

    Returns `{"num_questions", "num_answered", "num_errors"}`. The questions file is
    checked whole before the first generation (`QuestionFileError`); an `out_path` that is
    the questions file (under any spelling) or a folder is refused (`OutputFileError`).
    """
    from tqdm import tqdm

    check_output_path(questions_path, out_path)
    questions = read_questions(questions_path)
    directory = os.path.dirname(os.path.abspath(out_path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        reason = str(err)
        raise OutputFileError(
            lambda arg: f"{arg(out_path)}: cannot make {directory}: {reason}"
        ) from None
    counts = {"num_questions": len(questions), "num_answered": 0, "num_errors": 0}
    partial = out_path + PARTIAL_SUFFIX
    with (
        tqdm(total=len(questions), unit="question", disable=not progress) as bar,
        _open_for_writing(partial, out_path) as out,
    ):
        entries = answer_questions(
            model,
            questions,
            image_dir,
            sampling,
            batch_size=batch_size,
            model_id=model_id,
            on_progress=bar.update,
        )
        for entry in entries:
            out.write(_json_line(entry))
            out.flush()  # a run cut short keeps the answers it has
            counts["num_errors" if "error" in entry else "num_answered"] += 1
    os.replace(partial, out_path)
    return counts


def _open_for_writing(path: str, out_path: str) -> Any:
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputFileError(
            lambda arg: f"{arg(out_path)}: cannot write {path}: {reason}"
        ) from None


def _json_line(entry: dict) -> str:
    """One JSON line, UTF-8 as it is, but escaped (`\\udcff`) where a string is not valid
    Unicode: such text cannot be written as UTF-8, and the line must still be written."""
    line = json.dumps(entry, ensure_ascii=False) + "\n"
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(entry) + "\n"
    return line
