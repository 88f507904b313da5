"""The trainer: exact resume after SIGKILL, SIGTERM, another mesh, stage chaining, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
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
from llava_jax.data.pipeline import make_train_iterator, to_global_batch, tokenizer_for
from llava_jax.models.inputs import ImageGeometry
from llava_jax.train.config import RunConfig, TrainConfig
from llava_jax.train.trainer import (
    Run,
    initial_model,
    make_run_setup,
    train_and_evaluate,
)

TOTAL = 12
# The resume test runs with packed rows: the packer's plan is part of what must resume.
PACKED = {"data__packing": True, "data__max_len": 224}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    subprocess.run(
        main_command(workdir, data_dir, **PACKED),
        cwd=REPO,
        env=subprocess_env(),
        check=True,
        capture_output=True,
        timeout=600,
    )
    return workdir


def _run_until(workdir, data_dir, step, sig):
    return run_until(main_command(workdir, data_dir, **PACKED), workdir, step, sig)


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sigkill_twice_and_sigterm_then_rerun_end_bitwise_equal(tmp_path, data_dir, uninterrupted):
    """Killed at two steps, preempted at a third, each time started again with the same
    command (packed rows): the final parameters equal an uninterrupted run's, bit for bit."""
    workdir = str(tmp_path / "interrupted")
    for kill_at in (2, 7):
        code, _ = _run_until(workdir, data_dir, kill_at, signal.SIGKILL)
        assert code == -signal.SIGKILL
        assert max(ckpt.TrainCheckpoints(workdir).steps(), default=0) < TOTAL

    code, stderr = _run_until(workdir, data_dir, 10, signal.SIGTERM)
    assert code == 0, stderr[-3000:]
    saved = max(ckpt.TrainCheckpoints(workdir).steps())
    assert 10 <= saved < TOTAL and saved % 3 != 0  # saved on SIGTERM, not periodically
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert saved == max(json.loads(line)["step"] for line in f)

    result = subprocess.run(
        main_command(workdir, data_dir, **PACKED),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {os.path.join(workdir, 'checkpoints')} at step {saved}" in result.stderr
    _assert_bitwise_equal(
        checkpoint_params(workdir, TOTAL), checkpoint_params(uninterrupted, TOTAL)
    )


def test_restore_onto_another_mesh(tmp_path, data_dir):
    """Saved on (8,1,1), restored onto (2,2,2): equal parameters, same next-step loss."""
    from llava_jax.sharding import make_mesh
    from llava_jax.train.step import jit_train_step, make_train_step, metrics_to_host

    workdir = str(tmp_path / "run")
    config = tiny_config(data_dir, train__num_steps=4, mesh__shape=(8, 1, 1))
    train_and_evaluate(config, workdir)

    run = RunConfig.from_config(config)
    tokenizer = tokenizer_for(run.data)
    model_config, _ = initial_model(run, tokenizer)
    geometry = ImageGeometry.of(model_config)
    results = {}
    for shape in ((8, 1, 1), (2, 2, 2)):
        setup, schedule = make_run_setup(run, model_config, 4, mesh=make_mesh(shape))
        iterator = make_train_iterator(run.data, geometry, tokenizer)
        step, state = ckpt.TrainCheckpoints(workdir).restore_latest(setup.abstract_state, iterator)
        assert step == 4
        assert state.params["llm"]["lm_head"]["kernel"].sharding.mesh.devices.shape == shape
        params = {
            jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_leaves_with_path(state.params)
        }
        train_step = jit_train_step(setup, make_train_step(setup, schedule), 8)
        _, metrics = train_step(state, to_global_batch(next(iterator), setup.mesh))
        results[shape] = (params, metrics_to_host(metrics)["loss"])
        iterator.close()
    (params_a, loss_a), (params_b, loss_b) = results.values()
    _assert_bitwise_equal(params_a, params_b)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)


