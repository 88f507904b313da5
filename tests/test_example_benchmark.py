"""The example LLaVA-Bench folder (`benchmarks/llava_bench_synthetic`), its generator, and the
judge's rule file shipped as package data.

The committed folder must be what the generator writes, byte for byte; its boxes must be
where the shapes are drawn; `python -m llava_jax.evaluate` must answer every question in
LLaVA's answer format, greedily by default (a tiny random transformers LLaVA: the answers'
words do not matter, their format does).
"""

from __future__ import annotations

import importlib.resources
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image
from trainer_fixtures import REPO

from llava_jax.data.datasets import synthetic
from llava_jax.evaluation import example_benchmark

BENCH = os.path.join(REPO, "benchmarks", "llava_bench_synthetic")
CATEGORIES = ("conv", "detail", "complex")
MAX_NEW = 6  # tokens a tiny random model answers with


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def folder_files(root: str) -> dict[str, bytes]:
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return files


@pytest.mark.timeout(30)
def test_committed_folder_is_what_the_generator_writes(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "llava_jax.evaluation.example_benchmark", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    fresh, committed = folder_files(str(out)), folder_files(BENCH)
    assert sorted(fresh) == sorted(committed)
    changed = [name for name in fresh if fresh[name] != committed[name]]
    assert not changed, (
        f"{changed} differ from a fresh generation: run `python -m "
        "llava_jax.evaluation.example_benchmark --out benchmarks/llava_bench_synthetic`"
    )
    # again, in this process, into the same folder: the same bytes
    assert example_benchmark.write(str(out)) == sorted(fresh)
    assert folder_files(str(out)) == fresh
    # small enough to commit
    assert sum(len(data) for data in committed.values()) < 64_000


@pytest.mark.timeout(30)
def test_folder_has_llava_bench_coco_layout():
    questions = read_jsonl(os.path.join(BENCH, "questions.jsonl"))
    contexts = read_jsonl(os.path.join(BENCH, "context.jsonl"))
    answers = read_jsonl(os.path.join(BENCH, "answers_gpt4.jsonl"))
    images = sorted(os.listdir(os.path.join(BENCH, "images")))
    assert len(images) == len(example_benchmark.SCENES) == 8
    assert [c["image"] for c in contexts] == images

    assert len(questions) == 24 and len({q["question_id"] for q in questions}) == 24
    for question in questions:
        assert set(question) == {"question_id", "image", "text", "category"}
        assert question["image"] in images and question["text"].strip()
    for image in images:
        categories = sorted(q["category"] for q in questions if q["image"] == image)
        assert categories == sorted(CATEGORIES)
    # the conv questions are ones the synthetic data trains on
    trained = {text for texts in synthetic.QUESTIONS.values() for text in texts}
    assert all(q["text"] in trained for q in questions if q["category"] == "conv")
    assert {q["text"] for q in questions if q["category"] == "detail"} == {
        "Describe the image in detail."
    }

    shapes = set(synthetic.SHAPES)
    for context in contexts:
        assert set(context) == {"id", "image", "captions", "instances"}
        assert len(context["captions"]) == 2
        assert all(isinstance(c, str) and c for c in context["captions"])
        assert 1 <= len(context["instances"]) <= 3
        for instance in context["instances"]:
            assert instance["category"] in shapes
            x1, y1, x2, y2 = instance["bbox"]
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            assert all(round(v, 3) == v for v in instance["bbox"])
    # every colour and shape is in the example
    scenes = [scene for scene, _, _ in example_benchmark.SCENES]
    assert {s.colour for s in scenes} == set(synthetic.COLOURS)
    assert {s.shape for s in scenes} == shapes
    assert {s.count for s in scenes} == {1, 2, 3}

    # one reference answer per question, in order, in LLaVA's answer format
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    for question, answer in zip(questions, answers, strict=True):
        assert set(answer) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert answer["prompt"] == question["text"] and answer["model_id"] == "reference"
        assert len(answer["text"]) > 10 and answer["text"].endswith(".")
    assert len({a["answer_id"] for a in answers}) == len(answers)


@pytest.mark.timeout(30)
def test_images_and_boxes_are_the_rendered_scenes():
    """Each PNG decodes to exactly what `render_scene` draws; its context's boxes hold the
    drawn shapes (checked against the pixels, not the generator's own numbers)."""
    contexts = read_jsonl(os.path.join(BENCH, "context.jsonl"))
    size = example_benchmark.IMAGE_SIZE
    for index, ((scene, _, _), context) in enumerate(
        zip(example_benchmark.SCENES, contexts, strict=True)
    ):
        path = os.path.join(BENCH, "images", context["image"])
        decoded = Image.open(path)
        assert decoded.format == "PNG" and decoded.size == (size, size)
        rng = np.random.default_rng([example_benchmark.SEED, index])
        rendered = synthetic.render_scene(scene, size, rng)
        np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), np.asarray(rendered))
        assert context["captions"][0] == synthetic.caption(scene).replace("crosss", "crosses")
        boxes = [[v * size for v in instance["bbox"]] for instance in context["instances"]]
        assert len(boxes) == scene.count
        assert all(i["category"] == scene.shape for i in context["instances"])
        example_benchmark.checked_boxes(decoded, boxes)


