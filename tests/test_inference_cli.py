"""Inference from the shell: loading any model directory, `llava_jax.generate`, the chat CLI
through a pseudo-terminal, batch evaluation on LLaVA's question format, and the errors.

A tiny random transformers LLaVA (saved with its own word-level tokenizer) checks loading
against transformers' greedy `generate`; a tiny LLaVA trained here for a few seconds checks
the command lines end to end, each in a subprocess on one CPU device.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hf_reference import IMAGE_TOKEN, VOCAB, tiny_hf_config, tiny_hf_model
from trainer_fixtures import REPO, main_command, xla_flags

from llava_jax import chat, cli, evaluate, generate
from llava_jax import checkpoint as ckpt
from llava_jax.convert import load_hf
from llava_jax.data.conversation import VICUNA_SYSTEM
from llava_jax.data.datasets import synthetic
from llava_jax.errors import ArgumentError, PromptTooLongError
from llava_jax.evaluation.batch import QuestionFileError, answer_questions, read_questions
from llava_jax.inference.checkpoints import detect_kind
from llava_jax.inference.load import InputError, load_model
from llava_jax.inference.prompting import Turn, TurnError, prepare_prompt
from llava_jax.inference.stops import visible_text
from llava_jax.sharding import make_mesh

CORRUPT_JPG = os.path.join(REPO, "tests", "fixtures", "data", "llava_bad", "images", "corrupt.jpg")
TRAIN_STEPS = 40  # enough for the tiny model to answer with a word rather than stop at once
MAX_NEW = 12
QUESTION = "What color are the objects?"


def cli_env() -> dict[str, str]:
    """One CPU device: the subprocesses start and compile fast."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=xla_flags(1),
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_scene(path, seed: int, size: int = 48) -> synthetic.Scene:
    """A synthetic shapes image (resized to the model's 32 px on loading)."""
    rng = np.random.default_rng(seed)
    scene = synthetic.sample_scene(rng)
    synthetic.render_scene(scene, size, rng).save(path)
    return scene


# --- a tiny Hugging Face LLaVA with a tokenizer -----------------------------------------------


