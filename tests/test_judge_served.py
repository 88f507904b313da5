"""The judge pointed at `python -m llava_jax.serve` itself: a tiny random LLaVA answers the
judge's requests (LLaVA's system message included) through the OpenAI API. Its reviews do not
hold two scores: each is asked again, then counted as failed; the run completes, the summary
says so, and the server goes on."""

from __future__ import annotations

import json
import os

import pytest
from test_inference_cli import save_tiny_llava
from test_serve import http, running_server
from trainer_fixtures import REPO

from llava_jax.evaluation import judge

BENCHMARK = os.path.join(REPO, "benchmarks", "llava_bench_synthetic")
MODEL = "tiny-judge"


@pytest.fixture(scope="module")
def served_judge(tmp_path_factory):
    """The URL of our server on a tiny random LLaVA with room for a judge's prompt."""
    root = tmp_path_factory.mktemp("served_judge")
    model_dir = root / "model"
    save_tiny_llava(model_dir, seed=5, text={"max_position_embeddings": 1024})
    args = ["--checkpoint", model_dir, "--model-name", MODEL, "--max-batch", 2]
    with running_server(args, root / "serve.log") as (url, _):
        yield url


@pytest.mark.timeout(300)
def test_our_server_as_the_judge_completes_and_counts_its_unparsable_reviews(
    served_judge, tmp_path, capsys
):
    with open(os.path.join(BENCHMARK, "questions.jsonl")) as f:
        questions = [json.loads(line) for line in f if line.strip()]
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(
            json.dumps({"question_id": q["question_id"], "text": "A red circle.",
                        "answer_id": f"a{q['question_id']}", "model_id": "test"}) + "\n"
            for q in questions
        )
    )  # fmt: skip
    out = tmp_path / "reviews"
    argv = ["--benchmark", BENCHMARK, "--answers", str(answers), "--out", str(out)]
    argv += ["--judge-base-url", f"{served_judge}/v1", "--judge-model", MODEL]
    argv += ["--max-tokens", "8", "--parse-retries", "1", "--concurrency", "2", "--no-progress"]
    assert judge.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    reviews_file = out / "reviews.jsonl"  # (none when every review failed)
    lines = reviews_file.read_text().splitlines() if reviews_file.exists() else []
    reviewed = [json.loads(line) for line in lines]
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    # every question reviewed or counted failed, none twice; a random model's replies hold
    # no two scores on their first line: counted, never averaged in
    assert len(reviewed) + len(failed) == len(questions) == 24
    assert len({r["question_id"] for r in reviewed + failed}) == len(questions)
    figures = summary["figures"]["all"]  # one run: each figure's mean is that run's
    assert figures["failed"]["mean"] == len(failed) > 0
    assert figures["count"]["mean"] == len(reviewed)
    assert all(f["reason"] for f in summary["failed"])
    assert all(len(r["tuple"]) == 2 and min(r["tuple"]) >= 0 for r in reviewed)
    assert (out / "summary.png").stat().st_size > 0
    assert http(f"{served_judge}/health")[1]["status"] == "ok"
