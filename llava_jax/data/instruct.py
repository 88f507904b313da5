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
import collections
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from llava_jax import chat_endpoint, program, record_log
from llava_jax.data import annotations as annotations_lib
from llava_jax.data import instruct_format as fmt
from llava_jax.data.annotations import ImageAnnotations
from llava_jax.errors import InputError

OUT_JSON = "llava_instruct.json"
DONE_FILE = "done.jsonl"
SKIPPED_FILE = "skipped.jsonl"
REPORT_FILE = "report.json"
RUN_FILE = "generation.json"
LOCK_FILE = ".instruct.lock"
# What must match for a rerun to continue the records in --out.
IDENTITY_SETTINGS = ("model", "temperature", "max_tokens", "seed")
# Why an (image, kind) has no records: skipped.jsonl's and the report's reasons.
SKIP_REASONS = ("request_failed", *fmt.REPLY_PROBLEMS, "invalid_record")
NAMES = chat_endpoint.Names("the LLM", "--base-url", "--model")


class OutDirError(InputError):
    """--out cannot hold this run's records (other inputs, damaged records, in use)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run is asked to do, beyond its inputs."""

    kinds: tuple[str, ...]
    endpoint: chat_endpoint.EndpointSettings
    prompts_root: str = fmt.DEFAULT_PROMPTS
    parse_retries: int = 2
    seed: int = 0
    limit: int | None = None
    price_per_1k: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class Task:
    """One (image, kind) to make records for."""

    image: ImageAnnotations
    kind: str


# --- the output folder ------------------------------------------------------------------------


class OutDir:
    """--out: what is done, appending what comes, and the final files."""

    def __init__(self, path: str):
        self.path = path
        self.lock = record_log.FolderLock(path, LOCK_FILE, "--out", "generator", OutDirError)
        self.appender = record_log.Appender()

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def read(self, name: str) -> list[tuple[int, dict[str, Any]]]:
        again = "that (image, kind) is asked for again"
        return record_log.read_appended(self.file(name), OutDirError, "kind", again)

    def done(self) -> tuple[dict[tuple[str, str], dict], dict[tuple[str, str], dict]]:
        """(image, kind) -> its done line, and -> its skipped line; one line each at most."""
        seen: dict[tuple[str, str], str] = {}
        tables: list[dict[tuple[str, str], dict]] = []
        for name in (DONE_FILE, SKIPPED_FILE):
            table = {}
            for number, line in self.read(name):
                where = f"{self.file(name)}:{number}"
                image = line.get("image")
                if not isinstance(image, str) or line["kind"] not in fmt.KINDS:
                    raise OutDirError(f"{where}: not a line of this generator (image and kind)")
                if name == DONE_FILE and not isinstance(line.get("records"), list):
                    raise OutDirError(f"{where}: no 'records' list; remove the line to redo it")
                key = (image, line["kind"])
                if key in seen:
                    raise OutDirError(
                        f"{where}: {image} ({line['kind']}) is recorded a second time (first: "
                        f"{seen[key]}); remove one of the lines"
                    )
                seen[key] = where
                table[key] = line
            tables.append(table)
        return tables[0], tables[1]

    def start(self, identity: dict[str, Any]) -> None:
        """Write generation.json, or check the one here when records depend on it."""
        path = self.file(RUN_FILE)
        has_records = any(
            os.path.exists(self.file(n)) and os.path.getsize(self.file(n))
            for n in (DONE_FILE, SKIPPED_FILE)
        )
        if has_records:
            try:
                with open(path, "rb") as f:
                    old = json.loads(f.read())
            except (OSError, ValueError) as err:
                raise OutDirError(
                    f"--out {self.path} holds records but its {RUN_FILE} cannot be read ({err}); "
                    "choose another --out"
                ) from None
            changes = identity_changes(old, identity)
            if changes:
                raise OutDirError(
                    f"--out {self.path} holds records made with other inputs: "
                    + "; ".join(changes)
                    + ". Use another --out, or remove its done.jsonl and skipped.jsonl"
                )
            identity = {**identity, "prompts": {**old.get("prompts", {}), **identity["prompts"]}}
        record_log.write_atomically(path, json.dumps(identity, indent=2) + "\n")

    def add(self, name: str, line: dict[str, Any]) -> None:
        self.appender.append(self.file(name), line)  # flushed: a kill keeps it

    def close(self) -> None:
        self.appender.close()
        self.lock.release()