def test_stage_chaining_keeps_frozen_towers_bitwise(tmp_path, data_dir):
    pretrain = str(tmp_path / "pretrain")
    finetune = str(tmp_path / "finetune")
    train_and_evaluate(
        tiny_config(
            data_dir,
            train__num_steps=3,
            train__train_pattern="proj/.*",
            data__template="plain",
            data__synthetic_style="caption",
        ),
        pretrain,
    )
    train_and_evaluate(
        tiny_config(
            data_dir,
            train__num_steps=3,
            train__train_pattern="proj/.*|llm/.*",
            init__mode="checkpoint",
            init__checkpoint_path=pretrain,
        ),
        finetune,
    )
    # The initial parameters of the pretrain run: same seed, from scratch.
    start = str(tmp_path / "start")
    train_and_evaluate(
        tiny_config(
            data_dir,
            train__num_steps=1,
            train__train_pattern="proj/.*",
            optimizer__learning_rate=0.0,
        ),
        start,
    )
    initial = checkpoint_params(start, 1)
    after_1 = checkpoint_params(pretrain, 3)
    after_2 = checkpoint_params(finetune, 3)

    def tower(params, name):
        return {k: v for k, v in params.items() if k.startswith(f"['{name}']")}

    _assert_bitwise_equal(tower(after_1, "img"), tower(initial, "img"))
    _assert_bitwise_equal(tower(after_2, "img"), tower(initial, "img"))
    _assert_bitwise_equal(tower(after_1, "llm"), tower(initial, "llm"))
    changed = [k for k in tower(after_2, "llm") if not np.array_equal(after_2[k], after_1[k])]
    assert changed, "stage 2 trains the LLM"
    assert any(not np.array_equal(after_1[k], initial[k]) for k in tower(after_1, "proj"))


# --- start-up errors -------------------------------------------------------------------------


def _main_fails(tmp_path, *flags):
    command = [
        sys.executable,
        "-m",
        "llava_jax.main",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'w'}",
        *flags,
    ]
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    return result.stderr


def test_unknown_override_key_is_named(tmp_path):
    assert "nmu_steps" in _main_fails(tmp_path, "--config.train.nmu_steps=3")


def test_wrong_override_type_is_named(tmp_path):
    stderr = _main_fails(tmp_path, "--config.train.num_steps=many")
    assert "num_steps" in stderr and "many" in stderr


def test_missing_data_path_is_named(tmp_path, data_dir):
    config = tiny_config(
        data_dir,
        data__source="llava_json",
        data__json_path=str(tmp_path / "nowhere.json"),
        data__image_dir=str(tmp_path),
        data__tokenizer_path=str(tmp_path),
    )
    with pytest.raises(FileNotFoundError, match="config.data.json_path: .*nowhere.json"):
        train_and_evaluate(config, str(tmp_path / "w"))


def test_per_device_batch_size_sets_the_micro_batches():
    train = TrainConfig(per_device_batch_size=2)
    assert train.accumulation_steps_for(32, data_parallel_size=8) == 2  # 32 = 2 per device x 8 x 2
    assert TrainConfig(accumulation_steps=4).accumulation_steps_for(32, 8) == 4  # unset: as given
    with pytest.raises(ValueError, match="per_device_batch_size=3.*32 is not a multiple of 3 x 8"):
        TrainConfig(per_device_batch_size=3).accumulation_steps_for(32, data_parallel_size=8)


def test_unwritable_workdir_is_named(tmp_path, data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match=f"workdir {blocker}/run cannot be written"):
        train_and_evaluate(tiny_config(data_dir), str(blocker / "run"))


def test_run_writes_metrics_tensorboard_plot_and_eval(tmp_path, data_dir):
    workdir = tmp_path / "run"
    config = tiny_config(
        data_dir,
        train__num_steps=4,
        train__log_every=2,
        eval__num_records=4,
        eval__loss_batches=1,
        eval__max_new_tokens=4,
    )
    summary = train_and_evaluate(config, str(workdir))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4]
    for record in train_records:
        for key in (
            "loss",
            "learning_rate",
            "grad_norm",
            "real_tokens_per_second",
            "padding_fraction",
            "examples_seen",
        ):
            assert np.isfinite(record[key]), key
    assert train_records[-1]["examples_seen"] == 4 * 8
    assert all(0.1 < r["padding_fraction"] < 0.9 for r in train_records)  # rows of ~70 / 112
    assert all(r["conversations_per_step"] == 8 for r in train_records)  # unpacked: rows
    # MFU: the counted FLOPs over the time against the peak (measured on this CPU).
    last = train_records[-1]
    assert 0.0 < last["mfu"] < 1.0
    assert last["tflops_per_device"] > 0.0
    result = json.loads((workdir / "eval.json").read_text())
    assert result["num_examples"] > 0
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["blind_accuracy"] <= 1.0
    assert result["accuracy"] == summary["eval"]["accuracy"]
    assert np.isfinite(result["eval_loss"])
    assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(name.startswith("events.out") for name in os.listdir(workdir / "tensorboard"))
    assert (workdir / "tokenizer" / "tokenizer.json").exists()


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, data_dir
):
    from llava_jax.train.trainer import TrainingStopped

    workdir = str(tmp_path / "diverges")
    # warm-up makes step 1's learning rate 0; then updates of ~1e30 overflow the model
    config = tiny_config(
        data_dir,
        optimizer__learning_rate=1e30,
        optimizer__warmup_ratio=0.2,
        train__checkpoint_every=1,
        train__num_steps=10,
    )
    with pytest.raises(TrainingStopped, match=r"at step (\d+)|after step (\d+)") as stopped:
        train_and_evaluate(config, workdir)
    steps = ckpt.TrainCheckpoints(workdir).steps()
    assert steps, "the first, good steps were saved"
    assert (
        f"The last good checkpoint is {os.path.join(workdir, 'checkpoints', str(steps[-1]))}"
        in (str(stopped.value))
    )
    params = checkpoint_params(workdir, steps[-1])
    assert all(np.isfinite(v).all() for v in params.values())


