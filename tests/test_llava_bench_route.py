"""The README's LLaVA-Bench command, as written there, from this checkout: it answers the
shipped example benchmark with a tiny model and judges it with a judge this test starts
locally (tests/judge_server.py: a real HTTP server scoring from the prompt it receives)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from judge_server import JudgeServer
from test_inference_cli import cli_env, save_tiny_llava
from trainer_fixtures import REPO

HEADING = "### Judge it: LLaVA-Bench"


def readme_command() -> str:
    """The first bash block under the README's LLaVA-Bench heading."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index(HEADING) :]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.timeout(300)
def test_the_readme_command_answers_and_judges_the_example_benchmark(tmp_path):
    command = readme_command()
    assert "benchmarks/llava_bench_synthetic" in command and "workdir/tiny" in command
    model = tmp_path / "tiny"
    save_tiny_llava(model)
    with JudgeServer(model="judge-test") as judge:
        # the checkpoint, the outputs and the judge are this test's; the rest as written
        local = (
            command.replace("workdir/tiny", str(model))
            .replace("llava_bench/", f"{tmp_path}/llava_bench/")
            .replace("sk-…", "test")
            .replace(
                "--judge-model gpt-4-0314", f"--judge-model judge-test --judge-base-url {judge.url}"
            )
        )
        assert local.count(str(tmp_path)) == 4, local
        done = subprocess.run(
            ["bash", "-c", local.rstrip() + " --no-progress"],
            cwd=REPO,
            env=cli_env(),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        reviews = tmp_path / "llava_bench" / "reviews"
        summary = json.loads((reviews / "summary.json").read_text())
        lines = (reviews / "reviews.jsonl").read_text().splitlines()
        assert len(lines) == summary["questions"] == 24
        assert {json.loads(line)["category"] for line in lines} == {
            "llava_bench_conv",
            "llava_bench_detail",
            "llava_bench_complex",
        }
        # every question went to the judge once, with the model's own answer as Assistant 2
        answers = [
            json.loads(line)
            for line in (tmp_path / "llava_bench" / "answers.jsonl").read_text().splitlines()
        ]
        assert len(judge.requests) == 24
        sent = [r["messages"][-1]["content"] for r in judge.requests]
        for answer in answers:  # (8 questions share "Describe the image in detail.")
            assert any(
                f"[Question]\n{answer['prompt']}\n\n" in content
                and f"[Assistant 2]\n{answer['text']}\n\n" in content
                for content in sent
            ), answer
        assert summary["figures"]["all"]["relative_score"]["mean"] == pytest.approx(100.0)
        assert "relative" in done.stdout