def run_identity(files: dict[str, str], image_dir: str, settings: Settings) -> dict[str, Any]:
    """generation.json: what the records depend on (hashes, settings)."""
    e = settings.endpoint
    prompts = {}
    for kind in settings.kinds:
        if kind in fmt.LLM_KINDS:
            prompts[kind] = fmt.load_prompts(settings.prompts_root, kind).digest()
    return {
        "files": {flag: record_log.sha256_file(path) for flag, path in files.items()},
        "paths": {flag: os.path.abspath(path) for flag, path in files.items()},
        "image_dir": os.path.abspath(image_dir),
        "prompts": prompts,
        "model": e.model,
        "temperature": e.temperature,
        "max_tokens": e.max_tokens,
        "seed": settings.seed,
        "base_url": e.base_url,
    }


def identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    old_files = old.get("files") or {}
    for flag, digest in new["files"].items():
        if old_files.get(flag) != digest:
            changes.append(f"{flag} ({new['paths'][flag]}) is not the file they were made from")
    for flag in old_files:
        if flag not in new["files"]:
            changes.append(f"they were made with {flag} {old['paths'].get(flag)}")
    for kind, digest in new["prompts"].items():
        if (old.get("prompts") or {}).get(kind, digest) != digest:
            changes.append(f"the {kind} prompts (--prompts) are not those they were made with")
    for setting in IDENTITY_SETTINGS:
        if old.get(setting) != new[setting]:
            flag = "--" + setting.replace("_", "-")
            changes.append(
                f"{flag} {json.dumps(new[setting])} (they were made with "
                f"{json.dumps(old.get(setting))})"
            )
    return changes


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


# --- finishing: validation, the LLaVA JSON, the report ------------------------------------------


def _validation_problem(records: list[dict], image_dir: str, decoded: dict[str, str]) -> str:
    """'' or the first problem the project's LLaVA JSON validation finds in `records`
    (`decoded`: image path -> why it does not decode, '' when it does; filled as it goes)."""
    from llava_jax.data.datasets import llava_json

    for record in records:
        paths, _, problem = llava_json.check_record(record, image_dir)
        if problem is not None:
            return str(problem)
        for path in paths:
            if path not in decoded:
                decoded[path] = llava_json.image_problem(path, image_dir)
            if decoded[path]:
                return str(
                    llava_json.Problem("unreadable_image", record["id"], path, decoded[path])
                )
    return ""


def finish(
    out: OutDir,
    images: Sequence[ImageAnnotations],
    settings: Settings,
    image_dir: str,
    progress: bool = True,
) -> tuple[int, dict[tuple[str, str], str]]:
    """Write llava_instruct.json (images in annotation order, kinds in --kind order) from
    every done (image, kind) whose records pass the project's LLaVA JSON validation, and
    validate the file whole. Returns the records written and the (image, kind) left out,
    with why (checked again on every run: an image mended is taken the next time)."""
    from llava_jax.data.datasets import llava_json

    done, _ = out.done()
    records, invalid = [], {}
    decoded: dict[str, str] = {}
    for image in images:
        for kind in settings.kinds:
            line = done.get((image.image, kind))
            if line is None:
                continue
            problem = _validation_problem(line["records"], image_dir, decoded)
            if problem:
                invalid[(image.image, kind)] = problem
            else:
                records.extend(line["records"])
    final = out.file(OUT_JSON)
    with tempfile.NamedTemporaryFile(
        "w", dir=out.path, prefix=".", suffix=".json", delete=False, encoding="utf-8"
    ) as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
        f.write("\n")
    _, report = llava_json.validate(f.name, image_dir, progress=progress)
    if report.dropped:
        os.unlink(f.name)
        raise InputError(
            f"{final} not written: the LLaVA JSON validation dropped {report.dropped} of "
            f"{report.total} records that passed it a moment before (images changing?):\n"
            + report.summary()
        )
    os.replace(f.name, final)
    return len(records), invalid


def _price(usage: dict[str, int], price: tuple[float, float] | None) -> float | None:
    if price is None:
        return None
    return usage["prompt_tokens"] / 1000 * price[0] + usage["completion_tokens"] / 1000 * price[1]


