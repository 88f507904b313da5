"""Hostile inputs to the trainer and its checkpoints: each refused or survived cleanly
(docs/reliability.md lists them). Nothing in a workdir is lost; nothing wrong is trained on."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from trainer_fixtures import REPO, main_command, subprocess_env, tiny_config, wait_for_step

from llava_jax import checkpoint as ckpt
from llava_jax.data.conversation import LLAVA_V1_SYSTEM, TEMPLATE_VERSION
from llava_jax.data.datasets.synthetic import tokenizer_name
from llava_jax.data.pipeline import BatchIterator, NoUsableData
from llava_jax.inference.load import load_model
from llava_jax.train.config import RunConfig
from llava_jax.train.resume import ResumeRefused
from llava_jax.train.trainer import Run, StopNow, _StopSignals, train_and_evaluate

STEPS = 6  # checkpoints at 3 and 6

pytestmark = pytest.mark.timeout(120)  # nothing here may hang; slower tests say their own


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A finished tiny run with checkpoints 3 and 6; tests work on copies."""
    workdir = str(tmp_path_factory.mktemp("trained") / "w")
    train_and_evaluate(tiny_config(data_dir, train__num_steps=STEPS), workdir)
    return workdir


def _copy(trained: str, tmp_path) -> str:
    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    return workdir


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _snapshot(workdir: str) -> dict[str, str]:
    """Every file under `workdir` and a hash of its bytes."""
    files = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            if name == "train.log":
                continue
            with open(path, "rb") as f:
                files[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return files


# --- 1. another model shape ------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_resume_with_another_model_shape_is_refused_naming_the_field_and_touching_nothing(
    trained, tmp_path, data_dir
):
    workdir = _copy(trained, tmp_path)
    before = _snapshot(workdir)
    config = tiny_config(data_dir, train__num_steps=9, model__text__intermediate_size=96)
    with pytest.raises(ResumeRefused, match=r"config\.model\.text\.intermediate_size: \d+ in the"):
        Run(config, workdir)
    assert _snapshot(workdir) == before


@pytest.mark.timeout(300)
def test_resume_with_another_optimizer_state_layout_is_refused(trained, tmp_path, data_dir):
    workdir = _copy(trained, tmp_path)
    before = _snapshot(workdir)
    config = tiny_config(data_dir, train__num_steps=9, train__train_pattern="llm/.*")
    with pytest.raises(ResumeRefused, match="does not fit this run.*opt_state"):
        Run(config, workdir)
    assert _snapshot(workdir) == before


# --- 4 and 12. damaged checkpoints ---------------------------------------------------------------


def _damage_one_array(workdir: str, step: int, part: str) -> None:
    """Rewrite checkpoint `step`'s state with one element of one `part` array changed, as
    flipped bytes in a data file would, keeping its checksums (silent damage)."""
    import jax
    import orbax.checkpoint as ocp

    directory = os.path.join(workdir, "checkpoints", str(step), "state")
    state = ocp.StandardCheckpointer().restore(directory)
    leaves = jax.tree_util.tree_flatten_with_path(state[part])[0]
    path, leaf = next((p, x) for p, x in leaves if np.asarray(x).size > 1)
    damaged = np.array(leaf)
    damaged.reshape(-1)[0] = damaged.reshape(-1)[0] + 1
    state[part] = jax.tree_util.tree_map_with_path(
        lambda p, x: damaged if p == path else x, state[part]
    )
    shutil.rmtree(directory)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, state)
    checkpointer.wait_until_finished()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("part", ["params", "opt_state"])
