"""A very small version of configs/tiny.py, runnable in-process or as `python -m llava_jax.main`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import numpy as np

from llava_jax.checkpoint import restore_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough for a few seconds of training on 2 cores; same code paths as the main job.
OVERRIDES = {
    "data.synthetic_num_train": 192,
    "data.synthetic_num_test": 24,
    "data.global_batch_size": 8,
    "train.num_steps": 12,
    "train.log_every": 1,
    "train.checkpoint_every": 3,
    "eval.num_records": 0,
    "eval.loss_batches": 0,
    "optimizer.learning_rate": 3e-3,
}


def tiny_config(data_dir: str, variant: str | None = None, **overrides):
    """configs/tiny.py (`:variant`, e.g. "onevision") with OVERRIDES, then `overrides`
    (dots written as `__`)."""
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import tiny

    config = tiny.get_config(variant)
    values = {**OVERRIDES, "data.data_dir": data_dir}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    for key, value in values.items():
        section, _, field = key.rpartition(".")
        target = config
        for part in section.split("."):
            target = target[part]
        target[field] = value
    return config


def train_a_few_steps(config, workdir: str) -> dict:
    """Trains and evaluates `config` in `workdir` (in process) -> the run's summary, having
    checked what every few-step run must show: finite losses that fall over
    `train.num_steps` steps, a finite held-out loss and answers to some questions."""
    import json

    from llava_jax.train.trainer import train_and_evaluate

    summary = train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        losses = [json.loads(line)["loss"] for line in file if '"loss"' in line]
    assert len(losses) == config.train.num_steps, losses
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert np.isfinite(summary["eval"]["eval_loss"])
    assert summary["eval"]["num_examples"] > 0
    return summary


def main_command(workdir: str, data_dir: str, **overrides) -> list[str]:
    values = {**OVERRIDES, "data.data_dir": data_dir}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    flags = [f"--config.{k}={v}" for k, v in values.items()]
    return [
        sys.executable,
        "-m",
        "llava_jax.main",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        *flags,
    ]


def xla_flags(devices: int) -> str:
    """This process's XLA_FLAGS (conftest.py's) with `devices` fake CPU devices instead."""
    kept = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count=")
    ]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def subprocess_env(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def wait_for_step(workdir: str, step: int, process: subprocess.Popen, timeout: float = 240):
    """Block until metrics.jsonl has logged `step` (the process is still running)."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before step {step}")
        if os.path.exists(path):
            with open(path) as f:
                if any(f'"step": {step},' in line for line in f):
                    return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def run_until(command: list[str], workdir: str, step: int, sig: int) -> tuple[int, str]:
    """Start `command` (a training run in `workdir`), send `sig` once it has logged `step`,
    wait for it to end -> (exit code, stderr)."""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_step(workdir, step, process)
    except AssertionError:
        process.kill()
        raise AssertionError(process.communicate()[1][-3000:]) from None
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def checkpoint_params(workdir: str, step: int) -> dict[str, np.ndarray]:
    """The parameters saved at `step`, flattened to `path -> numpy`, on the host."""
    params = restore_params(workdir, step=step)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
