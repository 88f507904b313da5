"""Make LLaVA instruction data from image annotations, as the LLaVA paper made
LLaVA-Instruct-158K: a text-only LLM (any OpenAI-compatible endpoint: OpenAI, vLLM,
llama.cpp, `python -m llava_jax.serve`) reads each image's captions and boxes, never the
image, and writes conversations, detailed descriptions and complex reasoning.

    python -m llava_jax.data.instruct --image-dir IMAGES \\
        (--captions captions_train2017.json [--instances instances_train2017.json] \\
         | --annotations annotations.jsonl) --out generated/ \\
        --base-url URL --model NAME [--kind conversation,detail_description,complex_reasoning] \\
        [--prompts FOLDER --temperature 1.0 --max-tokens 1024 --concurrency 4 --retries 5 \\
         --timeout 120 --parse-retries 2 --seed 0 --limit N --price-per-1k P[,P_OUT] \\
         --no-progress --debug]
    python -m llava_jax.data.instruct --kind brief ...   # stage 1 data: no LLM

The annotations, their context and what a bad one gets: `llava_jax/data/annotations.py`;
the kinds, prompts, reply formats and records: `llava_jax/data/instruct_format.py`. The key
is `OPENAI_API_KEY` (a server elsewhere than OpenAI takes any).

In `--out`:

    llava_instruct.json  the LLaVA JSON (images in annotation order, kinds in --kind order),
                         written once every (image, kind) is done and checked by the
                         project's own LLaVA JSON validation; `python -m llava_jax.main
                         --config.data.source=llava_json --config.data.json_path=…` trains on it
    done.jsonl           an (image, kind) per line: its records, tokens, attempts
    skipped.jsonl        an (image, kind) that made no record, and why: the endpoint failed
                         past --retries; or the reply was empty, did not parse, or named its
                         source (a caption, a bounding box, coordinates) past --parse-retries
                         (its last reply kept)
    report.json          records per kind, skipped per reason, annotations skipped per reason,
                         tokens and estimated cost; also printed. An (image, kind) whose
                         records fail the validation (an image that does not decode) is left
                         out of the JSON and named here (`invalid`), checked again each run
    generation.json      what the records depend on (the annotations' and prompts' hashes, the
                         model, sampling, seed), checked on a rerun

Resume: each (image, kind) is appended and flushed as it is done; the same command again asks
only for what has no line in done.jsonl or skipped.jsonl (a kill loses the requests in
flight, nothing else; nothing is asked twice). A rerun with other annotations, prompts, model,
sampling or seed is refused, naming them. Remove lines of skipped.jsonl to try them again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from llava_jax import chat_endpoint, program, record_log
from llava_jax.data import annotations as annotations_lib
from llava_jax.data import instruct_format as fmt
from llava_jax.data.annotations import ImageAnnotations
from llava_jax.data.instruct_output import (
    DONE_FILE,
    REPORT_FILE,
    SKIPPED_FILE,
    OutDir,
    Settings,
    build_report,
    finish,
    format_report,
    run_identity,
)
from llava_jax.errors import InputError

NAMES = chat_endpoint.Names("the LLM", "--base-url", "--model")


@dataclasses.dataclass(frozen=True)
class Task:
    """One (image, kind) to make records for."""

    image: ImageAnnotations
    kind: str


# --- asking the LLM ----------------------------------------------------------------------------


class Generation:
    """Makes the records of tasks through one endpoint, writing each as it comes."""

    def __init__(self, settings: Settings, out: OutDir, progress: Any = None):
        self.settings = settings
        self.out = out
        self.progress = progress
        self.endpoint = chat_endpoint.Endpoint(
            settings.endpoint, NAMES, hints="--max-tokens and --temperature"
        )
        self.prompts = {
            kind: fmt.load_prompts(settings.prompts_root, kind)
            for kind in settings.kinds
            if kind in fmt.LLM_KINDS
        }
        self.counts = self.endpoint.counts  # retries, skipped

    async def handle(self, task: Task) -> None:
        try:
            await self._handle(task)
        finally:
            if self.progress is not None:
                self.progress.update(1)
                usage = self.endpoint.usage
                self.progress.set_postfix(
                    skipped=self.counts["skipped"],
                    retries=self.counts["retries"],
                    tokens=usage["prompt_tokens"] + usage["completion_tokens"],
                    refresh=False,
                )

    async def _handle(self, task: Task) -> None:
        seed = self.settings.seed
        base = {"image": task.image.image, "id": task.image.id, "kind": task.kind}
        if task.kind == fmt.BRIEF:
            records = fmt.make_records(fmt.BRIEF, task.image, None, seed)
            self.out.add(DONE_FILE, {**base, "records": records, "attempts": 0})
            return
        messages = fmt.request_messages(self.prompts[task.kind], task.image)
        usage = {"prompt_tokens": 0, "completion_tokens": 0}  # this task's replies, all paid
        attempts = self.settings.parse_retries + 1
        problem, text = None, None
        for attempt in range(1, attempts + 1):
            try:
                reply = await self.endpoint.request(messages)
            except chat_endpoint.GaveUp as err:
                self._skip(base, "request_failed", str(err), text, attempt, usage)
                return
            text = reply.text
            usage["prompt_tokens"] += reply.prompt_tokens
            usage["completion_tokens"] += reply.completion_tokens
            try:
                content = fmt.parse_reply(task.kind, text)
            except fmt.ReplyError as err:
                problem = err
                continue
            records = fmt.make_records(task.kind, task.image, content, seed)
            line = {**base, "records": records, "attempts": attempt, "usage": usage}
            self.out.add(DONE_FILE, line)
            return
        assert problem is not None
        detail = (
            f"{problem.detail} ({attempts} replies, --parse-retries {self.settings.parse_retries})"
        )
        self._skip(base, problem.reason, detail, text, attempts, usage)

    def _skip(
        self,
        base: dict[str, Any],
        reason: str,
        detail: str,
        reply: str | None,
        attempts: int,
        usage: dict[str, int],
    ) -> None:
        line = {**base, "reason": reason, "detail": detail, "reply": reply, "attempts": attempts}
        self.out.add(SKIPPED_FILE, {**line, "usage": usage})
        self.counts["skipped"] += 1

    async def generate(self, tasks: Sequence[Task]) -> None:
        local = [t for t in tasks if t.kind == fmt.BRIEF]
        for task in local:
            await self.handle(task)
        asked = [t for t in tasks if t.kind != fmt.BRIEF]
        if asked:
            await self.endpoint.run_all(asked, self.handle)


# --- a run: ask, finish, report -------------------------------------------------------------


def generate(
    *,
    image_dir: str,
    out_dir: str,
    settings: Settings,
    captions: str | None = None,
    instances: str | None = None,
    annotations: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Make the records of every (image, kind) not yet done in `out_dir`, then write and
    validate the LLaVA JSON; returns the report. `InputError` for bad inputs (before any
    request) and an endpoint that cannot be used."""
    from tqdm import tqdm

    if not os.path.isdir(image_dir):
        raise InputError(f"--image-dir {image_dir} is not a folder")
    images, annotation_report = annotations_lib.read_annotations(
        captions=captions, instances=instances, jsonl=annotations, image_dir=image_dir
    )
    if settings.limit is not None:
        images = images[: settings.limit]
    files = {
        flag: path
        for flag, path in (("--captions", captions), ("--instances", instances),
                           ("--annotations", annotations))
        if path
    }  # fmt: skip
    identity = run_identity(files, image_dir, settings)
    out = OutDir(out_dir)
    out.lock.acquire()
    try:
        out.start(identity)
        done, skipped = out.done()
        tasks = [
            Task(image, kind)
            for image in images
            for kind in settings.kinds
            if (image.image, kind) not in done and (image.image, kind) not in skipped
        ]
        total = len(images) * len(settings.kinds)
        generation = None
        if tasks:
            with tqdm(
                total=total, initial=total - len(tasks), unit="request", desc="generating",
                disable=not progress, dynamic_ncols=True,
            ) as bar:  # fmt: skip
                generation = Generation(settings, out, bar)
                asyncio.run(generation.generate(tasks))
        out.appender.close()
        written, invalid = finish(out, images, settings, image_dir, progress)
        retries = generation.counts["retries"] if generation else 0
        report = build_report(out, images, annotation_report, settings, written, invalid, retries)
        record_log.write_atomically(out.file(REPORT_FILE), json.dumps(report, indent=2) + "\n")
        return report
    finally:
        out.close()


