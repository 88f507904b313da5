"""Reliability of the inference programs and `convert` on bad inputs: each bad input gets a
clean outcome (a message that names the problem, exit status 2, an error entry), nothing
the user had is deleted or overwritten, and nothing hangs.

A tiny random transformers LLaVA with a word-level tokenizer serves the in-process runs; a
tiny model trained here for 4 steps (checkpoints at steps 2 and 4) serves `--step`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from hf_reference import tiny_hf_config, tiny_hf_model
from test_inference_cli import QUESTION, cli_env, save_word_tokenizer, write_scene
from trainer_fixtures import REPO, main_command

from llava_jax import chat, evaluate, generate
from llava_jax import checkpoint as ckpt
from llava_jax.convert import __main__ as convert_main
from llava_jax.convert import load_hf, save_hf
from llava_jax.convert.hf import to_hf_tensors
from llava_jax.errors import InputError
from llava_jax.evaluation import batch
from llava_jax.evaluation.jsonl import read_records
from llava_jax.inference.load import load_model

MAX_NEW = 4


def one_error_line(err: str) -> str:
    """The program's stderr is exactly one `error: ...` line, without a traceback."""
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def snapshot(directory) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes)."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


def hidden_leftovers(parent) -> list[str]:
    return [name for name in os.listdir(parent) if name.startswith(".")]


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny transformers LLaVA with its tokenizer, and a second one with other weights."""
    root = tmp_path_factory.mktemp("reliability")
    first = root / "hf"
    tiny_hf_model(tiny_hf_config(), seed=3).save_pretrained(first)
    save_word_tokenizer(first)
    other = root / "hf_other"
    tiny_hf_model(tiny_hf_config(), seed=4).save_pretrained(other)
    write_scene(root / "scene.png", seed=0)
    return root


@pytest.fixture(scope="module")
def params_dirs(hf_dir):
    """Params checkpoints of the two models (A: seed 3, B: seed 4)."""
    a, b = hf_dir / "params_a", hf_dir / "params_b"
    ckpt.save_params(str(a), *load_hf(str(hf_dir / "hf")))
    ckpt.save_params(str(b), *load_hf(str(hf_dir / "hf_other")))
    return a, b


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir with checkpoints at steps 2 and 4 (one-device subprocess), made
    once per test session: xdist workers share it through a lock (tests change copies)."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's, the same for every xdist worker
    directory = str(root / "reliability_two_steps" / "workdir")
    with open(root / "reliability_two_steps.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(os.path.dirname(directory), "done")):
            shutil.rmtree(os.path.dirname(directory), ignore_errors=True)
            command = main_command(
                directory,
                os.path.join(os.path.dirname(directory), "tfds"),
                train__num_steps=4,
                train__checkpoint_every=2,
            )
            done = subprocess.run(
                command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, done.stderr[-3000:]
            open(os.path.join(os.path.dirname(directory), "done"), "w").close()
    assert sorted(os.listdir(os.path.join(directory, "checkpoints"))) == ["2", "4"]
    return directory


def copy_workdir(workdir, tmp_path) -> str:
    copy = str(tmp_path / "workdir")
    shutil.copytree(workdir, copy)
    return copy


def config_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "checkpoints", str(step), "config", "metadata")


def run_generate(capsys, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of an in-process `generate` run."""
    capsys.readouterr()  # only this run's output
    code = generate.main([*map(str, args), "--max-new-tokens", str(MAX_NEW)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- 2. convert: a non-empty --out is refused; --overwrite replaces it whole ---------------------


@pytest.mark.timeout(180)
def test_convert_refuses_a_non_empty_out_and_overwrite_replaces_it_whole(
    hf_dir, params_dirs, tmp_path, capsys
):
    out = tmp_path / "export"
    config, params_a = load_hf(str(hf_dir / "hf"))
    save_hf(config, params_a, str(out), max_shard_bytes=30_000)  # an earlier, sharded export
    assert (out / "model.safetensors.index.json").exists()
    before = snapshot(out)
    b = str(params_dirs[1])

    code = convert_main.main(["params-to-hf", "--params", b, "--out", str(out)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert f"--out {out} is not empty" in line and "--overwrite" in line
    assert snapshot(out) == before  # bytes identical, nothing added or removed
    assert hidden_leftovers(tmp_path) == []

    code = convert_main.main(["params-to-hf", "--params", b, "--out", str(out), "--overwrite"])
    assert code == 0, capsys.readouterr().err
    names = sorted(os.listdir(out))
    assert "model.safetensors.index.json" not in names
    assert not [n for n in names if n.startswith("model-")]  # no stale shard
    assert "model.safetensors" in names
    assert hidden_leftovers(tmp_path) == []

    # transformers and llava_jax both load B's weights now.
    from transformers import LlavaForConditionalGeneration

    config_b, params_b = ckpt.load_params(b)
    expected = to_hf_tensors(config_b, params_b)
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(out)).state_dict()
    for key in (
        "language_model.model.embed_tokens.weight",
        "multi_modal_projector.linear_1.weight",
    ):
        ours = next(v for k, v in reloaded.items() if k.endswith(key.split(".", 1)[1]))
        np.testing.assert_array_equal(ours.numpy(), expected[key])
    flat_new = flatten_dict(load_hf(str(out))[1])
    flat_b = flatten_dict(params_b)
    for key, value in flat_b.items():
        np.testing.assert_array_equal(np.asarray(flat_new[key]), np.asarray(value))


@pytest.mark.timeout(120)
def test_save_hf_into_an_earlier_export_leaves_no_stale_weights(hf_dir, params_dirs, tmp_path):
    """The library call (no refusal there): the new export's files only, no stale shard."""
    out = str(tmp_path / "export")
    save_hf(*ckpt.load_params(str(params_dirs[0])), out, max_shard_bytes=30_000)
    config_b, params_b = ckpt.load_params(str(params_dirs[1]))
    save_hf(config_b, params_b, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    flat_new, flat_b = flatten_dict(load_hf(out)[1]), flatten_dict(params_b)
    for key, value in flat_b.items():
        np.testing.assert_array_equal(np.asarray(flat_new[key]), np.asarray(value))
    save_hf(*ckpt.load_params(str(params_dirs[0])), out, max_shard_bytes=30_000)  # and back
    assert "model.safetensors" not in os.listdir(out)


@pytest.mark.timeout(120)
def test_convert_params_outputs_are_refused_the_same_way(hf_dir, tmp_path, capsys):
    hf = str(hf_dir / "hf")
    out = tmp_path / "params"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def convert(*args) -> tuple[int, str]:
        code = convert_main.main(list(map(str, args)))
        return code, capsys.readouterr().err

    code, err = convert("hf-to-params", "--hf", hf, "--out", out)
    assert code == 2 and "is not empty (it holds notes.txt)" in one_error_line(err)
    # towers: the output is checked before the (missing) towers are read
    code, err = convert("towers", "--vision", tmp_path / "no", "--text", hf, "--out", out)
    assert code == 2 and "is not empty" in one_error_line(err)
    assert snapshot(out) == {"notes.txt": b"mine"}

    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    code, err = convert("hf-to-params", "--hf", hf, "--out", a_file, "--overwrite")
    assert code == 2 and "is a file, not a folder" in one_error_line(err)
    code, err = convert("hf-to-params", "--hf", hf, "--out", a_file / "sub")
    assert code == 2 and "is a file, not a folder" in one_error_line(err)
    assert a_file.read_text() == "keep"

    inside = hf_dir / "hf" / "inside"
    code, err = convert("hf-to-params", "--hf", hf, "--out", inside, "--overwrite")
    assert code == 2 and "overlaps the input" in one_error_line(err)
    code, err = convert("hf-to-params", "--hf", hf, "--out", hf, "--overwrite")
    assert code == 2 and "overlaps the input" in one_error_line(err)
    assert not inside.exists() and (hf_dir / "hf" / "config.json").exists()

    code, err = convert("params-to-hf", "--params", tmp_path / "absent", "--out", tmp_path / "x")
    assert code == 2 and "absent" in one_error_line(err)
    assert not (tmp_path / "x").exists()

    code, err = convert("hf-to-params", "--hf", hf, "--out", out, "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["model_config.json", "params"]  # notes.txt replaced
    ckpt.load_params(str(out))
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.timeout(120)
def test_convert_cut_short_leaves_the_old_out_as_it_was(
    hf_dir, params_dirs, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "export"
    code = convert_main.main(["params-to-hf", "--params", str(params_dirs[0]), "--out", str(out)])
    assert code == 0
    capsys.readouterr()
    before = snapshot(out)

    def crash(config, params, folder, **_):
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_main, "save_hf", crash)
    code = convert_main.main(
        ["params-to-hf", "--params", str(params_dirs[1]), "--out", str(out), "--overwrite"]
    )
    assert code == 2 and "No space left" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before
    assert hidden_leftovers(tmp_path) == []  # the half-written sibling is gone too


# --- 3. evaluate: --out is never the questions file; answers go through OUT.partial ---------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_evaluate_refuses_to_write_over_the_questions(tmp_path, capsys, spelling, monkeypatch):
    questions = tmp_path / "q.jsonl"
    content = b'{"question_id": 1, "text": "How many shapes ?"}\n'
    questions.write_bytes(content)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    if spelling == "same":
        out = "q.jsonl"
    elif spelling == "dotdot":
        out = str(tmp_path / "sub" / ".." / "q.jsonl")
    elif spelling == "symlink":
        os.symlink(questions, tmp_path / "link.jsonl")
        out = "link.jsonl"
    else:
        os.link(questions, tmp_path / "hard.jsonl")
        out = "hard.jsonl"
    # (the checkpoint does not exist: the refusal comes before any model is loaded)
    code = evaluate.main(
        ["--checkpoint", str(tmp_path / "nowhere"), "--questions", str(questions), "--out", out]
    )
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "is the questions file" in line and str(questions) in line
    assert questions.read_bytes() == content
    assert not os.path.exists(out + ".partial")


@pytest.mark.timeout(60)
def test_evaluate_refuses_a_folder_as_out(tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "text": "q"}\n')
    code = evaluate.main(
        ["--checkpoint", str(tmp_path), "--questions", str(questions), "--out", str(tmp_path)]
    )
    assert code == 2 and "is a folder" in one_error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return load_model(str(hf_dir / "hf"))


@pytest.mark.timeout(240)
def test_a_run_cut_short_keeps_its_answers_in_the_partial_file(
    hf_model, hf_dir, tmp_path, monkeypatch
):
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question_id": i, "image": "scene.png", "text": QUESTION}) + "\n"
            for i in range(4)
        )
    )
    out = tmp_path / "answers.jsonl"
    out.write_text("an earlier run's answers\n")
    real = batch.generate_answers
    calls = []

    def crash_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "generate_answers", crash_on_the_second_batch)
    sampling = hf_model.sampling(MAX_NEW)
    with pytest.raises(RuntimeError, match="went away"):
        batch.evaluate_file(
            hf_model, str(questions), str(hf_dir), str(out), sampling, batch_size=2, progress=False
        )
    assert out.read_text() == "an earlier run's answers\n"  # not emptied, not truncated
    partial = [
        json.loads(x) for x in (tmp_path / "answers.jsonl.partial").read_text().split("\n") if x
    ]
    assert [a["question_id"] for a in partial] == [0, 1]  # the first batch, as produced

    monkeypatch.setattr(batch, "generate_answers", real)
    counts = batch.evaluate_file(
        hf_model, str(questions), str(hf_dir), str(out), sampling, batch_size=2, progress=False
    )
    assert counts == {"num_questions": 4, "num_answered": 4, "num_errors": 0}
    assert [json.loads(x)["question_id"] for x in out.read_text().splitlines()] == [0, 1, 2, 3]
    assert not (tmp_path / "answers.jsonl.partial").exists()


# --- 13. one bad question, argument or line does not end the run ---------------------------------


@pytest.mark.timeout(240)
def test_evaluate_gives_bad_questions_error_entries_and_goes_on(hf_dir, tmp_path, capsys):
    rows = [
        b'{"question_id": 1, "image": "scene.png", "text": "How many shapes ?"}',
        b'{"question_id": 2, "image": "scene.png", "text": "bad \\ud800 text"}',  # lone surrogate
        b'{"question_id": 3, "text": "raw \xff\xfe bytes"}',  # not UTF-8
        b'{"question_id": 4, "text": "<image> but no image"}',
        b'{"question_id": 5, "image": "scene.png", "text": "<image> <image> twice"}',
        b'{"question_id": 6, "image": "scene.png", "text": "<image>\\nHow many shapes ?"}',
        '{"question_id": 7, "text": "How many\u2028shapes ?"}'.encode(),  # a raw U+2028
        b'{"question_id": 8, "image": "scene.png", "text": "x<image>y<image>"}',
    ]
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(b"\n".join(rows) + b"\n")
    out = tmp_path / "answers.jsonl"
    code = evaluate.main(
        [
            "--checkpoint", str(hf_dir / "hf"), "--questions", str(questions),
            "--image-dir", str(hf_dir), "--out", str(out), "--batch-size", "2",
            "--max-new-tokens", str(MAX_NEW), "--no-progress",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    text = out.read_bytes().decode("utf-8")  # valid UTF-8 throughout
    answers = [json.loads(line) for line in text.split("\n") if line]
    assert [a["question_id"] for a in answers] == [1, 2, 3, 4, 5, 6, 7, 8]
    by_id = {a["question_id"]: a for a in answers}
    for good in (1, 6, 7):
        assert "error" not in by_id[good], by_id[good]
    for bad in (2, 3):
        assert "not valid Unicode" in by_id[bad]["error"] and by_id[bad]["text"] == ""
    assert by_id[2]["prompt"] == "bad \ud800 text"  # written escaped, read back as it was
    for bad in (4, 5, 8):
        assert "<image>" in by_id[bad]["error"] and by_id[bad]["text"] == ""
    assert "no image" in by_id[4]["error"] and "2 time(s)" in by_id[5]["error"]
    assert json.loads(err.strip().split("\n")[-1])["num_errors"] == 5
    # the scorers' reader takes the file too (U+2028 in a string is not a line end)
    assert len(read_records(out, ValueError)) == 8


@pytest.mark.timeout(120)
def test_generate_refuses_a_prompt_that_is_not_utf8_in_one_line(hf_dir):
    """Bytes on the command line that are not UTF-8: the real argv, in a subprocess."""
    done = subprocess.run(
        [
            sys.executable, "-m", "llava_jax.generate", "--checkpoint", str(hf_dir / "hf"),
            "--prompt", b"caf\xe9 \xff?",
        ],
        cwd=REPO, env=cli_env(), capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    line = one_error_line(done.stderr.decode("utf-8"))
    assert "--prompt is not valid Unicode text" in line
    assert done.stdout == b""


@pytest.mark.timeout(180)
def test_generate_refuses_image_placeholders_it_cannot_fill(hf_dir, capsys):
    hf, image = hf_dir / "hf", hf_dir / "scene.png"
    code, out, err = run_generate(capsys, "--checkpoint", hf, "--prompt", "<image> what ?")
    assert code == 2 and out == ""
    assert "no image" in one_error_line(err)
    code, out, err = run_generate(
        capsys, "--checkpoint", hf, "--image", image, "--prompt", "<image> <image>"
    )
    assert code == 2 and "written 2 time(s)" in one_error_line(err)
    code, out, err = run_generate(capsys, "--checkpoint", hf, "--prompt", "lone \udcff")
    assert code == 2 and "not valid Unicode" in one_error_line(err)
    # One <image> with an image says where it goes: a normal answer.
    code, out, err = run_generate(
        capsys, "--checkpoint", hf, "--image", image, "--prompt", "How many <image> shapes ?"
    )
    assert code == 0, err


@pytest.mark.timeout(240)
def test_chat_reports_a_bad_line_and_keeps_going(hf_dir, capsys, monkeypatch):
    import io

    lines = b"caf\xe9 \xff\nHow many shapes ?\nand <image> here ?\nHow many shapes ?\nexit\n"
    stdin = io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8")  # strict, as a terminal's
    monkeypatch.setattr(sys, "stdin", stdin)
    code = chat.main(
        [
            "--checkpoint", str(hf_dir / "hf"), "--image", str(hf_dir / "scene.png"),
            "--temperature", "0", "--max-new-tokens", str(MAX_NEW),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    errors = [x for x in captured.err.split("\n") if x.startswith("error: ")]
    assert len(errors) == 2, captured.err
    assert "not valid Unicode" in errors[0] and "left out" in errors[0]
    # After the first turn the image is placed: a later <image> has nothing to fill it.
    assert "<image>" in errors[1] and "no image" in errors[1] and "left out" in errors[1]
    assert captured.out.count("ASSISTANT: ") == 4  # the session answered the good lines


# --- 14. generate --step N uses step N's run config; a damaged newest one is passed over ----------


@pytest.mark.timeout(600)
def test_step_uses_that_steps_run_config_and_params(workdir, tmp_path, capsys):
    wd = copy_workdir(workdir, tmp_path)
    path = config_path(wd, 4)
    with open(path) as f:
        run_config = json.load(f)
    run_config["model"]["text"]["max_position_embeddings"] = 48  # too short for a prompt
    with open(path, "w") as f:
        json.dump(run_config, f)

    newest = load_model(wd)
    older = load_model(wd, step=2)
    assert (newest.step, newest.context_length) == (4, 48)
    assert (older.step, older.context_length) == (2, 256)
    flat_older = flatten_dict(older.params)
    flat_saved = flatten_dict(ckpt.restore_params(wd, step=2))
    flat_newest = flatten_dict(newest.params)
    key = ("llm", "embed", "embedding")
    np.testing.assert_array_equal(np.asarray(flat_older[key]), np.asarray(flat_saved[key]))
    assert not np.array_equal(np.asarray(flat_older[key]), np.asarray(flat_newest[key]))
    by_path = load_model(os.path.join(wd, "checkpoints", "2"))
    assert (by_path.step, by_path.context_length) == (2, 256)

    image = str(tmp_path / "scene.png")
    write_scene(image, seed=1)
    code, out, err = run_generate(
        capsys, "--checkpoint", wd, "--image", image, "--prompt", QUESTION
    )
    assert code == 2 and "context is 48 tokens" in one_error_line(err)
    code, out, err = run_generate(
        capsys, "--checkpoint", wd, "--step", "2", "--image", image, "--prompt", QUESTION
    )
    assert code == 0, err
    assert "Traceback" not in err


@pytest.mark.timeout(600)
def test_a_damaged_newest_checkpoint_is_passed_over(workdir, tmp_path, capsys):
    wd = copy_workdir(workdir, tmp_path)
    image = str(tmp_path / "scene.png")
    write_scene(image, seed=1)
    code, expected, err = run_generate(
        capsys, "--checkpoint", wd, "--step", "2", "--image", image, "--prompt", QUESTION
    )
    assert code == 0, err
    with open(config_path(wd, 4), "wb") as f:
        f.write(b"\x00\xffnot json{")

    code, out, err = run_generate(
        capsys, "--checkpoint", wd, "--image", image, "--prompt", QUESTION
    )
    assert code == 0, err
    assert out == expected  # step 2 answered
    assert "no checkpoint" not in err and "Traceback" not in err
    assert load_model(wd).step == 2

    code, out, err = run_generate(
        capsys, "--checkpoint", wd, "--step", "4", "--image", image, "--prompt", QUESTION
    )
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert config_path(wd, 4) in line and "no checkpoint" not in line


# --- 18. start-up errors: one line, exit status 2 -------------------------------------------------


@pytest.mark.timeout(300)
def test_start_up_errors_are_one_line_with_exit_status_2(hf_dir, tmp_path, capsys):
    hf, absent = str(hf_dir / "hf"), str(tmp_path / "absent")
    workdir = str(tmp_path / "run")  # steps 2 and 4, as far as --step is checked
    for step in (2, 4):
        os.makedirs(os.path.join(workdir, "checkpoints", str(step)))
    step_dir = os.path.join(workdir, "checkpoints", "2")
    questions = str(tmp_path / "q.jsonl")
    with open(questions, "w") as f:
        f.write('{"question_id": 1, "text": "q"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    gen, ask = generate.main, ["--prompt", "q"]
    cases = [
        (gen, ["--checkpoint", absent, *ask], "does not exist"),
        (chat.main, ["--checkpoint", absent], "does not exist"),
        (gen, ["--checkpoint", hf, *ask, "--template", "nope"], "template 'nope'"),
        (gen, ["--checkpoint", hf, *ask, "--dtype", "floaty"], "unknown dtype 'floaty'"),
        (gen, ["--checkpoint", hf, *ask, "--dtype", "int8"], "floating-point"),
        (gen, ["--checkpoint", hf, *ask, "--step", "3"], "has no steps"),
        (gen, ["--checkpoint", workdir, *ask, "--step", "3"], "no checkpoint for step 3"),
        (gen, ["--checkpoint", workdir, *ask, "--step", "-1"], ">= 0"),
        (gen, ["--checkpoint", step_dir, *ask, "--step", "4"], "contradicts"),
        (gen, ["--checkpoint", hf, *ask, "--image", str(tmp_path)], str(tmp_path)),  # a folder
        (
            evaluate.main,
            ["--checkpoint", hf, "--questions", questions, "--out", f"{a_file}/x.jsonl"],
            "is a file, not a folder",
        ),
        (
            evaluate.main,
            ["--checkpoint", workdir, "--questions", questions, "--out", f"{tmp_path}/a.jsonl"]
            + ["--step", "9"],
            "saved steps: 2, 4",
        ),
        (
            convert_main.main,
            ["params-to-hf", "--params", hf, "--out", str(a_file)],
            "is a file, not a folder",
        ),
    ]
    for program, argv, message in cases:
        code = program(argv)
        line = one_error_line(capsys.readouterr().err)
        assert code == 2, (argv, line)
        assert message in line, (argv, line)
    assert a_file.read_text() == "keep"
    assert not (tmp_path / "a.jsonl").exists()

    # --debug keeps the traceback.
    with pytest.raises(InputError, match="does not exist"):
        generate.main(["--checkpoint", absent, "--prompt", "q", "--debug"])


# --- 5. a tokenizer other than the trained one --------------------------------------------------


@pytest.mark.timeout(300)
def test_a_tokenizer_other_than_the_trained_one_is_warned_about(workdir, tmp_path, caplog):
    same = str(tmp_path / "same")
    shutil.copytree(os.path.join(workdir, "tokenizer"), same)
    swapped = str(tmp_path / "swapped")
    shutil.copytree(same, swapped)
    path = os.path.join(swapped, "tokenizer.json")
    with open(path) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    vocab["red"], vocab["blue"] = vocab["blue"], vocab["red"]  # same size, other ids
    with open(path, "w") as f:
        json.dump(spec, f)
    with caplog.at_level("WARNING"):
        load_model(workdir, tokenizer=same)
    assert "not the tokenizer this model was trained with" not in caplog.text
    with caplog.at_level("WARNING"):
        load_model(workdir, tokenizer=swapped)
    assert "not the tokenizer this model was trained with" in caplog.text
    assert "'red' was id" in caplog.text or "'blue' was id" in caplog.text


@pytest.mark.timeout(300)
def test_a_damaged_params_folder_is_one_line(params_dirs, hf_dir, tmp_path, capsys):
    damaged = str(tmp_path / "params")
    shutil.copytree(params_dirs[0], damaged)
    for root, _, names in os.walk(os.path.join(damaged, "params")):
        for name in names:
            if "METADATA" in name.upper():
                with open(os.path.join(root, name), "w") as f:
                    f.write("{damaged")
    code, _, err = run_generate(
        capsys, "--checkpoint", damaged, "--tokenizer", str(hf_dir / "hf"), "--prompt", "q"
    )
    assert code == 2 and "params" in one_error_line(err)


def test_one_host_or_libtpus_warning_in_tpu_worker_hostnames_is_no_pod():
    """Regression: a parent process that had initialised libtpu passed on
    TPU_WORKER_HOSTNAMES='WARNING: could not determine TPU worker hostnames…', and main
    then called jax.distributed.initialize() with no coordinator and died."""
    from llava_jax.main import on_a_cluster

    warning = "WARNING: could not determine TPU worker hostnames or IP addresses"
    assert not on_a_cluster({"TPU_WORKER_HOSTNAMES": warning})
    assert not on_a_cluster({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert not on_a_cluster({})
    assert on_a_cluster({"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3"})
    assert on_a_cluster({"CLOUD_TPU_TASK_ID": "0"})
    assert on_a_cluster({"SLURM_NTASKS": "4"})
    assert not on_a_cluster({"SLURM_NTASKS": "1"})
