"""The summary of a judged LLaVA-Bench folder, computed from its files alone: per category
the relative score (a ratio of means, as LLaVA's summarize_gpt_review.py computes it), over
runs its mean and standard deviation, with --swap each side's position bias; the table the
program prints, summary.json and summary.png."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

from llava_jax import record_log
from llava_jax.evaluation import llava_bench
from llava_jax.evaluation.judge_output import (
    MODEL_FIRST,
    REFERENCE_FIRST,
    OutDir,
    check_review,
    orders,
    read_record_lines,
    read_run_file,
)

SUMMARY_JSON = "summary.json"
SUMMARY_PNG = "summary.png"


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
    for number, review in read_record_lines(path):
        check_review(path, number, review)
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
    failed = [r for _, r in read_record_lines(out.failed_path)]
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
