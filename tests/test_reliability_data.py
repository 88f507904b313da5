"""Reliability of the data preparation and the question files on bad or changed input
(issue 23): prepared data is reused only for the data it was made from, a JSON nested too
deep or with a number too long is one clean error (or one bad record), the packing window
is bounded, and `evaluate --batch-size` larger than the questions costs nothing more.
"""

from __future__ import annotations

import json
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from llava_jax import evaluate
from llava_jax.data import datasets
from llava_jax.data import prepare as prepare_program
from llava_jax.data.config import MAX_PACKING_WINDOW, DataConfig
from llava_jax.data.datasets import llava_json
from llava_jax.data.datasets.record import from_stored
from llava_jax.data.packing import LengthTable, first_fit
from llava_jax.errors import InputError
from llava_jax.train.trainer import Run

DEEP = 100_000  # arrays inside each other: far past what Python's JSON reader recurses


def one_error_line(err: str) -> str:
    """stderr is exactly one `error: ...` line, without a traceback."""
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def write_records(path, count: int, answer: str, prefix: str) -> None:
    records = [
        {
            "id": f"{prefix}{index}",
            "image": "picture.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": answer},
            ],
        }
        for index in range(count)
    ]
    path.write_text(json.dumps(records))


def image_folder(path, colour) -> str:
    path.mkdir(parents=True)
    Image.new("RGB", (8, 8), colour).save(path / "picture.png")
    return str(path)


def llava_config(json_path, image_dir, data_dir, **overrides) -> DataConfig:
    return DataConfig(
        source="llava_json",
        json_path=str(json_path),
        image_dir=str(image_dir),
        data_dir=str(data_dir),
        on_bad_record=overrides.pop("on_bad_record", "skip"),
        **overrides,
    )


def answers(config: DataConfig) -> list[str]:
    """The answer of every prepared train record, as training reads them."""
    source = datasets.open_split(config, "train")
    return [from_stored(source[i]).conversations[-1]["value"] for i in range(len(source))]


