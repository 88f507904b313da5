"""LoRA through the trainer: from a checkpoint, exact resume after SIGKILL, frozen base."""

from __future__ import annotations

import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from trainer_fixtures import (
    REPO,
    checkpoint_params,
    main_command,
    run_until,
    subprocess_env,
    tiny_config,
)

from llava_jax import checkpoint as ckpt
from llava_jax.inference.load import load_model
from llava_jax.sharding import make_mesh
from llava_jax.train.trainer import train_and_evaluate

TOTAL = 12
# LoRA with dropout on an int8 base: every new path (fresh adapters on a restored base,
# quantized storage, dropout masks drawn per step) must resume exactly.
LORA = {
    "model__lora__rank": 4,
    "model__lora__alpha": 8.0,
    "model__lora__dropout": 0.1,
    "model__lora__base_dtype": "int8",
    "train__train_pattern": "proj/.*",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_dir):
    """A tiny model trained 3 steps: the checkpoint LoRA starts from."""
    workdir = str(tmp_path_factory.mktemp("base"))
    train_and_evaluate(tiny_config(data_dir, train__num_steps=3), workdir)
    return workdir


def _command(workdir, data_dir, base):
    return main_command(
        workdir, data_dir, init__mode="checkpoint", init__checkpoint_path=base, **LORA
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir, base):
    """A LoRA run (int8 base, dropout) from `base`, TOTAL steps without a stop."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    subprocess.run(
        _command(workdir, data_dir, base),
        cwd=REPO,
        env=subprocess_env(),
        check=True,
        capture_output=True,
        timeout=600,
    )
    return workdir


def test_lora_from_a_checkpoint_resumes_bitwise_after_sigkill(
    tmp_path, data_dir, base, uninterrupted
):
    workdir = str(tmp_path / "interrupted")
    code, _ = run_until(_command(workdir, data_dir, base), workdir, 7, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert max(ckpt.TrainCheckpoints(workdir).steps()) < TOTAL
    result = subprocess.run(
        _command(workdir, data_dir, base),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr
    resumed = checkpoint_params(workdir, TOTAL)
    reference = checkpoint_params(uninterrupted, TOTAL)
    assert resumed.keys() == reference.keys()
    for key in resumed:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)

    # The base the adapters sit on is the checkpoint's, frozen: the vision tower and the
    # unadapted decoder leaves bitwise, the adapted kernels as their int8 quantization.
    start = checkpoint_params(base, 3)
    factors = [k for k in resumed if "lora_" in k]
    assert factors and all(k.startswith("['llm']['layers']") for k in factors)
    for key, value in start.items():
        if key.startswith("['img']") or "norm" in key or "embed" in key:
            np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    query = "['llm']['layers']['attn']['query']"
    assert resumed[f"{query}['kernel_int8']"].dtype == np.int8
    dequantized = resumed[f"{query}['kernel_int8']"] * resumed[f"{query}['scale']"][:, None]
    kernel = start[f"{query}['kernel']"]
    assert np.abs(dequantized - kernel).max() <= np.abs(kernel).max() / 127
    # and the adapters learned something
    assert any(np.any(resumed[k]) for k in factors if k.endswith("['lora_b']"))


def test_a_lora_workdir_runs_converts_and_is_refused_as_a_base(tmp_path, data_dir, uninterrupted):
    lora_run = uninterrupted
    with pytest.raises(ValueError, match="holds a LoRA model: merge its adapters"):
        train_and_evaluate(
            tiny_config(
                data_dir,
                train__num_steps=1,
                init__mode="checkpoint",
                init__checkpoint_path=lora_run,
            ),
            str(tmp_path / "next"),
        )
    # Inference reads the LoRA workdir (adapters on an int8 base) alone and on a mesh.
    single = load_model(lora_run)
    on_mesh = load_model(lora_run, mesh=make_mesh((2, 2, 2)))
    query = on_mesh.params["llm"]["layers"]["attn"]["query"]
    assert query["kernel_int8"].dtype == jnp.int8 and "lora_a" in query
    assert len(query["lora_a"].sharding.device_set) == 8
    ids = single.prompt_ids([single.user_turn("What color are the objects?", with_image=False)])
    tokens = [m.generate([ids], None, None, m.sampling(6)).tokens[0] for m in (single, on_mesh)]
    np.testing.assert_array_equal(tokens[0], tokens[1])
    # The workdir converts as it is: merged for transformers, and the adapter for PEFT.
    for command in (
        ["params-to-hf", "--merge-lora", "--out", str(tmp_path / "hf")],
        ["lora-to-peft", "--out", str(tmp_path / "adapter")],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "llava_jax.convert", command[0], "--params", lora_run]
            + command[1:],
            cwd=REPO,
            env=subprocess_env(devices=1),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