def save_word_tokenizer(directory) -> None:
    """A word-level tokenizer whose 96 ids fit the tiny model, `<image>` at its image id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = f"{VICUNA_SYSTEM} USER: ASSISTANT: {QUESTION} How many shapes ?".replace("'", " ' ")
    vocab = {token: i for i, token in enumerate(specials)}
    for word in pre_tokenizers.Whitespace().pre_tokenize_str(words):
        vocab.setdefault(word[0], len(vocab))
    for filler in range(IMAGE_TOKEN - len(vocab)):
        vocab[f"w{filler}"] = len(vocab)
    vocab["<image>"] = IMAGE_TOKEN
    assert len(vocab) == VOCAB
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([*specials, "<image>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    ).save_pretrained(directory)


def save_tiny_llava(directory, seed: int = 3, text: dict | None = None):
    """A tiny random transformers LLaVA (`text` updates its decoder's config) saved in
    `directory` with the word-level tokenizer and a processor config; returns the model."""
    model = tiny_hf_model(tiny_hf_config(text=text), seed=seed)
    model.save_pretrained(directory)
    save_word_tokenizer(directory)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}, f)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(directory, transformers model): weights, tokenizer, and a processor config."""
    directory = tmp_path_factory.mktemp("hf_llava")
    return directory, save_tiny_llava(directory)


def test_hf_dir_and_params_checkpoint_give_transformers_greedy_output(hf_dir, tmp_path, capsys):
    directory, hf_model = hf_dir
    from_hf = load_model(str(directory))
    assert (from_hf.kind, from_hf.template.name, from_hf.data.image_aspect) == (
        "hf",
        "vicuna_v1",
        "pad",
    )
    assert from_hf.geometry.image_size == 28 and from_hf.data.image_mean == (0.5, 0.5, 0.5)
    assert from_hf.tokenizer.image_token_id == from_hf.config.image_token_id == IMAGE_TOKEN

    params_dir = tmp_path / "params"
    ckpt.save_params(str(params_dir), *load_hf(str(directory)))
    # The library names its argument; a program names the flag that gives it.
    with pytest.raises(
        InputError, match=r"params checkpoint holds no tokenizer; give tokenizer=DIR$"
    ):
        load_model(str(params_dir))
    assert generate.main(["--checkpoint", str(params_dir), "--prompt", "q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no tokenizer for ") and err.count("\n") == 1
    assert err.endswith(": a params checkpoint holds no tokenizer; give --tokenizer DIR\n")
    from_params = load_model(str(params_dir), tokenizer=str(directory))
    assert from_params.kind == "params"

    # Restored straight onto an 8-device mesh's shardings, it decodes the same.
    on_mesh = load_model(str(params_dir), tokenizer=str(directory), mesh=make_mesh((2, 2, 2)))
    embedding = on_mesh.params["llm"]["embed"]["embedding"]
    assert len(embedding.sharding.device_set) == 8

    image_path = tmp_path / "scene.png"
    write_scene(image_path, seed=0)
    answers, tokens = [], []
    for loaded in (from_hf, from_params, on_mesh):
        # The params checkpoint knows no processor config: give it the same normalisation.
        loaded.data = from_hf.data
        images = loaded.load_image(str(image_path)).pixels[None, None]
        ids = loaded.prompt_ids([loaded.user_turn(QUESTION, with_image=True)])
        result = loaded.generate([ids], images, None, loaded.sampling(MAX_NEW))
        answers.append(result.texts[0])
        tokens.append(result.tokens[0])
    assert answers[0] == answers[1] == answers[2]
    np.testing.assert_array_equal(tokens[0], tokens[1])
    np.testing.assert_array_equal(tokens[0], tokens[2])
    assert len(tokens[0]) > 2  # a real comparison, not two empty answers

    # The same prompt and pixels through transformers: the same greedy tokens.
    assert np.sum(ids == IMAGE_TOKEN) == from_hf.config.num_image_tokens == 4
    hf_model.generation_config.pad_token_id = 3
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor(ids[None].astype(np.int64)),
            pixel_values=torch.tensor(images[:, 0, 0].transpose(0, 3, 1, 2)),  # one tile
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=2,
            suppress_tokens=[IMAGE_TOKEN],
        )
    expected = out[0, len(ids) :].numpy()
    expected = expected[: list(expected).index(2)] if 2 in expected else expected
    np.testing.assert_array_equal(tokens[0], expected)


def test_chat_session_streams_and_keeps_the_history(hf_dir, tmp_path):
    directory, _ = hf_dir
    model = load_model(str(directory))
    image_path = tmp_path / "scene.png"
    write_scene(image_path, seed=1)
    image = model.load_image(str(image_path))
    session = chat.ChatSession(model, [image], max_new_tokens=8, temperature=0.0)
    for question in (QUESTION, "How many shapes ?"):
        pieces: list[str] = []
        answer = session.ask(question, pieces.append)
        assert "".join(pieces) == answer and len(pieces) > 1  # streamed, piece by piece
    turns = session.turns
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[0]["value"] == f"<image>\n{QUESTION}"
    assert turns[2]["value"] == "How many shapes ?"  # the image comes once, first
    # The second answer was generated from the whole history, as a fresh greedy call shows.
    ids = model.prompt_ids(turns[:3])
    assert np.sum(ids == IMAGE_TOKEN) == model.config.num_image_tokens
    fresh = model.generate([ids], image.pixels[None, None], None, model.sampling(8))
    assert fresh.texts[0].strip() == turns[3]["value"]

    # End of input leaves cleanly.
    def eof(prompt):
        raise EOFError

    with open(os.devnull, "w") as devnull:
        assert chat.chat_loop(session, eof, out=devnull) == 0


def test_prepare_prompt_checks_the_turns_and_fits_the_answer(hf_dir):
    """The one prompt routine of generate, chat, evaluate and the server."""
    directory, _ = hf_dir
    model = load_model(str(directory))
    turns = [Turn("user", QUESTION), Turn("assistant", "red"), Turn("user", "and <image>?")]
    with pytest.raises(TurnError, match=r"<image> written 1 time\(s\) but the turn has no") as bad:
        prepare_prompt(model, turns, max_new_tokens=4)
    assert (bad.value.argument, bad.value.turn) == ("turns", 2)

    asked = [Turn("user", QUESTION)]
    prepared = prepare_prompt(
        model, asked, max_new_tokens=10**6, sampling={"temperature": 0.5, "seed": 3}, stop=["x"]
    )
    expected = model.prompt_ids([model.user_turn(QUESTION, with_image=False)])
    np.testing.assert_array_equal(prepared.ids, expected)
    assert prepared.images == () and prepared.max_new_tokens == model.context_length - len(expected)
    sampling = prepared.sampling
    assert (sampling.max_new_tokens, sampling.temperature, sampling.seed) == (
        prepared.max_new_tokens,
        0.5,
        3,
    )
    assert sampling.stop_strings == (*model.stop_strings, "x")
    assert prepare_prompt(model, asked, max_new_tokens=4).sampling is None
    with pytest.raises(PromptTooLongError, match="max_new_tokens=1000000"):
        prepare_prompt(model, asked, max_new_tokens=10**6, clamp=False)


def test_an_argument_error_names_the_argument_or_the_flag(hf_dir):
    directory, _ = hf_dir
    with pytest.raises(ArgumentError) as caught:
        load_model(str(directory), step=3)
    err = caught.value
    assert err.argument == "step" and str(err).startswith(f"step=3: {directory} is a Hugging")
    assert err.naming("--step") == "--step 3" + str(err)[len("step=3") :]
    with pytest.raises(InputError) as said, cli.flag_names():
        raise err
    assert str(said.value) == err.naming("--step")
    with pytest.raises(ArgumentError, match=r"^dtype must be a floating-point type, got int8$"):
        load_model(str(directory), dtype="int8")


def test_visible_text_holds_back_a_possible_stop_string():
    assert visible_text(" red </", ("</s>",)) == "red "
    assert visible_text("red </s> more", ("</s>",)) == "red "
    assert visible_text("red <", ("</s>",)) == "red "
    assert visible_text("red", ("</s>",)) == "red"


# --- a tiny trained model and the command lines ------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A training workdir: the tiny config for a few steps, in a one-device subprocess (twice
    as fast as on this process's 8 fake devices)."""
    root = tmp_path_factory.mktemp("trained")
    workdir = str(root / "workdir")
    command = main_command(
        workdir,
        str(root / "tfds"),
        train__num_steps=TRAIN_STEPS,
        train__checkpoint_every=TRAIN_STEPS,
    )
    done = subprocess.run(
        command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    write_scene(directory / "first.png", seed=1)
    write_scene(directory / "second.png", seed=2)
    shutil.copy(CORRUPT_JPG, directory / "corrupt.jpg")
    return directory


@pytest.fixture(scope="module")
def generated(trained, images):
    return run_module(
        "llava_jax.generate",
        "--checkpoint",
        trained,
        "--image",
        images / "first.png",
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        MAX_NEW,
    )


def test_workdir_is_recognised_with_its_newest_or_a_named_step(trained):
    assert detect_kind(trained) == ("workdir", trained, None)
    step_dir = os.path.join(trained, "checkpoints", str(TRAIN_STEPS))
    assert detect_kind(step_dir) == ("workdir", trained, TRAIN_STEPS)


def test_generate_prints_an_answer(generated):
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.strip()
    assert "Traceback" not in generated.stderr


def _read_until(fd: int, buffer: bytearray, marker: bytes, count: int, timeout: float) -> None:
    """Read the pseudo-terminal until `marker` has appeared `count` times in all."""
    deadline = time.time() + timeout
    while buffer.count(marker) < count:
        left = deadline - time.time()
        if left <= 0:
            raise AssertionError(f"no {marker!r} #{count} in {timeout} s; got {bytes(buffer)!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"terminal closed; got {bytes(buffer)!r}")
            buffer.extend(data)


def test_chat_in_a_terminal_answers_two_turns_and_exits(trained, images, generated, tmp_path):
    controller, terminal = pty.openpty()
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llava_jax.chat",
                "--checkpoint",
                trained,
                "--image",
                str(images / "first.png"),
                "--temperature",
                "0",
                "--max-new-tokens",
                str(MAX_NEW),
            ],
            cwd=REPO,
            env=cli_env(),
            stdin=terminal,
            stdout=terminal,
            stderr=stderr,
            close_fds=True,
        )
    os.close(terminal)
    output = bytearray()
    try:
        _read_until(controller, output, b"USER: ", 1, 240)
        os.write(controller, QUESTION.encode() + b"\n")
        _read_until(controller, output, b"USER: ", 2, 120)
        os.write(controller, b"How many objects are there?\n")
        _read_until(controller, output, b"USER: ", 3, 120)
        os.write(controller, b"exit\n")
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    errors = (tmp_path / "stderr.txt").read_text()
    assert code == 0, errors[-3000:]
    assert "Traceback" not in errors
    text = output.decode(errors="replace").replace("\r\n", "\n")
    answers = [part.split("\n")[0].strip() for part in text.split("ASSISTANT: ")[1:]]
    assert len(answers) == 2 and all(answers), text
    # Greedy, the first turn is the one-shot prompt: the same answer as the generate CLI.
    assert answers[0] == generated.stdout.strip()


def test_evaluate_marks_bad_images_and_the_scorer_counts_them_wrong(
    trained, images, generated, tmp_path
):
    questions = tmp_path / "questions.jsonl"
    rows = [
        {"question_id": 1, "image": "first.png", "text": QUESTION},
        {"question_id": 2, "image": "missing.png", "text": QUESTION},
        {"question_id": "3", "image": "corrupt.jpg", "text": QUESTION, "category": "c"},
        {"question_id": 4, "image": "second.png", "text": "How many objects are there?"},
        {"question_id": 5, "image": "first.png", "text": "What shape are the objects?"},
    ]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "answers.jsonl"
    done = run_module(
        "llava_jax.evaluate",
        "--checkpoint",
        trained,
        "--questions",
        questions,
        "--image-dir",
        images,
        "--out",
        out,
        "--batch-size",
        2,
        "--max-new-tokens",
        MAX_NEW,
        "--model-id",
        "tiny",
        "--mesh=-1,1,1",  # the mesh code path, on this subprocess's one device
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [1, 2, "3", 4, 5]
    for answer in answers:
        assert set(answer) >= {"question_id", "prompt", "text", "answer_id", "model_id"}
        assert answer["model_id"] == "tiny" and isinstance(answer["metadata"], dict)
    assert len({a["answer_id"] for a in answers}) == 5
    assert str(images / "missing.png") in answers[1]["error"]
    assert "not found" in answers[1]["error"]
    assert str(images / "corrupt.jpg") in answers[2]["error"]
    assert answers[2]["metadata"] == {"category": "c"}
    for answer in (answers[0], answers[3], answers[4]):
        assert "error" not in answer and answer["text"].strip()
    # Batched (padded to 2 rows) or alone: the same greedy answer.
    assert answers[0]["text"] == generated.stdout.strip()
    assert json.loads(done.stderr.strip().splitlines()[-1])["num_errors"] == 2

    # Exact-match VQA with one reference: question 1 is right, 4 and 5 wrong, and the two
    # errors count as wrong, not as skipped.
    annotations = tmp_path / "annotations.jsonl"
    references = {1: answers[0]["text"], 2: "x", "3": "x", 4: "no such answer", 5: "zzz"}
    annotations.write_text(
        "".join(
            json.dumps({"question_id": q, "answers": [a]}) + "\n" for q, a in references.items()
        )
    )
    scored = run_module(
        "llava_jax.evaluation.scorers",
        "vqa",
        "--answers",
        out,
        "--annotations",
        annotations,
    )
    assert scored.returncode == 0, scored.stderr
    metrics = json.loads(scored.stdout)
    assert metrics["n"] == 5 and metrics["n_errors"] == 2
    assert metrics["accuracy"] == pytest.approx(1 / 5)


def test_answer_questions_is_reusable_in_process(hf_dir, tmp_path):
    """The batch function on its own: order, errors, one entry per question."""
    directory, _ = hf_dir
    model = load_model(str(directory))
    write_scene(tmp_path / "a.png", seed=4)
    questions_path = tmp_path / "q.jsonl"
    questions_path.write_text(
        '{"question_id": "a", "image": "a.png", "text": "How many shapes ?"}\n'
        "\n"
        '{"question_id": "b", "image": "gone.png", "text": "How many shapes ?"}\n'
        '{"question_id": "c", "text": "How many shapes ?"}\n'
    )
    questions = read_questions(str(questions_path))
    assert [q.line for q in questions] == [1, 3, 4]
    entries = list(
        answer_questions(
            model, questions, str(tmp_path), model.sampling(4), batch_size=3, model_id="m"
        )
    )
    assert [e["question_id"] for e in entries] == ["a", "b", "c"]
    assert "error" in entries[1] and "gone.png" in entries[1]["error"]
    assert "error" not in entries[0] and "error" not in entries[2]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "malformed JSON"),
        ('{"image": "a.png", "text": "q"}', "missing 'question_id'"),
        ('{"question_id": 7, "image": "a.png"}', "'text' must be a string"),
        ('{"question_id": 1, "text": "again"}', "duplicate question_id 1"),
    ],
)
def test_a_malformed_questions_line_is_named(tmp_path, line, message, capsys):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "image": "a.png", "text": "q"}\n' + line + "\n")
    with pytest.raises(QuestionFileError, match=rf"{path}:2: {message}"):
        read_questions(str(path))
    # The CLI says the same before loading any model (this checkpoint does not exist).
    code = evaluate.main(
        ["--checkpoint", str(tmp_path / "nowhere"), "--questions", str(path), "--out", "a.jsonl"]
    )
    assert code == 2
    assert f"{path}:2: {message}" in capsys.readouterr().err


