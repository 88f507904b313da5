"""The generator's run settings (`Settings`, what the records depend on) and its output
folder (`--out` of `python -m llava_jax.data.instruct`): the names of its files; done.jsonl
and skipped.jsonl, appended as each (image, kind) is done and read back on resume;
generation.json, the identity of the inputs and settings the records were made with (a
rerun with others is refused, naming them); and the end of a run: the LLaVA JSON written
from the done records and checked by the project's LLaVA JSON validation, and the report
(records, skips, tokens, cost)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from llava_jax import chat_endpoint, record_log
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


class OutDirError(InputError):
    """--out cannot hold this run's records (other inputs, damaged records, in use)."""


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