@pytest.mark.timeout(30)
def test_box_check_catches_boxes_that_miss():
    scene = synthetic.Scene("red", "circle", 1, "left")
    rng = np.random.default_rng([example_benchmark.SEED, 0])
    image = synthetic.render_scene(scene, 48, rng)
    box = example_benchmark.shape_layout(scene, 48, np.random.default_rng([24, 0]))[0][1]
    example_benchmark.checked_boxes(image, [box])
    shifted = (box[0] + 3, box[1], box[2] + 3, box[3])
    with pytest.raises(RuntimeError, match="does not match the drawn shape"):
        example_benchmark.checked_boxes(image, [shifted])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("colours", [1, 2, 3, 5, 17, 256, 300])
def test_png_writer_round_trips(colours):
    rng = np.random.default_rng(colours)
    palette = rng.integers(0, 256, size=(colours, 3), dtype=np.uint8)
    palette[:, 0] = np.arange(colours) % 256  # distinct colours
    palette[:, 1] = np.arange(colours) // 256
    pixels = palette[rng.integers(0, colours, size=(13, 29))]  # odd width: padded rows
    data = example_benchmark.png_bytes(Image.fromarray(pixels))
    assert data == example_benchmark.png_bytes(Image.fromarray(pixels.copy()))
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), pixels)


@pytest.mark.timeout(30)
def test_generator_refuses_a_file_as_out(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        example_benchmark.main(["--out", str(target)])
    assert exit_info.value.code == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "x"


# --- the judge's rule file ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_rule_file_has_a_prompt_per_category():
    text = importlib.resources.files("llava_jax.evaluation").joinpath("rule.json").read_text()
    rule = json.loads(text)
    assert set(rule) == {f"llava_bench_{c}" for c in CATEGORIES}
    prompts = set()
    for entry in rule.values():
        assert set(entry) == {"role", "prompt"} and entry["role"] == "Assistant"
        prompt = entry["prompt"]
        for words in ("helpfulness", "relevance", "accuracy", "level of detail", "1 to 10"):
            assert words in prompt
        assert "single line holding only the two scores" in prompt
        assert "separated by a space" in prompt and "order" in prompt
        prompts.add(prompt)
    assert len(prompts) == 3  # worded for each category


@pytest.mark.timeout(30)
def test_rule_file_is_in_the_wheel(tmp_path):
    """setup.py's package_data: a wheel built from this tree carries rule.json."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(REPO, name), source / name)
    shutil.copytree(
        os.path.join(REPO, "llava_jax"),
        source / "llava_jax",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from setuptools import build_meta; print(build_meta.build_wheel('dist'))",
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = source / "dist" / done.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("llava_jax/evaluation/rule.json")
    with open(os.path.join(REPO, "llava_jax", "evaluation", "rule.json"), "rb") as f:
        assert shipped == f.read()


# --- answering it ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random transformers LLaVA with its word-level tokenizer (test_inference_cli's)."""
    from test_inference_cli import save_tiny_llava

    directory = tmp_path_factory.mktemp("llava-tiny")
    save_tiny_llava(directory)
    return directory


@pytest.fixture(scope="module")
def cli_answers(tiny_hf_dir, tmp_path_factory):
    """`python -m llava_jax.evaluate` on the example benchmark, as its README says: the
    completed run and its answers."""
    from test_inference_cli import run_module

    out = tmp_path_factory.mktemp("answers") / "answers.jsonl"
    done = run_module(
        "llava_jax.evaluate",
        "--checkpoint",
        tiny_hf_dir,
        "--questions",
        os.path.join(BENCH, "questions.jsonl"),
        "--image-dir",
        os.path.join(BENCH, "images"),
        "--out",
        out,
        "--max-new-tokens",
        MAX_NEW,
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done, read_jsonl(str(out))


@pytest.mark.timeout(30)
def test_evaluate_answers_every_question_in_llava_format(tiny_hf_dir, cli_answers):
    done, answers = cli_answers
    questions = read_jsonl(os.path.join(BENCH, "questions.jsonl"))
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    for question, answer in zip(questions, answers, strict=True):
        assert set(answer) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert answer["prompt"] == question["text"]
        assert answer["metadata"] == {"category": question["category"]}
        assert answer["model_id"] == tiny_hf_dir.name and isinstance(answer["text"], str)
    assert len({a["answer_id"] for a in answers}) == len(answers)
    assert json.loads(done.stderr.strip().splitlines()[-1])["num_errors"] == 0


@pytest.mark.timeout(30)
def test_evaluate_is_greedy_by_default(tiny_hf_dir, cli_answers):
    """As LLaVA-Bench's own run (model_vqa with --temperature 0): the command's answers are
    the texts answered in this process at temperature 0 (sampling gives other texts)."""
    from llava_jax.evaluation.batch import answer_questions, read_questions
    from llava_jax.inference.load import load_model

    _, answers = cli_answers
    model = load_model(str(tiny_hf_dir))
    greedy = answer_questions(
        model,
        read_questions(os.path.join(BENCH, "questions.jsonl")),
        os.path.join(BENCH, "images"),
        model.sampling(max_new_tokens=MAX_NEW, temperature=0.0),
    )
    texts = [entry["text"] for entry in greedy]
    assert all(texts) and texts == [a["text"] for a in answers]
