"""The judge's output folder (`--out` of `python -m llava_jax.evaluation.judge`): the names
of its files, the review and failure records appended there and read back on resume, and
judge_run.json, the identity of the inputs and settings the reviews were made with (a
rerun with others is refused, naming them)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from llava_jax import chat_endpoint, record_log
from llava_jax.errors import InputError
from llava_jax.evaluation import llava_bench
from llava_jax.evaluation.llava_bench import Benchmark, BenchQuestion
from llava_jax.json_input import JSONInputError, loads

RUN_FILE = "judge_run.json"
FAILED_FILE = "failed.jsonl"
LOCK_FILE = ".judge.lock"
REFERENCE_FIRST = "reference_first"  # LLaVA's order: the reference is Assistant 1
MODEL_FIRST = "model_first"  # --swap: the model's answer is Assistant 1

# What must match for a rerun to continue the reviews in --out (the rest is information).
IDENTITY_SETTINGS = ("judge_model", "temperature", "max_tokens", "runs", "swap", "llava_compat")
FLAG_OF = {s: "--" + s.replace("_", "-") for s in IDENTITY_SETTINGS}


class OutDirError(InputError):
    """--out cannot hold this run's reviews (other inputs, damaged records, in use)."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One review to make: a question, in a run, in an order."""

    question: BenchQuestion
    run: int
    order: str

    @property
    def key(self) -> tuple[int, str, str]:
        return (self.run, self.order, self.question.key)


def review_file_name(run: int, runs: int, order: str) -> str:
    """reviews.jsonl, reviews-run2.jsonl, reviews-swapped.jsonl, reviews-swapped-run2.jsonl."""
    name = "reviews" + ("-swapped" if order == MODEL_FIRST else "")
    return name + (f"-run{run}" if runs > 1 else "") + ".jsonl"


def orders(swap: bool) -> tuple[str, ...]:
    return (REFERENCE_FIRST, MODEL_FIRST) if swap else (REFERENCE_FIRST,)


def read_run_file(out: str) -> dict[str, Any]:
    """judge_run.json of `out`; `OutDirError` naming it when absent or unreadable."""
    path = os.path.join(out, RUN_FILE)
    if not os.path.isfile(path):
        raise OutDirError(f"{out} has no {RUN_FILE}: not a folder this judge wrote")
    try:
        with open(path, "rb") as f:
            meta = loads(f.read())
    except (OSError, JSONInputError) as err:
        raise OutDirError(f"{path}: cannot read: {err}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("runs"), int):
        raise OutDirError(f"{path}: not this judge's run file (no 'runs')")
    return meta


def read_record_lines(path: str) -> list[tuple[int, dict[str, Any]]]:
    """The records of a review or failed file (a last line cut short is removed)."""
    return record_log.read_appended(
        path, OutDirError, "question_id", "that question is judged again"
    )


def check_review(path: str, number: int, review: dict[str, Any]) -> None:
    scores = review.get("tuple")
    if not (
        isinstance(scores, list)
        and len(scores) == 2
        and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)
        and isinstance(review.get("category"), str)
    ):
        raise OutDirError(
            f"{path}:{number}: not a review of this judge (needs 'category' and a 'tuple' of "
            "two scores); remove the line to judge its question again"
        )


