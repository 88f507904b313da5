"""Two processes x 4 CPU devices (gloo on localhost) train like one process x 8 devices:
the train step alone, and the whole trainer through launch/local_multiprocess.sh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
from train_fixtures import WELL_CONDITIONED, build, run_steps
from trainer_fixtures import REPO, main_command, subprocess_env, tiny_config

from llava_jax import checkpoint as ckpt
from llava_jax.train.trainer import train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process():
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "multiprocess_train_worker.py"),
                str(port),
                "2",
                str(i),
                "4",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr[-3000:]
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    # each process fed only its own half of the global batch
    assert outputs[0]["local_rows"] != outputs[1]["local_rows"]

    _, state, step = build((8, 1, 1), **WELL_CONDITIONED)
    _, single = run_steps(step, state)
    for output in outputs:
        np.testing.assert_allclose(output["losses"], single, rtol=1e-5)


def test_local_multiprocess_trains_checkpoints_and_resumes_like_one_process(tmp_path):
    """launch/local_multiprocess.sh, 2 processes x 4 devices: stop at step 3 with a
    checkpoint, run again to step 6; the losses equal one process x 8 devices."""
    data_dir = str(tmp_path / "tfds")
    steps = 6
    overrides = dict(train__num_steps=steps, optimizer__eps=1e-3)  # see WELL_CONDITIONED
    single = tmp_path / "single"
    train_and_evaluate(tiny_config(data_dir, **overrides), str(single))

    workdir = tmp_path / "multi"
    command = main_command(str(workdir), data_dir, **overrides)
    launcher = [os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", "4", "--", *command[3:]]
    env = subprocess_env()
    env["LOG_DIR"] = str(tmp_path / "logs")
    # The second run ends with the held-out evaluation, generating on the 2-process mesh.
    evaluation = ["--config.eval.num_records=2", "--config.eval.max_new_tokens=4"]
    for extra in (["--config.train.stop_at_step=3"], evaluation):
        result = subprocess.run(
            launcher + extra,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        if extra != evaluation:
            assert ckpt.TrainCheckpoints(str(workdir)).steps()[-1] == 3
    assert "at step 3" in result.stderr  # the second run resumed
    assert json.loads((workdir / "eval.json").read_text())["num_examples"] > 0

    def losses(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    multi, one = losses(workdir), losses(single)
    assert sorted(multi) == list(range(1, steps + 1))
    np.testing.assert_allclose(
        [multi[s] for s in sorted(multi)], [one[s] for s in sorted(one)], rtol=1e-5
    )