# --- errors ---------------------------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_a_clean_error(trained, images):
    done = run_module(
        "llava_jax.generate",
        "--checkpoint",
        trained,
        "--image",
        images / "first.png",
        "--prompt",
        " ".join(["red"] * 300),
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    # 300 words + 16 image tokens + the template, against the tiny model's 256 positions.
    assert error.startswith("error: the prompt has ") and "context is 256 tokens" in error
    assert int(error.split("the prompt has ")[1].split()[0]) > 316
    assert done.stdout == ""


def _generate_error(capsys, checkpoint, image) -> str:
    code = generate.main(["--checkpoint", str(checkpoint), "--image", str(image), "--prompt", "q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    return err


def test_missing_and_unreadable_images_are_named(trained, images, capsys):
    err = _generate_error(capsys, trained, images / "nope.png")
    assert err == f"error: image not found: {images / 'nope.png'}\n"
    err = _generate_error(capsys, trained, images / "corrupt.jpg")
    assert err.startswith(f"error: unreadable image {images / 'corrupt.jpg'}: ")
    assert "BytesIO" not in err
    code = chat.main(["--checkpoint", trained, "--image", str(images / "nope.png")])
    assert code == 2 and "image not found" in capsys.readouterr().err


def test_directories_without_a_checkpoint_are_named(tmp_path, images, capsys):
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    err = _generate_error(capsys, empty, images / "first.png")
    assert f"{empty}: no checkpoint in {empty / 'checkpoints'}" in err

    configured = tmp_path / "configured_run"  # a run config, but nothing saved yet
    configured.mkdir()
    (configured / "config.json").write_text(json.dumps({"model": {}, "data": {}}))
    assert "no checkpoint" in _generate_error(capsys, configured, images / "first.png")

    stray = tmp_path / "stray"
    stray.mkdir()
    assert "not a recognised model directory" in _generate_error(
        capsys, stray, images / "first.png"
    )
    err = _generate_error(capsys, tmp_path / "absent", images / "first.png")
    assert f"does not exist: {tmp_path / 'absent'}" in err


def _cache_report(stderr: str) -> tuple[int, int]:
    """(hits, misses) from the `compilation cache DIR: N hits, M misses` line."""
    line = next(x for x in stderr.splitlines() if "compilation cache" in x and " hits, " in x)
    hits, misses = line.rsplit(": ", 1)[1].split(", ")
    return int(hits.split()[0]), int(misses.split()[0])


def test_a_second_run_compiles_nothing_it_has_in_the_cache(trained, images, tmp_path):
    cache = tmp_path / "xla"
    args = [
        "--checkpoint",
        trained,
        "--image",
        images / "second.png",
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        MAX_NEW,
        "--compilation-cache",
        cache,
        "--verbose",
    ]
    first = run_module("llava_jax.generate", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    hits, misses = _cache_report(first.stderr)
    assert hits == 0 and misses > 0
    assert any(cache.iterdir())  # the compiled programs were written there
    second = run_module("llava_jax.generate", *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout == first.stdout
    hits, misses = _cache_report(second.stderr)
    assert hits > 0 and misses == 0, (hits, misses)


def test_inference_programs_do_not_import_the_training_input_pipeline():
    code = (
        "import sys, llava_jax.generate, llava_jax.chat, llava_jax.evaluate\n"
        "loaded = [m for m in ('grain', 'tensorflow_datasets') if m in sys.modules]\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=cli_env())


def test_layers_flag_picks_the_layout_load_model_runs():
    """`--layers auto` runs unscanned on a CPU (faster decoding there); the others force it."""
    import argparse

    from llava_jax import cli

    parser = argparse.ArgumentParser()
    cli.add_model_arguments(parser)
    for flag, expected in (
        ([], False),
        (["--layers", "scanned"], True),
        (["--layers", "unscanned"], False),
    ):
        args = parser.parse_args(["--checkpoint", "x", *flag])
        assert cli.scan_layers_from_args(args) is expected
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "x", "--layers", "stacked"])