class OutDir:
    """The folder of one judged benchmark: what is done, and appending what comes."""

    def __init__(self, path: str, runs: int, swap: bool):
        self.path = path
        self.runs = runs
        self.swap = swap
        self._lock = record_log.FolderLock(path, LOCK_FILE, "--out", "judge", OutDirError)
        self._appender = record_log.Appender(llava_bench.dumps_line)

    def review_path(self, run: int, order: str) -> str:
        return os.path.join(self.path, review_file_name(run, self.runs, order))

    @property
    def failed_path(self) -> str:
        return os.path.join(self.path, FAILED_FILE)

    def open(self) -> None:
        """Make the folder and hold it: a second judge process on it is refused."""
        self._lock.acquire()

    def close(self) -> None:
        self._appender.close()
        self._lock.release()

    def existing_reviews(self) -> list[str]:
        """Review or failed files already here (of any run count), by name."""
        names = sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []
        return [
            n
            for n in names
            if n.endswith(".jsonl") and (n.startswith("reviews") or n == FAILED_FILE)
        ]

    def done(self) -> set[tuple[int, str, str]]:
        """(run, order, question key) of every review and failure record here."""
        seen: dict[tuple[int, str, str], str] = {}

        def add(key: tuple[int, str, str], where: str) -> None:
            if key in seen:
                raise OutDirError(
                    f"{where}: question {key[2]!r} of run {key[0]} ({key[1]}) is recorded a "
                    f"second time (first: {seen[key]}); remove one of the lines"
                )
            seen[key] = where

        for run in range(1, self.runs + 1):
            for order in orders(self.swap):
                path = self.review_path(run, order)
                for number, review in read_record_lines(path):
                    check_review(path, number, review)
                    add((run, order, str(review["question_id"])), f"{path}:{number}")
        for number, record in read_record_lines(self.failed_path):
            run, order = record.get("run"), record.get("order")
            if not isinstance(run, int) or order not in orders(True):
                raise OutDirError(
                    f"{self.failed_path}:{number}: not a record of this judge (needs run and order)"
                )
            add((run, order, str(record["question_id"])), f"{self.failed_path}:{number}")
        return set(seen)

    def start(self, identity: dict[str, Any], has_records: bool) -> None:
        """Write judge_run.json, or check the one here when records depend on it."""
        path = os.path.join(self.path, RUN_FILE)
        if has_records:
            if not os.path.exists(path):
                raise OutDirError(
                    f"--out {self.path} holds reviews but no {RUN_FILE}: not a folder this judge "
                    "wrote; choose another --out"
                )
            changes = _identity_changes(read_run_file(self.path), identity)
            if changes:
                raise OutDirError(
                    f"--out {self.path} holds reviews made with other inputs: "
                    + "; ".join(changes)
                    + ". Use another --out, or remove its reviews to judge again"
                )
            return
        record_log.write_atomically(path, json.dumps(identity, indent=2) + "\n")

    def _append(self, path: str, record: dict[str, Any]) -> None:
        self._appender.append(path, record)  # flushed: a run killed now keeps this record

    def add_review(self, item: Item, record: dict[str, Any]) -> None:
        self._append(self.review_path(item.run, item.order), record)

    def add_failed(self, record: dict[str, Any]) -> None:
        self._append(self.failed_path, record)

    def sort_reviews(self) -> None:
        """Every review file in question order (reviews arrive in completion order)."""
        self._appender.close()
        for run in range(1, self.runs + 1):
            for order in orders(self.swap):
                path = self.review_path(run, order)
                records = [r for _, r in read_record_lines(path)]
                records.sort(key=lambda r: r.get("id", 0))
                record_log.write_atomically(
                    path, "".join(llava_bench.dumps_line(r) for r in records)
                )


def run_identity(
    benchmark: Benchmark,
    answers_path: str,
    settings: chat_endpoint.EndpointSettings,
    *,
    runs: int,
    swap: bool,
    llava_compat: bool,
) -> dict[str, Any]:
    """judge_run.json: what the reviews depend on (hashes, settings) and what they were."""
    files = {name: path for name, path in benchmark.files.items()}
    files["--answers"] = answers_path
    return {
        "files": {name: record_log.sha256_file(path) for name, path in files.items()},
        "paths": {name: os.path.abspath(path) for name, path in files.items()},
        "judge_model": settings.model,
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        "runs": runs,
        "swap": swap,
        "llava_compat": llava_compat,
        "judge_base_url": settings.base_url,
        "questions": len(benchmark.questions),
        "categories": llava_bench.describe_categories(benchmark.questions),
    }


def _identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    old_files = old.get("files") or {}
    for name, digest in new["files"].items():
        if old_files.get(name) != digest:
            where = name if name.startswith("--") else f"--benchmark's {name}"
            changes.append(f"{where} ({new['paths'][name]}) is not the file they judged")
    for setting in IDENTITY_SETTINGS:
        if old.get(setting) != new[setting]:
            changes.append(
                f"{FLAG_OF[setting]} {json.dumps(new[setting])} "
                f"(they were made with {json.dumps(old.get(setting))})"
            )
    return changes
