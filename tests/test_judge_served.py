"""The judge and the instruction-data generator pointed at `python -m llava_jax.serve` itself:
a tiny random LLaVA answers their requests (system messages included) through the OpenAI API.
Its reviews do not hold two scores: each is asked again, then counted as failed; the run
completes, the summary says so, and the server goes on."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image
from test_inference_cli import save_tiny_llava
from test_serve import http, running_server
from trainer_fixtures import REPO

from llava_jax.data import instruct
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


@pytest.mark.timeout(300)
def test_our_server_as_the_data_generator_completes_and_counts_what_did_not_parse(
    served_judge, tmp_path, capsys
):
    """The instruction-data generator with `python -m llava_jax.serve` as its LLM: a random
    model's replies do not parse (or are empty); each is asked again, then skipped and
    counted by reason; the run completes with a (here empty) validated LLaVA JSON."""
    prompts = tmp_path / "prompts"  # short prompts in LLaVA's layout: they fit the context
    for kind, reply in (
        ("conversation", "Question:\nWhat is red?\n===\nAnswer:\nThe ball."),
        ("detail_description", "A red ball lies on green grass."),
        ("complex_reasoning", "Question:\nWhy is the ball here?\n===\nAnswer:\nA game."),
    ):
        (prompts / kind).mkdir(parents=True)
        (prompts / kind / "system_message.txt").write_text("You see one image. Talk about it.\n")
        (prompts / kind / "000_caps.txt").write_text(
            "A red ball on grass.\n\nball: [0.1, 0.2, 0.3, 0.4]\n"
        )
        (prompts / kind / "000_conv.txt").write_text(reply + "\n")
    images = tmp_path / "images"
    images.mkdir()
    notes = []
    for k in range(3):
        Image.new("RGB", (16, 16), (60 * k, 90, 30)).save(images / f"{k}.png")
        notes.append(json.dumps({"image": f"{k}.png", "captions": [f"A ball number {k}."]}))
    (tmp_path / "notes.jsonl").write_text("\n".join(notes) + "\n")
    out = tmp_path / "generated"
    argv = ["--image-dir", str(images), "--annotations", str(tmp_path / "notes.jsonl")]
    argv += ["--out", str(out), "--prompts", str(prompts), "--base-url", f"{served_judge}/v1"]
    argv += ["--model", MODEL, "--max-tokens", "8", "--parse-retries", "1", "--no-progress"]
    assert instruct.main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    made = sum(report["records"].values())
    skipped = {kind: sum(reasons.values()) for kind, reasons in report["skipped"].items()}
    # every (image, kind) made records or is counted skipped, by reason
    per_kind = {kind: report["records"][kind] + skipped.get(kind, 0) for kind in report["kinds"]}
    assert per_kind == {"conversation": 3, "detail_description": 3, "complex_reasoning": 3}
    assert sum(skipped.values()) > 0
    reasons = {r for kind in report["skipped"].values() for r in kind}
    assert reasons <= {"unparsable", "empty_reply", "leaks_source"}
    lines = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert all(line["attempts"] == 2 for line in lines)
    assert len(json.loads((out / "llava_instruct.json").read_text())) == made
    assert report["usage"]["prompt_tokens"] > 0  # the server's usage, summed
    assert http(f"{served_judge}/health")[1]["status"] == "ok"
