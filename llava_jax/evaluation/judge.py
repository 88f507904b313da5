"""Judge a model's LLaVA-Bench answers with GPT-4 (or any OpenAI-compatible judge), as LLaVA's
`llava/eval/eval_gpt_review_bench.py` does, and summarise the reviews as its
`summarize_gpt_review.py` does.

    python -m llava_jax.evaluation.judge --benchmark benchmarks/llava_bench_synthetic \\
        --answers answers.jsonl --out reviews/ \\
        [--rule FILE --judge-base-url URL --judge-model gpt-4-0314 --temperature 0.2 \\
         --max-tokens 1024 --concurrency 4 --retries 5 --timeout 120 --parse-retries 3 \\
         --runs K --swap --llava-compat --no-progress --debug]
    python -m llava_jax.evaluation.judge summarize --out reviews/

`--benchmark`: a folder in LLaVA's layout (questions.jsonl, context.jsonl, answers_gpt4.jsonl;
see `llava_jax/evaluation/llava_bench.py`); `--answers`: the model's answers to its
questions.jsonl in LLaVA's format (as `python -m llava_jax.evaluate` writes them); `--rule`:
LLaVA's rule.json shape (default: the package's `evaluation/rule.json`). The key is
`OPENAI_API_KEY` (a judge elsewhere than OpenAI takes any: a placeholder is sent when unset).

For each question the judge reads the image's context, the question, the reference answer
as Assistant 1 and the model's as Assistant 2, and LLaVA's rule for the category, and
answers with two scores on its first line. In `--out`:

    reviews.jsonl        LLaVA's review format (id, question_id, answer1_id, answer2_id,
                         category, content, tuple = [reference score, model score]), plus
                         run and order; LLaVA's summarize_gpt_review.py reads it.
                         `--runs K`: reviews-run1.jsonl … reviews-runK.jsonl
    reviews-swapped…     `--swap`: the same questions judged with the answers' places
                         swapped; `tuple` is still [reference, model], `judged_tuple` as judged
    failed.jsonl         what has no score, and why: the model's answer has an `error`, the
                         judge failed past --retries, or its reply did not parse past
                         --parse-retries (its content is kept). Counted, never averaged in
    judge_run.json       the inputs' hashes and the judge's settings, for resuming
    summary.json, summary.png, and the table on stdout

Relative score = mean model score / mean reference score × 100 (a ratio of means, as LLaVA
computes it), per category and `all`; over `--runs K`, mean ± sample standard deviation
across runs; with `--swap`, each side's position bias (its mean score as Assistant 2 minus
as Assistant 1) and the relative score averaged over both orders. `--llava-compat` records an
unparsable review in the reviews file with [-1, -1] as LLaVA does (LLaVA's summary then
averages them in; ours leaves them out and says so; `--parse-retries 0` asks once, as LLaVA).

Requests: at most `--concurrency` in flight; 429, 5xx, timeouts (`--timeout` s) and lost
connections are retried `--retries` times with exponential backoff and jitter (or the
judge's Retry-After). A wrong URL, key (401/403) or model (404), or a request the judge
refuses before it has answered any, stops the run with one `error:` line, exit 2.

Resume: every review is appended and flushed as it comes; the same command again judges only
what has no review or failure record yet (a run cut short loses at most the requests in
flight); `--out` with reviews made from other files or settings is refused, naming them.
Remove failed.jsonl (or some of its lines) to judge those questions again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from llava_jax import chat_endpoint, program, record_log
from llava_jax.errors import InputError
from llava_jax.evaluation import llava_bench
from llava_jax.evaluation.llava_bench import Answer, Benchmark, BenchQuestion
from llava_jax.json_input import JSONInputError, loads

DEFAULT_BASE_URL = chat_endpoint.OPENAI_BASE_URL
# LLaVA's own judge: figures are comparable with LLaVA's only under the same judge, so the
# program never substitutes another one silently (a retired model gets a 404 that says so).
DEFAULT_MODEL = "gpt-4-0314"
LLAVA_JUDGES = ("gpt-4-0314", "gpt-4-0613")  # the two summarize_gpt_review.py knows
DEFAULT_RULE = os.path.join(os.path.dirname(__file__), "rule.json")

RUN_FILE = "judge_run.json"
FAILED_FILE = "failed.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_PNG = "summary.png"
LOCK_FILE = ".judge.lock"
REFERENCE_FIRST = "reference_first"  # LLaVA's order: the reference is Assistant 1
MODEL_FIRST = "model_first"  # --swap: the model's answer is Assistant 1

# What must match for a rerun to continue the reviews in --out (the rest is information).
IDENTITY_SETTINGS = ("judge_model", "temperature", "max_tokens", "runs", "swap", "llava_compat")
FLAG_OF = {s: "--" + s.replace("_", "-") for s in IDENTITY_SETTINGS}

log = logging.getLogger(__name__)


class OutDirError(InputError):
    """--out cannot hold this run's reviews (other inputs, damaged records, in use)."""