def prepare_command(config: DataConfig, capsys, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    flags = ["--source", "llava_json", "--json_path", config.json_path]
    flags += ["--image_dir", config.image_dir, "--data_dir", config.data_dir]
    code = prepare_program.main([*flags, "--on_bad_record", config.on_bad_record, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- 1. a prepared dataset is reused only for the data it was made from -------------------------


@pytest.mark.timeout(240)
def test_prepared_data_is_keyed_by_its_source_and_reused_only_for_it(tmp_path, capsys, monkeypatch):
    data_dir = tmp_path / "tfds"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a_json, b_json = tmp_path / "a" / "train.json", tmp_path / "b" / "train.json"
    write_records(a_json, 40, "Red.", "a")
    write_records(b_json, 5, "Square.", "b")
    a = llava_config(a_json, image_folder(tmp_path / "a" / "images", "red"), data_dir)
    b = llava_config(b_json, image_folder(tmp_path / "b" / "images", "blue"), data_dir)

    code, out, err = prepare_command(a, capsys)
    assert code == 0 and "train: 40 records" in out, err
    # another train.json, another image folder: its own records, not a's
    code, out, err = prepare_command(b, capsys)
    assert code == 0 and "train: 5 records" in out, err
    assert answers(b) == ["Square."] * 5
    assert answers(a) == ["Red."] * 40  # both preparations coexist
    a_dir = datasets.builder_for(a).data_dir
    assert a_dir != datasets.builder_for(b).data_dir
    assert f"prepared in {a_dir}" in prepare_command(a, capsys)[1]

    # the same file edited in place: prepared again, from its new records
    write_records(a_json, 10, "Blue.", "a")
    code, out, err = prepare_command(a, capsys)
    assert code == 0 and "train: 10 records" in out, err
    assert "earlier preparation(s)" in err and os.path.dirname(a_dir) in err  # named, kept
    assert answers(a) == ["Blue."] * 10
    assert datasets.builder_for(a).data_dir != a_dir and os.path.isdir(a_dir)  # kept
    assert answers(b) == ["Square."] * 5
    with open(os.path.join(datasets.builder_for(a).data_dir, llava_json.SOURCE_FILE)) as f:
        source = json.load(f)
    assert source["json_path"] == str(a_json) and source["on_bad_record"] == "skip"

    # unchanged data is reused: nothing is validated or written again
    def no_preparing(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(llava_json, "validate", no_preparing)
    assert answers(a) == ["Blue."] * 10
    datasets.prepare(a)
    assert datasets.builder_for(a.replace(on_bad_record="error")).data_dir != (
        datasets.builder_for(a).data_dir
    )  # a setting that shapes the records is part of the key
    monkeypatch.undo()

    # the start-up summary names the prepared directory and its source
    description = datasets.describe(a)
    assert datasets.builder_for(a).data_dir in description and str(a_json) in description
    assert str(tmp_path / "a" / "images") in description


@pytest.mark.timeout(240)
def test_a_named_dataset_made_from_other_data_is_refused_naming_the_change(tmp_path, capsys):
    data_dir = tmp_path / "tfds"
    train = tmp_path / "train.json"
    write_records(train, 3, "Red.", "a")
    images = image_folder(tmp_path / "images", "red")
    named = llava_config(train, images, data_dir, dataset_name="mine")
    assert answers(named) == ["Red."] * 3
    prepared = datasets.builder_for(named).data_dir
    assert os.path.basename(os.path.dirname(prepared)) == "mine"  # the name the user gave

    write_records(train, 2, "Square.", "b")
    with pytest.raises(InputError) as refused:  # datasets.PreparedDataMismatch
        datasets.open_split(named, "train")
    message = str(refused.value)
    assert prepared in message and "json_sha256" in message and "dataset_name" in message
    code, _, err = prepare_command(named, capsys, "--dataset_name", "mine")
    assert code == 2 and "json_sha256: was" in one_error_line(err)
    assert answers(named.replace(dataset_name="other")) == ["Square."] * 2


@pytest.mark.timeout(120)
def test_the_start_up_summary_names_the_prepared_data_and_its_source(tmp_path):
    train = tmp_path / "train.json"
    write_records(train, 2, "Red.", "a")
    data = llava_config(train, image_folder(tmp_path / "images", "red"), tmp_path / "tfds")
    params = {"llm": jnp.zeros((2,))}
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("a", "b", "c"))
    run = types.SimpleNamespace(
        setup=types.SimpleNamespace(
            abstract_state=types.SimpleNamespace(params=params, opt_state={}),
            mask={"llm": True},
            mesh=mesh,
        ),
        model_config=types.SimpleNamespace(
            lora=types.SimpleNamespace(rank=0, enabled=False), dtype="float32"
        ),
        config=types.SimpleNamespace(train=types.SimpleNamespace(train_pattern="llm/.*")),
        data_config=data,
        total_steps=1,
        workdir=str(tmp_path / "workdir"),
    )
    lines = Run.startup_summary(run).splitlines()
    (line,) = [x for x in lines if x.startswith("data: ")]
    assert str(train) in line and datasets.builder_for(data).data_dir in line, line


# --- 14. JSON nested too deep, numbers too long: one clean error, or one bad record -------------


@pytest.mark.timeout(120)
def test_prepare_refuses_a_json_list_nested_too_deep_in_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * DEEP + "]" * DEEP)
    config = llava_config(deep, image_folder(tmp_path / "images", "red"), tmp_path / "tfds")
    code, out, err = prepare_command(config, capsys)
    line = one_error_line(err)
    assert code == 2 and str(deep) in line and "nested too deeply" in line
    assert not datasets.builder_for(config).is_prepared()


@pytest.mark.timeout(120)
def test_jsonl_lines_nested_too_deep_or_with_huge_numbers_are_bad_records(tmp_path, capsys):
    good = {
        "id": "good",
        "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Red."}],
    }
    lines = [
        json.dumps(good),
        "[" * DEEP + "]" * DEEP,
        '{"id": ' + "7" * 5000 + ', "conversations": []}',
    ]
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(lines) + "\n")
    config = llava_config(records, image_folder(tmp_path / "images", "red"), tmp_path / "tfds")
    code, out, err = prepare_command(config, capsys)
    assert code == 0 and "train: 1 records" in out, err
    report = json.loads(out[out.index("{") : out.rindex("}") + 1])["train"]
    assert report["counts"] == {"bad_json": 2}
    details = " ".join(problem["detail"] for problem in report["examples"])
    assert f"{records}:2: JSON nested too deeply" in details
    assert f"{records}:3: a number of 5000 digits" in details
    assert answers(config) == ["Red."]