def build_report(
    out: OutDir,
    images: Sequence[ImageAnnotations],
    annotation_report: Any,
    settings: Settings,
    written: int,
    invalid: dict[tuple[str, str], str],
    retries: int,
) -> dict[str, Any]:
    """Records per kind, skipped per kind and reason, annotation skips, tokens, cost."""
    done, skipped = out.done()
    selected = {(image.image, kind) for image in images for kind in settings.kinds}
    usage = collections.Counter()
    records = collections.Counter()
    reasons: dict[str, collections.Counter] = {}
    for key, line in done.items():
        if key in selected and key not in invalid:
            records[line["kind"]] += len(line["records"])
        elif key in selected:
            reasons.setdefault(line["kind"], collections.Counter())["invalid_record"] += 1
    for key, line in skipped.items():
        if key in selected:
            reasons.setdefault(line["kind"], collections.Counter())[line.get("reason", "?")] += 1
    for key, line in [*done.items(), *skipped.items()]:
        if key in selected:
            for name in ("prompt_tokens", "completion_tokens"):
                usage[name] += int((line.get("usage") or {}).get(name) or 0)
    pending = len(selected) - len(selected & (set(done) | set(skipped)))
    usage_dict = {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
    }
    return {
        "images": len(images),
        "kinds": list(settings.kinds),
        "records": {kind: records[kind] for kind in settings.kinds},
        "records_written": written,
        "skipped": {
            kind: {r: reasons[kind][r] for r in SKIP_REASONS if reasons[kind][r]}
            for kind in settings.kinds
            if kind in reasons
        },
        "pending": pending,
        "invalid": [
            {"image": image, "kind": kind, "problem": problem}
            for (image, kind), problem in invalid.items()
        ],
        "annotations": annotation_report.to_json(),
        "usage": usage_dict,
        "estimated_cost": _price(usage_dict, settings.price_per_1k),
        "retries_this_run": retries,
        "output": out.file(OUT_JSON),
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['images']} images; records per kind:"]
    for kind in report["kinds"]:
        skipped = report["skipped"].get(kind, {})
        said = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
        lines.append(
            f"  {kind}: {report['records'][kind]} records"
            + (f"; skipped {sum(skipped.values())} ({said})" if skipped else "")
        )
    notes = report["annotations"]
    if notes["counts"]:
        said = ", ".join(f"{reason} {n}" for reason, n in notes["counts"].items())
        lines.append(f"annotations skipped: {said} (first: {notes['examples'][0]['detail']})")
    usage = report["usage"]
    tokens = f"tokens: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion"
    if report["estimated_cost"] is not None:
        tokens += f"; estimated cost {report['estimated_cost']:.4f} (--price-per-1k)"
    lines.append(tokens)
    if report["pending"]:
        lines.append(
            f"incomplete: {report['pending']} (image, kind) not done yet; run the same command "
            "again to finish"
        )
    else:
        lines.append(f"wrote {report['records_written']} records to {report['output']} (validated)")
    return "\n".join(lines)


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
    parser.add_argument(
        "--base-url", default=chat_endpoint.OPENAI_BASE_URL, help="OpenAI-compatible API"
    )
    parser.add_argument("--model", help="the LLM's model name (needed unless --kind brief)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument(
        "--retries", type=int, default=5, help="on 429, 5xx, timeouts, lost connections"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
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
        chat_endpoint.check_settings(
            base_url=args.base_url, url_flag="--base-url", concurrency=args.concurrency,
            retries=args.retries, max_tokens=args.max_tokens, timeout=args.timeout,
            temperature=args.temperature,
        )  # fmt: skip
        if args.parse_retries < 0:
            raise InputError(f"--parse-retries must be >= 0, got {args.parse_retries}")
        if args.limit is not None and args.limit < 1:
            raise InputError(f"--limit must be >= 1, got {args.limit}")
        if asks and not args.model:
            raise InputError(f"--model is needed for --kind {args.kind} (only brief asks no LLM)")
        endpoint = chat_endpoint.EndpointSettings(
            base_url=args.base_url,
            model=args.model or "",
            api_key=chat_endpoint.api_key(args.base_url, "the LLM", "--base-url") if asks else "",
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            timeout=args.timeout,
            retries=args.retries,
            concurrency=args.concurrency,
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