def test_local_multiprocess_trains_checkpoints_and_resumes_like_one_process(tmp_path, data_dir):
    """launch/local_multiprocess.sh, 2 processes x 4 devices: stop at step 3 with a
    checkpoint, run again to step 6; the losses equal one process x 8 devices."""
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


def test_three_evaluations_in_one_run_compile_each_program_once(tmp_path, data_dir):
    """The evaluator is built once: the eval-loss step, the prefill and the decode loop are
    each traced (compiled) once for the periodic evaluations and the final one."""
    config = tiny_config(
        data_dir,
        train__num_steps=30,
        train__eval_every=10,
        eval__num_records=6,
        eval__batch_size=8,
        eval__loss_batches=2,
        eval__max_new_tokens=4,
    )
    run = Run(config, str(tmp_path / "run"))
    summary = run.execute()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "eval/accuracy" in r] == [10, 20, 30]
    assert summary["eval"]["num_examples"] > 8  # more than one batch of questions
    assert all(e["answer"] for e in summary["eval"]["examples"])  # the decode loop ran
    assert run.evaluator.all_trace_counts == {"eval_loss": 1, "prefill": 1, "decode": 1}


def test_profile_steps_write_a_trace_of_those_steps(tmp_path, data_dir):
    workdir = tmp_path / "run"
    config = tiny_config(data_dir, train__num_steps=4, train__profile_steps=(2, 3))
    train_and_evaluate(config, str(workdir))
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    with pytest.raises(ValueError, match=r"profile_steps=\(3, 2\)"):
        train_and_evaluate(tiny_config(data_dir, train__profile_steps=(3, 2)), str(workdir))


def test_a_run_config_saved_before_the_renames_reads_in_todays_names():
    """data.num_epochs became data.passes and train.micro_batches train.accumulation_steps
    (each stood beside a field of a like name and another meaning); a saved run config with
    the old names still reads, with their values, and so do older layouts."""
    from llava_jax.checkpoint import _migrated
    from llava_jax.data.config import DataConfig

    saved = {
        "model": {"vocab_follows_tokenizer": False},
        "data": {"num_epochs": 3, "global_batch_size": 8},
        "train": {"micro_batches": 4, "num_epochs": 2.0},
    }
    migrated = _migrated(saved)
    assert DataConfig.from_section(migrated["data"], "data").passes == 3
    train = TrainConfig.from_section(migrated["train"], "train")
    assert (train.accumulation_steps, train.num_epochs) == (4, 2.0)
    assert migrated["init"] == {"vocab_follows_tokenizer": False} and migrated["model"] == {}


def test_a_data_section_saved_with_the_models_image_settings_reads_without_them():
    """Before the data side read the model's geometry, the saved data section copied the
    model's image size, token count, grids and patch size; such a section still reads (the
    model section holds them), and nothing of them is left on the data settings."""
    from llava_jax.data.config import MODEL_DICTATED, DataConfig

    saved = {"image_size": 336, "num_image_tokens": 576, "image_patch_size": 14,
             "image_grid_pinpoints": [[336, 672], [672, 336]], "global_batch_size": 8}  # fmt: skip
    data = DataConfig.saved(saved, "the saved data config")
    assert data.global_batch_size == 8
    assert not any(hasattr(data, key) for key in MODEL_DICTATED)
    with pytest.raises(ValueError, match="unknown key"):  # only a saved section is forgiven
        DataConfig.from_section(saved, "config.data")