@dataclasses.dataclass(frozen=True)
class JudgeSettings(chat_endpoint.EndpointSettings):
    """How the judge is asked (LLaVA's model and sampling by default), and how many times a
    reply without two scores is asked again."""

    model: str = DEFAULT_MODEL
    temperature: float = 0.2
    parse_retries: int = 3


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


# --- the output folder: records, resume, identity --------------------------------------------


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


def _read_record_lines(path: str) -> list[tuple[int, dict[str, Any]]]:
    """The records of a review or failed file (a last line cut short is removed)."""
    return record_log.read_appended(
        path, OutDirError, "question_id", "that question is judged again"
    )


def _check_review(path: str, number: int, review: dict[str, Any]) -> None:
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
                for number, review in _read_record_lines(path):
                    _check_review(path, number, review)
                    add((run, order, str(review["question_id"])), f"{path}:{number}")
        for number, record in _read_record_lines(self.failed_path):
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
                records = [r for _, r in _read_record_lines(path)]
                records.sort(key=lambda r: r.get("id", 0))
                record_log.write_atomically(
                    path, "".join(llava_bench.dumps_line(r) for r in records)
                )


def run_identity(
    benchmark: Benchmark,
    answers_path: str,
    settings: JudgeSettings,
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


# --- asking the judge -------------------------------------------------------------------------


class JudgeEndpoint(chat_endpoint.Endpoint):
    """The judge's endpoint: its errors name the judge's flags and LLaVA's own judges."""

    def __init__(self, settings: JudgeSettings):
        super().__init__(
            settings,
            chat_endpoint.Names("the judge", "--judge-base-url", "--judge-model"),
            hints="--max-tokens and --temperature",
        )

    def model_hint(self) -> str:
        s = self.settings
        if s.model in LLAVA_JUDGES and chat_endpoint.is_openai(s.base_url):
            return f" ({s.model} is LLaVA's judge; OpenAI retires old snapshots)"
        return ""


class Judging:
    """Judges items through one endpoint, writing each result as it comes."""

    def __init__(
        self,
        benchmark: Benchmark,
        answers: dict[str, Answer],
        settings: JudgeSettings,
        out: OutDir,
        *,
        llava_compat: bool,
        progress: Any = None,
    ):
        self.benchmark = benchmark
        self.answers = answers
        self.settings = settings
        self.out = out
        self.llava_compat = llava_compat
        self.progress = progress
        self.endpoint = JudgeEndpoint(settings)
        self.counts = self.endpoint.counts  # retries, failed, unparsable

    def _base_record(self, item: Item) -> dict[str, Any]:
        question = item.question
        reference = self.benchmark.references[question.key]
        answer = self.answers[question.key]
        return {
            "id": question.index,
            "question_id": question.question_id,
            "answer1_id": reference.answer_id,
            "answer2_id": answer.answer_id,
            "category": question.review_category,
        }

    def _fail(self, item: Item, reason: str, content: str | None = None, **extra: Any) -> None:
        record = {
            "question_id": item.question.question_id,
            "run": item.run,
            "order": item.order,
            "category": item.question.review_category,
            "reason": reason,
            "content": content,
            **extra,
        }
        self.out.add_failed(record)
        self.counts["failed"] += 1

    async def judge(self, item: Item) -> None:
        """Review one item, or record why it has no review."""
        try:
            await self._judge(item)
        finally:
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix(
                    failed=self.counts["failed"], retries=self.counts["retries"], refresh=False
                )

    async def _judge(self, item: Item) -> None:
        question = item.question
        answer = self.answers[question.key]
        if answer.error is not None:
            self._fail(
                item,
                f"the model's answer (--answers line {answer.line}) has an error: {answer.error}",
            )
            return
        reference = self.benchmark.references[question.key]
        first, second = reference.text, answer.text
        if item.order == MODEL_FIRST:
            first, second = second, first
        content = llava_bench.review_content(
            self.benchmark.context_for(question), question, first, second,
            self.benchmark.rule_for(question),
        )  # fmt: skip
        messages = llava_bench.judge_messages(content)
        attempts = self.settings.parse_retries + 1
        reply = None
        for _ in range(attempts):
            try:
                reply = (await self.endpoint.request(messages)).text
            except chat_endpoint.GaveUp as err:
                self._fail(item, str(err))
                return
            scores = None if reply is None else llava_bench.parse_score(reply)
            if scores is not None:
                break
        record = self._base_record(item)
        record["content"] = reply
        if scores is None:
            first_line = "" if reply is None else reply.split("\n")[0][:200]
            reason = (
                f"the judge's reply did not parse as two scores on its first line "
                f"{attempts} times (--parse-retries {self.settings.parse_retries}); "
                f"first line: {first_line!r}"
                if reply is not None
                else f"the judge's reply had no text {attempts} times"
            )
            if not self.llava_compat:
                self._fail(item, reason, reply, attempts=attempts)
                return
            record.update(tuple=[-1, -1], run=item.run, order=item.order, failed=reason)
            self.out.add_review(item, record)  # as LLaVA records it, marked
            self.counts["unparsable"] += 1
            return
        judged = [scores[0], scores[1]]
        # tuple: always [reference, model]; a swapped review says what was judged.
        record["tuple"] = judged if item.order == REFERENCE_FIRST else judged[::-1]
        record.update(run=item.run, order=item.order)
        if item.order == MODEL_FIRST:
            record["judged_tuple"] = judged
        self.out.add_review(item, record)

    async def judge_all(self, items: Sequence[Item]) -> None:
        await self.endpoint.run_all(items, self.judge)


def pending_items(
    benchmark: Benchmark, runs: int, swap: bool, done: set[tuple[int, str, str]]
) -> list[Item]:
    """Every review not yet made: run by run, each order, questions in file order."""
    items = []
    for run in range(1, runs + 1):
        for order in orders(swap):
            for question in benchmark.questions:
                item = Item(question, run, order)
                if item.key not in done:
                    items.append(item)
    return items


# --- the summary --------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(model: float | None, reference: float | None) -> float | None:
    if model is None or not reference:
        return None
    return model / reference * 100


def category_figures(
    reviews: Sequence[dict[str, Any]],
    failed: Sequence[dict[str, Any]],
    categories: Sequence[str],
    *,
    llava_way: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per category and `all`: relative_score, reference_mean, model_mean (the judge's 1–10
    scale), count (reviews averaged) and failed. `llava_way`: average --llava-compat's
    [-1, -1] reviews in, as LLaVA's summarize_gpt_review.py does."""
    figures = {}
    for category in [*categories, "all"]:
        wanted = llava_bench.CATEGORY_PREFIX + category

        def of(records: Sequence[dict[str, Any]], wanted: str = wanted, c: str = category) -> list:
            return [r for r in records if c == "all" or r["category"] == wanted]

        rows = of(reviews)
        unparsable = [r for r in rows if "failed" in r]
        used = rows if llava_way else [r for r in rows if "failed" not in r]
        reference = _mean([r["tuple"][0] for r in used])
        model = _mean([r["tuple"][1] for r in used])
        figures[category] = {
            "relative_score": _ratio(model, reference),
            "reference_mean": reference,
            "model_mean": model,
            "count": len(used),
            "failed": len(of(failed)) + (0 if llava_way else len(unparsable)),
        }
    return figures


def position_bias(
    straight: Sequence[dict[str, Any]], swapped: Sequence[dict[str, Any]], categories: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Over the questions reviewed in both orders: each side's mean score as Assistant 2
    minus as Assistant 1, and the relative score of both orders' scores together."""
    first = {str(r["question_id"]): r for r in straight if "failed" not in r}
    second = {str(r["question_id"]): r for r in swapped if "failed" not in r}
    result = {}
    for category in [*categories, "all"]:
        wanted = llava_bench.CATEGORY_PREFIX + category
        keys = [
            k
            for k in first
            if k in second and (category == "all" or first[k]["category"] == wanted)
        ]
        if not keys:
            result[category] = {
                "model": None, "reference": None, "relative_score_order_averaged": None, "paired": 0
            }  # fmt: skip
            continue
        ref_1 = [first[k]["tuple"][0] for k in keys]  # the reference as Assistant 1
        model_2 = [first[k]["tuple"][1] for k in keys]  # the model as Assistant 2
        ref_2 = [second[k]["tuple"][0] for k in keys]
        model_1 = [second[k]["tuple"][1] for k in keys]
        result[category] = {
            "model": _mean(model_2) - _mean(model_1),
            "reference": _mean(ref_2) - _mean(ref_1),
            "relative_score_order_averaged": _ratio(_mean(model_2 + model_1), _mean(ref_1 + ref_2)),
            "paired": len(keys),
        }
    return result


def across_runs(per_run: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each figure's mean and sample standard deviation (n − 1) across runs, and its values;
    a run where a figure is undefined (no reviews) is left out of it."""
    result: dict[str, dict[str, Any]] = {}
    for category in per_run[0]:
        result[category] = {}
        for name in per_run[0][category]:
            values = [run[category][name] for run in per_run]
            defined = [v for v in values if v is not None]
            result[category][name] = {
                "mean": _mean(defined),
                "std": statistics.stdev(defined) if len(defined) > 1 else None,
                "runs": values,
            }
    return result


def _load_reviews(out: OutDir, run: int, order: str) -> list[dict[str, Any]]:
    path = out.review_path(run, order)
    records = []
    for number, review in _read_record_lines(path):
        _check_review(path, number, review)
        records.append(review)
    return records


def summarize(out_dir: str) -> dict[str, Any]:
    """The summary of the reviews in `out_dir` (see the module docstring); reads only
    `out_dir`, so it can be made again from existing reviews."""
    meta = read_run_file(out_dir)
    runs, swap = meta["runs"], bool(meta.get("swap"))
    compat = bool(meta.get("llava_compat"))
    categories = list(meta.get("categories") or llava_bench.CATEGORIES)
    out = OutDir(out_dir, runs, swap)
    failed = [r for _, r in _read_record_lines(out.failed_path)]
    reviews = {
        (run, order): _load_reviews(out, run, order)
        for run in range(1, runs + 1)
        for order in orders(swap)
    }

    def failed_of(run: int, order: str) -> list[dict[str, Any]]:
        return [f for f in failed if f.get("run") == run and f.get("order") == order]

    def figures_of(order: str, llava_way: bool = False) -> dict[str, Any]:
        return across_runs(
            [
                category_figures(
                    reviews[run, order], failed_of(run, order), categories, llava_way=llava_way
                )
                for run in range(1, runs + 1)
            ]
        )

    questions = int(meta.get("questions") or 0)
    expected = questions * runs * len(orders(swap))
    recorded = sum(len(r) for r in reviews.values()) + len(failed)
    unparsable = [
        {"run": run, "order": order, "question_id": r["question_id"], "category": r["category"],
         "reason": r["failed"]}
        for (run, order), rows in reviews.items() for r in rows if "failed" in r
    ]  # fmt: skip
    summary: dict[str, Any] = {
        "judge_model": meta.get("judge_model"),
        "judge_base_url": meta.get("judge_base_url"),
        "temperature": meta.get("temperature"),
        "max_tokens": meta.get("max_tokens"),
        "runs": runs,
        "swap": swap,
        "llava_compat": compat,
        "questions": questions,
        "missing": max(0, expected - recorded),
        "scale": "reference_mean and model_mean are the judge's 1-10 scores (LLaVA's "
        "summarize_gpt_review.py prints them x10); relative_score = model_mean / "
        "reference_mean x 100",
        "std": "sample standard deviation across runs (n - 1); null for one run",
        "categories": categories,
        "figures": figures_of(REFERENCE_FIRST),
        "failed": [
            {k: f.get(k) for k in ("run", "order", "question_id", "category", "reason")}
            for f in failed
        ]
        + unparsable,
    }
    if swap:
        summary["figures_swapped"] = figures_of(MODEL_FIRST)
        summary["position_bias"] = across_runs(
            [
                position_bias(reviews[run, REFERENCE_FIRST], reviews[run, MODEL_FIRST], categories)
                for run in range(1, runs + 1)
            ]
        )
    if compat:
        summary["unparsable_averaged_in_by_llava"] = len(unparsable)
        summary["llava_figures"] = figures_of(REFERENCE_FIRST, llava_way=True)
    return summary


def _fmt(stat: dict[str, Any], digits: int, scale: float = 1.0, sign: bool = False) -> str:
    mean, std = stat["mean"], stat["std"]
    if mean is None:
        return "-"
    text = f"{mean * scale:+.{digits}f}" if sign else f"{mean * scale:.{digits}f}"
    if std is not None:
        text += f" ± {std * scale:.{digits}f}"
    return text


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def _figures_table(figures: dict[str, Any]) -> str:
    rows = [
        ["category", "relative", "reference", "model", "ref x10", "model x10", "reviewed", "failed"]
    ]
    for category, f in figures.items():
        rows.append(
            [
                category,
                _fmt(f["relative_score"], 1),
                _fmt(f["reference_mean"], 3),
                _fmt(f["model_mean"], 3),
                _fmt(f["reference_mean"], 1, 10),
                _fmt(f["model_mean"], 1, 10),
                _fmt(f["count"], 0),
                _fmt(f["failed"], 0),
            ]
        )
    return _table(rows)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the table the program prints."""
    runs = summary["runs"]
    head = (
        f"LLaVA-Bench judged by {summary['judge_model']} "
        f"({runs} run{'s' if runs > 1 else ''}{', mean ± std across runs' if runs > 1 else ''}); "
        "relative = model / reference x 100; reference and model: mean scores (1-10), "
        "x10 as LLaVA prints them"
    )
    parts = [head, _figures_table(summary["figures"])]
    if summary["swap"]:
        parts.append("swapped (the model's answer as Assistant 1):")
        parts.append(_figures_table(summary["figures_swapped"]))
        rows = [["category", "model bias", "reference bias", "relative (both orders)", "paired"]]
        for category, b in summary["position_bias"].items():
            rows.append(
                [
                    category,
                    _fmt(b["model"], 3, sign=True),
                    _fmt(b["reference"], 3, sign=True),
                    _fmt(b["relative_score_order_averaged"], 1),
                    _fmt(b["paired"], 0),
                ]
            )
        parts.append("position bias (mean score as Assistant 2 minus as Assistant 1):")
        parts.append(_table(rows))
    if summary["llava_compat"]:
        n = summary["unparsable_averaged_in_by_llava"]
        every = summary["llava_figures"]["all"]
        reference, model = _fmt(every["reference_mean"], 1, 10), _fmt(every["model_mean"], 1, 10)
        parts.append(
            f"--llava-compat: {n} unparsable review{'s' if n != 1 else ''} recorded as [-1, -1], "
            f"as LLaVA does; LLaVA's summarize_gpt_review.py averages them in (all: "
            f"{_fmt(every['relative_score'], 1)}, reference x10 {reference}, "
            f"model x10 {model}); the figures above leave them out"
        )
    failed = summary["failed"]
    if failed:
        named = "; ".join(
            f"{f['question_id']!r} (run {f['run']}, {f['order']}): {f['reason']}"
            for f in failed[:5]
        )
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        parts.append(f"failed, left out of the figures ({len(failed)}): {named}{more}")
    if summary["missing"]:
        parts.append(
            f"incomplete: {summary['missing']} reviews not made yet; run the judge again to finish"
        )
    return "\n".join(parts)


def plot_summary(summary: dict[str, Any], path: str) -> None:
    """A bar per category: the relative score (error bars: std across runs); with --swap,
    beside it the relative score of both orders."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    categories = list(summary["figures"])
    series = [("reference first (LLaVA's order)", summary["figures"], "relative_score")]
    if summary["swap"]:
        series.append(("both orders", summary["position_bias"], "relative_score_order_averaged"))
    figure = Figure(figsize=(1.6 * len(categories) + 2, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    for s, (label, table, name) in enumerate(series):
        means = [table[c][name]["mean"] or 0.0 for c in categories]
        stds = [table[c][name]["std"] or 0.0 for c in categories]
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(categories))]
        bars = axes.bar(
            xs, means, width, yerr=stds if summary["runs"] > 1 else None, label=label, capsize=3
        )
        axes.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=8)
    axes.set_xticks(range(len(categories)), categories)
    axes.set_ylabel("model / reference × 100")
    runs = summary["runs"]
    spread = f"{runs} runs, mean ± std" if runs > 1 else "1 run"
    axes.set_title(f"LLaVA-Bench, judged by {summary['judge_model']} ({spread})")
    axes.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    if len(series) > 1:
        axes.legend()
    figure.tight_layout()
    temporary = path + ".tmp"
    figure.savefig(temporary, format="png", dpi=100)
    os.replace(temporary, path)


def write_summary(out_dir: str) -> dict[str, Any]:
    """summary.json and summary.png in `out_dir`; returns the summary."""
    summary = summarize(out_dir)
    record_log.write_atomically(
        os.path.join(out_dir, SUMMARY_JSON), json.dumps(summary, indent=2) + "\n"
    )
    plot_summary(summary, os.path.join(out_dir, SUMMARY_PNG))
    return summary


# --- the programs ---------------------------------------------------------------------------------


def _check_arguments(args: argparse.Namespace) -> None:
    chat_endpoint.check_settings(
        base_url=args.judge_base_url,
        url_flag="--judge-base-url",
        concurrency=args.concurrency,
        retries=args.retries,
        max_tokens=args.max_tokens,
        timeout=args.timeout,
        temperature=args.temperature,
    )
    if args.parse_retries < 0:
        raise InputError(f"--parse-retries must be >= 0, got {args.parse_retries}")
    if args.runs < 1:
        raise InputError(f"--runs must be >= 1, got {args.runs}")


def judge_benchmark(
    benchmark_dir: str,
    answers_path: str,
    out_dir: str,
    settings: JudgeSettings,
    *,
    rule_path: str = DEFAULT_RULE,
    runs: int = 1,
    swap: bool = False,
    llava_compat: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Judge every question not yet reviewed in `out_dir`, then write and return the summary.
    Raises `InputError` for bad inputs (before any request) and a judge that cannot be used."""
    from tqdm import tqdm

    benchmark = llava_bench.load_benchmark(benchmark_dir, rule_path)
    answers = llava_bench.read_model_answers(answers_path, benchmark)
    identity = run_identity(
        benchmark, answers_path, settings, runs=runs, swap=swap, llava_compat=llava_compat
    )
    out = OutDir(out_dir, runs, swap)
    out.open()
    try:
        # Any record here (of whatever run count) ties the folder to its judge_run.json.
        has_records = any(
            os.path.getsize(os.path.join(out_dir, name)) for name in out.existing_reviews()
        )
        out.start(identity, has_records)
        done = out.done()
        items = pending_items(benchmark, runs, swap, done)
        total = len(benchmark.questions) * runs * len(orders(swap))
        if items:
            with tqdm(
                total=total, initial=total - len(items), unit="review", desc="judging",
                disable=not progress, dynamic_ncols=True,
            ) as bar:  # fmt: skip
                judging = Judging(
                    benchmark, answers, settings, out, llava_compat=llava_compat, progress=bar
                )
                asyncio.run(judging.judge_all(items))
        out.sort_reviews()
    finally:
        out.close()
    return write_summary(out_dir)


def _judge_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.evaluation.judge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--benchmark", required=True, help="LLaVA-Bench folder")
    parser.add_argument("--answers", required=True, help="the model's answers JSONL")
    parser.add_argument("--out", required=True, help="folder for the reviews and the summary")
    parser.add_argument("--rule", default=DEFAULT_RULE, help="rule file (LLaVA's rule.json shape)")
    parser.add_argument("--judge-base-url", default=DEFAULT_BASE_URL, help="OpenAI-compatible API")
    parser.add_argument(
        "--judge-model", default=DEFAULT_MODEL, help="the judge (default: LLaVA's, %(default)s)"
    )
    parser.add_argument("--temperature", type=float, default=0.2, help="LLaVA's: %(default)s")
    parser.add_argument("--max-tokens", type=int, default=1024, help="LLaVA's: %(default)s")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument(
        "--retries", type=int, default=5, help="on 429, 5xx, timeouts, lost connections"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument(
        "--parse-retries", type=int, default=3, help="asks again when a reply has no two scores"
    )
    parser.add_argument("--runs", type=int, default=1, help="judge everything K times")
    parser.add_argument("--swap", action="store_true", help="also judge with the answers swapped")
    parser.add_argument(
        "--llava-compat", action="store_true", help="record unparsable reviews as [-1, -1] as LLaVA"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    program.add_debug_argument(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        _check_arguments(args)
        settings = JudgeSettings(
            base_url=args.judge_base_url,
            model=args.judge_model,
            api_key=chat_endpoint.api_key(args.judge_base_url, "the judge", "--judge-base-url"),
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            timeout=args.timeout,
            retries=args.retries,
            parse_retries=args.parse_retries,
            concurrency=args.concurrency,
        )
        try:
            summary = judge_benchmark(
                args.benchmark,
                args.answers,
                args.out,
                settings,
                rule_path=args.rule,
                runs=args.runs,
                swap=args.swap,
                llava_compat=args.llava_compat,
                progress=not args.no_progress,
            )
        except KeyboardInterrupt:
            print(
                f"interrupted: the reviews so far are in {args.out}; the same command goes on",
                file=sys.stderr,
            )
            return 130
        print(format_summary(summary), flush=True)
        return 0

    return program.run(body, args)


def _summarize_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.evaluation.judge summarize",
        description="Summarise the reviews in --out again: summary.json, summary.png, the table.",
    )
    parser.add_argument("--out", required=True, help="a folder the judge wrote")
    program.add_debug_argument(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        if not os.path.isdir(args.out):
            raise OutDirError(f"--out {args.out} is not a folder")
        read_run_file(args.out)  # a folder of this judge's, before locking it
        out = OutDir(args.out, 1, False)
        out.open()  # not while a judge is writing it
        try:
            summary = write_summary(args.out)
        finally:
            out.close()
        print(format_summary(summary), flush=True)
        return 0

    return program.run(body, args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["summarize"]:
        return _summarize_main(argv[1:])
    return _judge_main(argv)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
