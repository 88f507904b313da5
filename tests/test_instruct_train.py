"""Generated instruction data trains as it is: annotations -> `python -m llava_jax.data.instruct`
(against the stand-in LLM, whose conversation answers are the images' captions) ->
`python -m llava_jax.main --config.data.source=llava_json …` trains a few steps and evaluates
on held-out generated records."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
from instruct_server import InstructServer
from PIL import Image, ImageDraw
from trainer_fixtures import REPO, main_command, subprocess_env
from vicuna_tokenizer import save_vicuna_tokenizer

from llava_jax.data import instruct, instruct_output

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
SHAPES = ("square", "circle")


def _scenes(folder, names: list[str]) -> list[dict]:
    """A coloured square or circle on white per image, its caption and its box."""
    os.makedirs(folder, exist_ok=True)
    notes = []
    for k, name in enumerate(names):
        colour = list(COLOURS)[k % 3]
        shape = SHAPES[(k // 3) % 2]
        x, y, size = 4 + k % 5, 6 + k % 4, 18
        image = Image.new("RGB", (32, 32), "white")
        draw = ImageDraw.Draw(image)
        box = (x, y, x + size, y + size)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        image.save(os.path.join(folder, name))
        notes.append(
            {"image": name, "captions": [f"A {colour} {shape}."], "width": 32, "height": 32,
             "boxes": [{"category": shape, "bbox": [x, y, size, size]}]}
        )  # fmt: skip
    return notes


def _generate(llm: InstructServer, root, name: str, notes: list[dict], images: str) -> str:
    path = os.path.join(root, f"{name}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(note) + "\n" for note in notes)
    out = os.path.join(root, name)
    argv = ["--image-dir", images, "--annotations", path, "--out", out, "--base-url", llm.url,
            "--model", "llm-test", "--kind", "conversation,detail_description",
            "--no-progress"]  # fmt: skip
    assert instruct.main(argv) == 0
    return os.path.join(out, instruct_output.OUT_JSON)


@pytest.mark.timeout(600)
def test_generated_data_trains_with_the_main_job_and_is_evaluated(tmp_path):
    images = str(tmp_path / "images")
    train_names = [f"train_{k:02d}.png" for k in range(24)]
    test_names = [f"test_{k:02d}.png" for k in range(6)]
    train_notes = _scenes(images, train_names)
    test_notes = _scenes(images, test_names)
    with InstructServer() as llm:
        train_json = _generate(llm, tmp_path, "train", train_notes, images)
        test_json = _generate(llm, tmp_path, "test", test_notes, images)
    with open(train_json) as f:
        records = json.load(f)
    assert len(records) == 48  # a conversation and a description per image
    assert records[0]["conversations"][1]["value"] == "A red square."

    workdir = str(tmp_path / "workdir")
    command = main_command(
        workdir,
        str(tmp_path / "tfds"),
        **{
            "data.source": "llava_json",
            "data.json_path": train_json,
            "data.test_json_path": test_json,
            "data.image_dir": images,
            "data.tokenizer_path": save_vicuna_tokenizer(str(tmp_path / "tokenizer")),
            "data.max_len": 256,
            "train.num_steps": 8,
            "train.checkpoint_every": 8,
            "eval.num_records": 4,
            "eval.max_new_tokens": 6,
        },
    )
    done = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=540
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses) >= 8 and all(math.isfinite(loss) for loss in losses)
    with open(os.path.join(workdir, "eval.json")) as f:
        evaluated = json.load(f)
    assert 0.0 <= evaluated["accuracy"] <= 1.0
    assert len(evaluated["examples"]) > 0
    # the answers it was evaluated against are the generated test records' own
    with open(test_json) as f:
        answers = {
            t["value"] for r in json.load(f) for t in r["conversations"] if t["from"] == "gpt"
        }
    assert {e["reference"] for e in evaluated["examples"]} <= answers