@pytest.mark.timeout(60)
def test_a_jsonl_record_holding_a_unicode_line_separator_stays_one_record(tmp_path):
    """U+2028 and U+0085 may stand unescaped inside a JSON string; only "\n" ends a line."""
    answer = "Red.\u2028Then blue.\x85Then green."
    record = {
        "id": "one",
        "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": answer}],
    }
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [
        (i, r["conversations"][1]["value"]) for i, r, _ in llava_json.read_raw_records(str(records))
    ] == [("line 1", answer)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"question_id": ' + "[" * DEEP + "]" * DEEP + ', "text": "Hi"}', "nested too deeply"),
        ('{"question_id": ' + "9" * 5000 + ', "text": "Hi"}', "a number of 5000 digits"),
    ],
    ids=["nested", "5000-digit-id"],
)
def test_evaluate_names_the_line_of_unreadable_json(tmp_path, capsys, line, reason):
    """A questions file with such a line is malformed: one line naming the file and line,
    exit 2, before any model is loaded (the checkpoint does not exist)."""
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "text": "Hi"}\n' + line + "\n")
    capsys.readouterr()
    code = evaluate.main(
        ["--checkpoint", str(tmp_path / "no-model"), "--questions", str(questions)]
        + ["--out", str(tmp_path / "answers.jsonl"), "--no-progress"]
    )
    message = one_error_line(capsys.readouterr().err)
    assert code == 2 and f"{questions}:2: " in message and reason in message


# --- 9. the packing window is bounded --------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_packing_window_is_bounded_and_the_largest_is_fast():
    with pytest.raises(ValueError, match=r"config\.data\.packing_window=10000000 is more than"):
        DataConfig(packing=True, packing_window=10_000_000)
    DataConfig(packing=True, packing_window=MAX_PACKING_WINDOW)
    # a run saved before the bound still loads for inference (the window packs nothing there)
    saved = DataConfig.saved({"packing": True, "packing_window": 10_000_000}, "saved")
    assert saved.packing_window == MAX_PACKING_WINDOW

    rng = np.random.default_rng(0)
    count = 20_000
    table = LengthTable(
        rng.integers(60, 1200, count).astype(np.int32),
        (rng.random(count) < 0.8).astype(np.int32),
        np.full(count, "", "<U32"),
    )
    order = rng.permutation(count)
    start = time.perf_counter()
    rows = first_fit(order, table, 2048, 4, MAX_PACKING_WINDOW)
    assert time.perf_counter() - start < 10  # about 0.3 s on one core
    assert sorted(np.concatenate(rows).tolist()) == list(range(count))
    # a window far past the records costs what the records cost (first_fit is a library call)
    start = time.perf_counter()
    few = first_fit(order[:1000], table, 2048, 4, 2_000_000)
    assert time.perf_counter() - start < 1.0  # the old one: seconds, and 48 MB per 2M slots
    same = first_fit(order[:1000], table, 2048, 4, 1000)  # never full either way
    assert len(few) == len(same) and all(map(np.array_equal, few, same))


# --- 15. evaluate --batch-size larger than the questions -------------------------------------


@pytest.mark.timeout(300)
def test_evaluate_pads_batches_to_the_questions_there_are(tmp_path, capsys):
    from peak_memory import run_with_peak_memory
    from test_inference_cli import QUESTION, cli_env, save_tiny_llava, write_scene
    from trainer_fixtures import REPO

    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question_id": i, "image": "scene.png", "text": QUESTION}) + "\n"
            for i in range(2)
        )
    )
    out = tmp_path / "answers.jsonl"
    # --batch-size 0: refused in the user's terms, naming the flag (exit 2)
    with pytest.raises(SystemExit) as refused:
        evaluate.main(
            ["--checkpoint", "x", "--questions", str(questions), "--out", str(out)]
            + ["--batch-size", "0"]
        )
    assert refused.value.code == 2 and "--batch-size must be >= 1" in capsys.readouterr().err

    model = tmp_path / "hf"
    save_tiny_llava(model)
    write_scene(tmp_path / "scene.png", seed=0)
    args = ["--checkpoint", str(model), "--questions", str(questions), "--out", str(out)]
    args += ["--batch-size", "1000000", "--max-new-tokens", "2", "--no-progress"]
    child, peak_mib = run_with_peak_memory(
        "llava_jax.evaluate",
        args,
        tmp_path / "peak",
        cwd=REPO,
        env=cli_env(),
        timeout=240,
        address_limit=6 << 30,  # whatever it tries, the machine stays safe
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert [json.loads(x)["question_id"] for x in out.read_text().splitlines()] == [0, 1]
    assert peak_mib < 1536, peak_mib  # about 600 MiB: a 2-row batch (was 1,000,000 rows)
