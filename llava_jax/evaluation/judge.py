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
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from llava_jax import chat_endpoint, program
from llava_jax.errors import InputError
from llava_jax.evaluation import llava_bench
from llava_jax.evaluation.judge_output import (
    MODEL_FIRST,
    REFERENCE_FIRST,
    Item,
    OutDir,
    OutDirError,
    orders,
    read_run_file,
    run_identity,
)
from llava_jax.evaluation.judge_summary import format_summary, write_summary
from llava_jax.evaluation.llava_bench import Answer, Benchmark

# LLaVA's own judge: figures are comparable with LLaVA's only under the same judge, so the
# program never substitutes another one silently (a retired model gets a 404 that says so).
DEFAULT_MODEL = "gpt-4-0314"
LLAVA_JUDGES = ("gpt-4-0314", "gpt-4-0613")  # the two summarize_gpt_review.py knows
JUDGE_NAMES = chat_endpoint.Names("the judge", "--judge-base-url", "--judge-model")
DEFAULT_RULE = os.path.join(os.path.dirname(__file__), "rule.json")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class JudgeSettings(chat_endpoint.EndpointSettings):
    """How the judge is asked (LLaVA's model and sampling by default), and how many times a
    reply without two scores is asked again."""

    model: str = DEFAULT_MODEL
    temperature: float = 0.2
    parse_retries: int = 3


# --- asking the judge -------------------------------------------------------------------------


class JudgeEndpoint(chat_endpoint.Endpoint):
    """The judge's endpoint: its errors name the judge's flags and LLaVA's own judges."""

    def __init__(self, settings: JudgeSettings):
        super().__init__(
            settings,
            JUDGE_NAMES,
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


# --- the programs ---------------------------------------------------------------------------------


def _check_arguments(args: argparse.Namespace) -> None:
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
    chat_endpoint.add_arguments(
        parser, JUDGE_NAMES, model_default=DEFAULT_MODEL,
        model_help="the judge (default: LLaVA's, %(default)s)", temperature=0.2,
        sampling_help="LLaVA's",
    )  # fmt: skip
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
        endpoint = chat_endpoint.settings_from_args(args, JUDGE_NAMES)
        _check_arguments(args)
        settings = JudgeSettings(**endpoint, parse_retries=args.parse_retries)
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
