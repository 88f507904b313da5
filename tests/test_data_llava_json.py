"""LLaVA JSON/JSONL preparation: validation report, skip and error policies."""

import json
import os
import pathlib
import shutil

import pytest

from llava_jax.data import datasets
from llava_jax.data.config import DataConfig
from llava_jax.data.datasets.llava_json import REPORT_FILE, BadRecordsError, validate
from llava_jax.data.datasets.record import from_stored

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "data", "llava_bad")
JSONL = os.path.join(FIXTURE, "records.jsonl")
IMAGES = os.path.join(FIXTURE, "images")
EXPECTED_COUNTS = {
    "bad_json": 1,
    "missing_file": 1,
    "unreadable_image": 1,
    "roles_out_of_order": 1,
    "image_count_mismatch": 1,
    "empty_turn": 1,
}
GOOD_IDS = {"good-image", "good-text-only", "good-two-images"}


def test_validation_report_counts_every_problem_kind():
    good, report = validate(JSONL, IMAGES)
    assert report.total == 9 and report.kept == 3 and report.dropped == 6
    assert report.counts == EXPECTED_COUNTS
    assert {record.id for record in good} == GOOD_IDS
    by_kind = {problem.kind: problem for problem in report.examples}
    assert by_kind["missing_file"].record_id == "bad-missing"
    assert by_kind["missing_file"].file.endswith("nowhere.jpg")
    assert by_kind["unreadable_image"].file.endswith("corrupt.jpg")
    assert by_kind["bad_json"].record_id == "line 9"
    assert by_kind["roles_out_of_order"].record_id == "bad-roles"
    assert by_kind["image_count_mismatch"].record_id == "bad-count"
    assert by_kind["empty_turn"].record_id == "bad-empty"


def test_json_list_is_read_like_jsonl(tmp_path):
    records = [json.loads(line) for line in pathlib.Path(JSONL).read_text().splitlines()[:8]]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    _, report = validate(str(path), IMAGES)
    assert report.total == 8 and report.kept == 3
    assert "bad_json" not in report.counts


def _config(tmp_path, policy):
    return DataConfig(
        source="llava_json",
        json_path=JSONL,
        image_dir=IMAGES,
        data_dir=str(tmp_path / "tfds"),
        on_bad_record=policy,
        dataset_name=f"fixture_{policy}",
    )


def test_skip_writes_only_good_records_with_original_bytes(tmp_path):
    config = _config(tmp_path, "skip")
    builder = datasets.prepare(config)
    with open(os.path.join(builder.data_dir, REPORT_FILE)) as file:
        saved = json.load(file)["train"]
    assert saved["counts"] == EXPECTED_COUNTS and saved["kept"] == 3
    source = datasets.open_split(config, "train")
    records = {r.id: r for r in (from_stored(source[i]) for i in range(len(source)))}
    assert set(records) == GOOD_IDS
    with open(os.path.join(IMAGES, "red.jpg"), "rb") as file:
        assert records["good-image"].image_bytes == (file.read(),)  # no re-encoding
    assert records["good-text-only"].image_bytes == ()
    assert records["good-two-images"].image_paths == ("red.jpg", "blue.png")
    assert records["good-image"].conversations[1] == {"from": "gpt", "value": "red"}
    assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(builder.data_dir))


def test_error_policy_stops_before_writing_and_names_offenders(tmp_path):
    config = _config(tmp_path, "error")
    with pytest.raises(BadRecordsError) as error:
        datasets.prepare(config)
    message = str(error.value)
    for needle in ("bad-missing", "nowhere.jpg", "corrupt.jpg", "line 9", "missing_file: 1"):
        assert needle in message
    assert not datasets.builder_for(config).is_prepared()


def test_clean_file_prepares_under_error_policy(tmp_path):
    lines = pathlib.Path(JSONL).read_text().splitlines()[:3]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(lines))
    images = tmp_path / "images"
    shutil.copytree(IMAGES, images)
    config = DataConfig(
        source="llava_json",
        json_path=str(clean),
        image_dir=str(images),
        data_dir=str(tmp_path / "tfds"),
        on_bad_record="error",
    )
    assert len(datasets.open_split(config, "train")) == 3


def test_prepare_command_reports_and_fails_under_error(tmp_path, capsys):
    from llava_jax.data.prepare import main

    common = ["--source", "llava_json", "--json_path", JSONL, "--image_dir", IMAGES]
    common += ["--data_dir", str(tmp_path)]
    assert main([*common, "--on_bad_record", "error", "--dataset_name", "cli_error"]) == 1
    assert "missing_file: 1" in capsys.readouterr().err
    assert main([*common, "--on_bad_record", "skip", "--dataset_name", "cli_skip"]) == 0
    out = capsys.readouterr().out
    assert "train: 3 records" in out and '"unreadable_image": 1' in out


def test_a_leading_gpt_turn_is_skipped_and_counted_as_llava_does(tmp_path):
    """LLaVA's preprocess_v1 drops a conversation's leading gpt turn and trains on the rest;
    the report counts it, and the record keeps its other turns."""
    rest = [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]
    records = [
        {
            "id": "starts-with-gpt",
            "image": "red.jpg",
            "conversations": [{"from": "gpt", "value": "Hello!"}, *rest],
        },
        {"id": "plain", "image": "red.jpg", "conversations": rest},
        {"id": "only-gpt", "conversations": [{"from": "gpt", "value": "Hello!"}]},
    ]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    good, report = validate(str(path), IMAGES)
    assert {record.id: list(record.conversations) for record in good} == {
        "starts-with-gpt": rest,
        "plain": rest,
    }
    assert report.adjusted == {"leading_gpt_turn_skipped": 1}
    assert report.counts == {"empty_turn": 1}  # nothing is left of "only-gpt"
    assert report.to_json()["adjusted_examples"] == {
        "leading_gpt_turn_skipped": ["starts-with-gpt"]
    }
    assert "leading_gpt_turn_skipped (as LLaVA does): 1, e.g. starts-with-gpt" in report.summary()