# --- the program ---------------------------------------------------------------------------------


def _kinds(value: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    unknown = [k for k in kinds if k not in fmt.KINDS]
    if unknown or not kinds:
        raise InputError(f"--kind {value!r}: each must be one of {', '.join(fmt.KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise InputError(f"--kind {value!r} names a kind twice")
    return kinds


def _price_arg(value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        prices = [float(p) for p in value.split(",")]
    except ValueError:
        prices = []
    if len(prices) not in (1, 2) or not all(math.isfinite(p) and p >= 0 for p in prices):
        raise InputError(
            "--price-per-1k must be a price per 1000 tokens, or two (prompt,completion), "
            f"got {value!r}"
        )
    return (prices[0], prices[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.data.instruct",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--image-dir", required=True, help="the images' folder")
    parser.add_argument("--captions", help="COCO captions_*.json")
    parser.add_argument("--instances", help="COCO instances_*.json (boxes)")
    parser.add_argument("--annotations", help="annotation JSONL (image, captions, boxes)")
    parser.add_argument("--out", required=True, help="folder for the records and the report")
    parser.add_argument(
        "--kind",
        default=",".join(fmt.LLM_KINDS),
        help=f"comma-separated, of {', '.join(fmt.KINDS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--prompts", default=fmt.DEFAULT_PROMPTS, help="prompt folders (LLaVA's layout)"
    )
    chat_endpoint.add_arguments(
        parser, NAMES, model_default=None,
        model_help="the LLM's model name (needed unless --kind brief)", temperature=1.0,
    )  # fmt: skip
    parser.add_argument(
        "--parse-retries", type=int, default=2,
        help="asks again when a reply is empty, does not parse or names its source",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0, help="for the instructions and <image> places"
    )
    parser.add_argument("--limit", type=int, help="the first N images only")
    parser.add_argument("--price-per-1k", help="price per 1000 tokens (or prompt,completion)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    program.add_debug_argument(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        kinds = _kinds(args.kind)
        asks = any(kind in fmt.LLM_KINDS for kind in kinds)
        if args.parse_retries < 0:
            raise InputError(f"--parse-retries must be >= 0, got {args.parse_retries}")
        if args.limit is not None and args.limit < 1:
            raise InputError(f"--limit must be >= 1, got {args.limit}")
        if asks and not args.model:
            raise InputError(f"--model is needed for --kind {args.kind} (only brief asks no LLM)")
        endpoint = chat_endpoint.EndpointSettings(
            **chat_endpoint.settings_from_args(args, NAMES, needs_key=asks)
        )
        settings = Settings(
            kinds=kinds,
            endpoint=endpoint,
            prompts_root=args.prompts,
            parse_retries=args.parse_retries,
            seed=args.seed,
            limit=args.limit,
            price_per_1k=_price_arg(args.price_per_1k),
        )
        try:
            report = generate(
                image_dir=args.image_dir,
                out_dir=args.out,
                settings=settings,
                captions=args.captions,
                instances=args.instances,
                annotations=args.annotations,
                progress=not args.no_progress,
            )
        except KeyboardInterrupt:
            print(
                f"interrupted: the records so far are in {args.out}; the same command goes on",
                file=sys.stderr,
            )
            return 130
        print(format_report(report), flush=True)
        return 0

    return program.run(body, args)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