def test_silently_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(
    trained, tmp_path, data_dir, part, capsys
):
    workdir = _copy(trained, tmp_path)
    _damage_one_array(workdir, STEPS, part)
    summary = train_and_evaluate(tiny_config(data_dir, train__num_steps=STEPS), workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    reason = _read(os.path.join(checkpoints, f"bad-{STEPS}", "REASON.txt"))
    assert "checksum mismatch" in reason and part in reason
    assert "at step 3" in capsys.readouterr().err  # resumed from the one before
    # the run redid steps 4..6 and saved step 6 again, beside the set-aside one
    assert summary["step"] == STEPS and STEPS in ckpt.TrainCheckpoints(workdir).steps()


@pytest.mark.timeout(300)
def test_flipped_bytes_in_a_data_file_are_caught(trained, tmp_path, data_dir):
    workdir = _copy(trained, tmp_path)
    state_dir = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    data_files = [
        os.path.join(root, name)
        for root, _, names in os.walk(state_dir)
        for name in names
        if os.sep + "d" + os.sep in os.path.join(root, name) + os.sep
    ]
    largest = max(data_files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        blob = bytearray(f.read())
        middle = len(blob) // 2
        blob[middle : middle + 8] = bytes(b ^ 0x5A for b in blob[middle : middle + 8])
        f.seek(0)
        f.write(blob)
    train_and_evaluate(tiny_config(data_dir, train__num_steps=STEPS), workdir)
    reason = _read(os.path.join(workdir, "checkpoints", f"bad-{STEPS}", "REASON.txt"))
    assert "checksum mismatch" in reason or "unreadable" in reason


@pytest.mark.timeout(300)
def test_a_second_rerun_after_a_damaged_checkpoint_does_not_trip_over_its_step(
    trained, tmp_path, data_dir
):
    workdir = _copy(trained, tmp_path)
    with open(os.path.join(workdir, "checkpoints", str(STEPS), "config", "metadata"), "w") as f:
        f.write("{not json")
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
    for _ in range(2):  # the second run finds the redone step 6 and does nothing
        summary = train_and_evaluate(tiny_config(data_dir, train__num_steps=STEPS), workdir)
        assert summary["step"] == STEPS
    assert os.path.isdir(os.path.join(workdir, "checkpoints", f"bad-{STEPS}"))


# --- 5. another tokenizer ------------------------------------------------------------------------


def _swapped_tokenizer(data_dir: str, out: str, a: str = "red", b: str = "blue") -> str:
    """The synthetic tokenizer with the ids of two words exchanged: same size, other ids."""
    source = os.path.join(data_dir, tokenizer_name())
    shutil.copytree(source, out)
    path = os.path.join(out, "tokenizer.json")
    spec = json.loads(_read(path))
    vocab = spec["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(path, "w") as f:
        json.dump(spec, f)
    return out


@pytest.mark.timeout(300)
def test_resume_with_a_reordered_tokenizer_is_refused_unless_accepted(trained, tmp_path, data_dir):
    workdir = _copy(trained, tmp_path)
    before = _snapshot(workdir)
    other = _swapped_tokenizer(data_dir, str(tmp_path / "tok"))
    config = tiny_config(data_dir, train__num_steps=9, data__tokenizer_path=other)
    with pytest.raises(ResumeRefused, match="another tokenizer.*'(red|blue)' was id"):
        Run(config, workdir)
    assert _snapshot(workdir) == before
    accepted = tiny_config(
        data_dir, train__num_steps=9, data__tokenizer_path=other, init__accept_new_tokenizer=True
    )
    Run(accepted, workdir)  # the user said so: no refusal


# --- 5b. the conversation format changed ------------------------------------------------------


def _as_trained_before_template_versions(workdir: str) -> None:
    """The run configs as a run before `data.template_version` existed wrote them."""
    paths = [os.path.join(workdir, "config.json")]
    checkpoints = os.path.join(workdir, "checkpoints")
    paths += [os.path.join(checkpoints, s, "config", "metadata") for s in os.listdir(checkpoints)]
    for path in paths:
        config = json.loads(_read(path))
        del config["data"]["template_version"]
        with open(path, "w") as f:
            json.dump(config, f)


@pytest.mark.timeout(300)
def test_resume_across_the_template_change_is_refused_naming_it(trained, tmp_path, data_dir):
    assert ckpt.read_run_config(trained)[1]["data"]["template_version"] == TEMPLATE_VERSION
    workdir = _copy(trained, tmp_path)
    _as_trained_before_template_versions(workdir)
    before = _snapshot(workdir)
    with pytest.raises(ResumeRefused, match="template version 1 and this run writes version 2"):
        Run(tiny_config(data_dir, train__num_steps=9), workdir)
    assert _snapshot(workdir) == before
    with pytest.raises(ValueError, match="template_version=1: training uses the current"):
        Run(tiny_config(data_dir, train__num_steps=9, data__template_version=1), workdir)


def test_a_workdir_from_before_template_versions_answers_with_its_own_template(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    _as_trained_before_template_versions(workdir)
    model = load_model(workdir)
    assert model.data.template_version == 1
    assert model.template.system == LLAVA_V1_SYSTEM  # what vicuna_v1 said then
    question = "How many objects are there?"
    ids = model.prompt_ids([model.user_turn(question, with_image=True)])
    # then: the whole text tokenized at once, then the image token repeated
    text = f"{LLAVA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:"
    once = np.asarray(model.tokenizer.tokenizer(text)["input_ids"])
    image = model.config.image_token_id
    expected = np.repeat(once, np.where(once == image, model.config.num_image_tokens, 1))
    np.testing.assert_array_equal(ids, expected)
    pixels = np.zeros((1, 1, *model.image_shape), np.float32)
    result = model.generate([ids], pixels, None, model.sampling(max_new_tokens=4))
    assert result.finish_reasons[0] in ("eos", "stop", "length")  # 6 steps: often eos at once
    assert load_model(trained).data.template_version == TEMPLATE_VERSION


# --- 6 and 15. numbers that mean nothing ---------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("train.num_steps", 0, "num_epochs"),
        ("train.num_steps", -5, "num_epochs"),
        ("data.global_batch_size", 0, "config.data.global_batch_size"),
        ("data.global_batch_size", -4, "config.data.global_batch_size"),
        ("eval.batch_size", 0, "config.eval.batch_size"),
    ],
)
def test_meaningless_numbers_are_refused_naming_the_field(data_dir, key, value, named):
    config = tiny_config(data_dir, **{key.replace(".", "__"): value})
    with pytest.raises(ValueError, match=f"{key}={value}.*|{named}"):
        RunConfig.from_config(config)


# --- 8. nothing usable ---------------------------------------------------------------------------


def test_max_len_without_room_for_image_and_answer_is_refused(tmp_path, data_dir):
    config = tiny_config(data_dir, data__max_len=12)
    with pytest.raises(ValueError, match="config.data.max_len=12 leaves no room"):
        Run(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


@pytest.mark.timeout(30)
def test_data_where_every_record_is_dropped_stops_with_a_reason_instead_of_spinning():
    import grain

    dropped = [{"id": str(i), "drop_reason": "too_long", "detail": ""} for i in range(50)]
    records = grain.MapDataset.source(dropped).repeat(None).to_iter_dataset()  # for ever
    iterator = BatchIterator(iter(records), batch_size=4, records_per_pass=50)
    with pytest.raises(NoUsableData, match="all of the last 50 records.*too_long: 50"):
        next(iterator)


# --- 9. read-only checkpoint folder ---------------------------------------------------------------


def _make_read_only(folder: str) -> None:
    """chmod is enough for a normal user; root writes anyway, so it gets a read-only bind
    mount where it may mount, else the folder becomes a link into sysfs (nobody writes)."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return
    mounted = subprocess.run(["mount", "--bind", folder, folder], capture_output=True)
    if mounted.returncode == 0:
        subprocess.run(["mount", "-o", "remount,bind,ro", folder, folder], check=True)
        return
    shutil.rmtree(folder)
    os.symlink("/sys/kernel", folder)


def _undo_read_only(folder: str) -> None:
    if os.path.islink(folder):
        return
    if os.geteuid() != 0:
        os.chmod(folder, 0o755)
    else:
        subprocess.run(["umount", folder], capture_output=True)


@pytest.mark.timeout(120)
def test_read_only_checkpoint_folder_is_named_at_start_up(trained, tmp_path, data_dir):
    workdir = _copy(trained, tmp_path)
    folder = os.path.join(workdir, "checkpoints")
    _make_read_only(folder)
    try:
        start = time.time()
        with pytest.raises(PermissionError, match=f"checkpoint folder {folder} cannot be written"):
            Run(tiny_config(data_dir, train__num_steps=9), workdir)
        assert time.time() - start < 60
    finally:
        _undo_read_only(folder)


# --- 14. the run config of a step -----------------------------------------------------------------


def test_read_run_config_passes_over_a_newest_unreadable_config(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    with open(os.path.join(workdir, "checkpoints", str(STEPS), "config", "metadata"), "wb") as f:
        f.write(b"\x00\xff garbage")
    step, run_config = ckpt.read_run_config(workdir)
    assert step == 3 and "model" in run_config
    with pytest.raises(FileNotFoundError, match=f"{STEPS}/config/metadata"):
        ckpt.read_run_config(workdir, step=STEPS)
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 4"):
        ckpt.read_run_config(workdir, step=4)


# --- 16. Ctrl-C -----------------------------------------------------------------------------------


def _start(workdir: str, data_dir: str, **overrides) -> subprocess.Popen:
    return subprocess.Popen(
        main_command(workdir, data_dir, **overrides) + ["--compilation_cache=none"],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(400)
def test_ctrl_c_saves_at_the_next_step_and_the_rerun_resumes_there(tmp_path, data_dir):
    workdir = str(tmp_path / "w")
    process = _start(workdir, data_dir, train__num_steps=200, train__checkpoint_every=100)
    wait_for_step(workdir, 4, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "SIGINT received" in stderr
    steps = ckpt.TrainCheckpoints(workdir).steps()
    assert len(steps) == 1 and steps[0] >= 4  # saved where it stopped, not at step 0
    process = _start(workdir, data_dir, train__num_steps=200, train__stop_at_step=steps[0] + 1)
    _, stderr = process.communicate(timeout=300)
    assert f"at step {steps[0]}" in stderr, stderr[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_stop_signal_leaves_at_once(sig):
    """The first is noted (acted on at the next step boundary); the second raises at once,
    wherever the program is (main prints it as one line, exit 130)."""
    with _StopSignals() as stop:
        os.kill(os.getpid(), sig)
        time.sleep(0.01)  # the handler runs between bytecodes of this thread
        assert stop.requested
        with pytest.raises(StopNow, match="received again: leaving at once"):
            os.kill(os.getpid(), sig)
            time.sleep(1)
    assert signal.getsignal(sig) is not stop._handle  # the previous handler is back


# --- 17. a save that fails ------------------------------------------------------------------------


def _with_file_size_limit(command: list[str], limit: int) -> list[str]:
    """`command` (a `python …` line) started by a Python that first limits the size of any
    file it writes to `limit` bytes (EFBIG past it, as a full disk; Python ignores
    SIGXFSZ), then replaces itself: no `preexec_fn`, so no fork of this threaded process."""
    limit_and_exec = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    return [command[0], "-c", limit_and_exec, *command[1:]]


@pytest.mark.timeout(400)
def test_a_failed_background_save_is_reported_in_one_line_and_its_leftovers_cleaned(
    tmp_path, data_dir
):
    workdir = str(tmp_path / "w")
    command = main_command(workdir, data_dir, train__num_steps=6) + ["--compilation_cache=none"]
    result = subprocess.run(
        _with_file_size_limit(command, 400 * 1024),  # logs fit, array data does not
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "saving checkpoint" in error_lines[0] and "/checkpoints/3 failed" in error_lines[0]
    assert "File too large" in error_lines[0] or "Errno 27" in error_lines[0]
    # the next start (room again) clears the half-written save and trains to the end
    subprocess.run(command, cwd=REPO, env=subprocess_env(), check=True, capture_output=True)
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    assert not [n for n in names if "tmp" in n], names
    assert ckpt.TrainCheckpoints(workdir).steps() == [3, 6]


# --- 18. start-up errors: one line, exit 2 -------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--config.train.nmu_steps=3", "nmu_steps"),  # absl's flag parsing
        ("--config.train.num_steps=many", "num_steps"),
        ("--config.data.global_batch_size=12", "config.data.global_batch_size=12"),  # Run()
    ],
)
def test_start_up_errors_are_one_line_with_exit_status_2(tmp_path, data_dir, override, named):
    command = main_command(str(tmp_path / "w"), data_dir) + [override]
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=110
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert named in result.stderr


@pytest.mark.parametrize(
    ("overrides", "error", "named"),
    [
        ({"mesh__shape": (3, 1, 1)}, ValueError, "needs 3 devices"),
        ({"data__global_batch_size": 12}, ValueError, "config.data.global_batch_size=12"),
        ({"eval__batch_size": 3, "eval__num_records": 4}, ValueError, "config.eval.batch_size=3"),
        ({"data__template": "vicuna_v9"}, ValueError, "vicuna_v9"),
        ({"train__train_pattern": "(unclosed"}, ValueError, "config.train.train_pattern"),
        ({"init__mode": "hf"}, ValueError, "config.init.hf_path"),
        ({"init__mode": "hf", "init__hf_path": "/nowhere"}, FileNotFoundError, "/nowhere"),
    ],
)
def test_start_up_errors_name_the_field(tmp_path, data_dir, overrides, error, named):
    """These reach `main` as the exception it prints as one line (the test above)."""
    with pytest.raises(error, match=re.escape(named)):
        Run(tiny_config(data_dir, **overrides), str(tmp_path / "w"))
