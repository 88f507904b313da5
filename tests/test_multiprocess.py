"""Two processes x 4 CPU devices (gloo on localhost) train like one process x 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
from train_fixtures import WELL_CONDITIONED, build, run_steps

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process():
    port = _free_port()
    env = dict(os.environ)
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
