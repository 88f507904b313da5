"""LLaVA-Video records (`{"video": ..., "conversations": [... "<image>\\n..." ...]}`) through
the `llava_json` source, on a OneVision geometry: the sampled frames are stored (lossless)
and encoded as a video, its one `<image>` expanded to the video's tokens; bad video records
are reported by kind; `video_frames` keys the prepared data; a tiny OneVision model trains
on it.

Expected values are computed here by hand: transformers' uniform sampling is frame
`i * total // n` (`default_sample_indices_fn`), a frame of F frames of a 48 px tile of 8 px
patches is 6 x 6 features pooled to 3 x 3 (9 tokens), plus one newline a video; frames fill
slots of `max_tiles` = 1 + 4 (the largest grid, 2 x 2, and the overview).

The test videos are solid colours, frame `i`'s red 12 * i, written losslessly (PNG in AVI),
so a stored frame names its index.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import av
import numpy as np
import pytest
from PIL import Image

from llava_jax.data import datasets
from llava_jax.data.config import DataConfig
from llava_jax.data.datasets.llava_json import BadRecordsError, source_of
from llava_jax.data.datasets.record import from_stored
from llava_jax.data.encode import ExampleEncoder, RowEncoder
from llava_jax.data.pipeline import tokenizer_for
from llava_jax.models.inputs import ImageGeometry

FRAMES = 6  # data.video_frames: two slots of frames here (5 + 1)
TOTAL_FILE_FRAMES, TOTAL_FOLDER_FRAMES = 20, 12
# i * total // n, written out: frames 0, 3, 6, 10, 13, 16 of 20; 0, 2, ..., 10 of 12
FILE_SAMPLE = [0, 3, 6, 10, 13, 16]
FOLDER_SAMPLE = [0, 2, 4, 6, 8, 10]
GEOMETRY = ImageGeometry(
    tile=48, patch=8, pinpoints=((48, 96), (96, 48), (96, 96)), max_grid_features=1
)
VIDEO_TOKENS = FRAMES * 3 * 3 + 1  # 6 x 6 features pooled to 3 x 3 a frame, one newline
VIDEO_SLOTS = 2  # ceil(6 frames / 5 tiles a slot)
SEVERAL_TOKENS = 6 * 6 + 1  # each image of two: one tile and a newline
WIDTH, HEIGHT = 32, 24


def frame_colour(index: int) -> tuple[int, int, int]:
    return 12 * index, 255 - 12 * index, (37 * index) % 256


def frame_image(index: int) -> Image.Image:
    pixels = np.broadcast_to(np.uint8(frame_colour(index)), (HEIGHT, WIDTH, 3))
    return Image.fromarray(pixels.copy())


def write_video(path, frames: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=10)  # lossless
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "rgb24"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.asarray(frame_image(index)), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def turns(question: str, answer: str = "red") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


GOOD = [
    {"id": "image", "image": "red.png", "conversations": turns("<image>\nWhat color?")},
    {
        "id": "two-images",
        "image": ["red.png", "blue.png"],
        "conversations": turns("<image>\n<image>\nWhat color is the first?"),
    },
    {"id": "video-file", "video": "clips/clip.avi", "conversations": turns("<image>\nWhat?")},
    {"id": "video-folder", "video": "clips/frames", "conversations": turns("<image>\nWhat?")},
]
BAD = [
    {"id": "missing", "video": "clips/nowhere.mp4", "conversations": turns("<image>\nWhat?")},
    {"id": "short", "video": "clips/short.avi", "conversations": turns("<image>\nWhat?")},
    {
        "id": "both",
        "image": "red.png",
        "video": "clips/clip.avi",
        "conversations": turns("<image>\nWhat?"),
    },
    {
        "id": "two-placeholders",
        "video": "clips/clip.avi",
        "conversations": turns("<image>\n<image>\nWhat?"),
    },
    {"id": "frame-outside", "video": "clips/leaky", "conversations": turns("<image>\nWhat?")},
]
BAD_KINDS = {
    "missing": "missing_file",
    "short": "unreadable_video",
    "both": "bad_json",
    "two-placeholders": "image_count_mismatch",
    "frame-outside": "outside_image_dir",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The image folder (two images, a 20-frame video file, a 12-frame folder, a 3-frame
    video, a frame folder with a link out of the folder), the JSON with good and bad
    records, and a tokenizer."""
    from llava_jax.data.datasets.synthetic import build_tokenizer

    root = tmp_path_factory.mktemp("video_data")
    images = root / "images"
    (images / "clips" / "frames").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "red.png")
    Image.new("RGB", (30, 50), (10, 10, 200)).save(images / "blue.png")
    write_video(images / "clips" / "clip.avi", TOTAL_FILE_FRAMES)
    write_video(images / "clips" / "short.avi", 3)
    for index in range(TOTAL_FOLDER_FRAMES):
        frame_image(index).save(images / "clips" / "frames" / f"frame_{index:04d}.png")
    leaky = images / "clips" / "leaky"
    leaky.mkdir()
    frame_image(0).save(root / "outside.png")
    for index in range(FRAMES):
        (leaky / f"frame_{index:04d}.png").symlink_to(root / "outside.png")
    data = root / "records.json"
    data.write_text(json.dumps(GOOD + BAD))
    return {
        "root": str(root),
        "json": str(data),
        "images": str(images),
        "tokenizer": build_tokenizer(str(root / "tokenizer")),
    }


def data_config(files, **changes) -> DataConfig:
    settings = dict(
        source="llava_json",
        json_path=files["json"],
        image_dir=files["images"],
        data_dir=os.path.join(files["root"], "tfds"),
        tokenizer_path=files["tokenizer"],
        template="qwen_1_5",
        on_bad_record="skip",
        video_frames=FRAMES,
        max_images_per_sample=VIDEO_SLOTS,
        max_len=512,
    )
    return DataConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def prepared(files) -> tuple[DataConfig, dict[str, dict]]:
    """The prepared train split (`on_bad_record='skip'`): its config and stored records
    by id."""
    config = data_config(files)
    source = datasets.open_split(config, "train")
    return config, {from_stored(source[i]).id: source[i] for i in range(len(source))}


def normalised(colour, config: DataConfig) -> np.ndarray:
    """A solid tile's pixels after `(x / 255 - mean) / std`: float32[3]."""
    return (np.asarray(colour) / 255 - np.asarray(config.image_mean)) / np.asarray(config.image_std)


def test_a_video_record_stores_its_sampled_frames_losslessly(prepared):
    """The stored video record is the sampled frames (frame i of n: i * total // n), each a
    PNG of the frame as it was, marked `<video>#frame=k`; images stay as they were."""
    _, stored = prepared
    assert set(stored) == {record["id"] for record in GOOD}
    for record_id, video, sample in [
        ("video-file", "clips/clip.avi", FILE_SAMPLE),
        ("video-folder", "clips/frames", FOLDER_SAMPLE),
    ]:
        record = from_stored(stored[record_id])
        assert record.is_video and record.video_source == video
        assert record.image_paths == tuple(f"{video}#frame={k}" for k in range(FRAMES))
        for data, index in zip(record.image_bytes, sample, strict=True):
            frame = Image.open(io.BytesIO(data))
            assert frame.format == "PNG" and frame.size == (WIDTH, HEIGHT)
            np.testing.assert_array_equal(np.asarray(frame), np.asarray(frame_image(index)))
    assert not from_stored(stored["two-images"]).is_video
    assert from_stored(stored["two-images"]).image_paths == ("red.png", "blue.png")


def test_a_video_encodes_as_one_placeholder_over_its_frames_slots(prepared):
    """The video's example: its frames resized to tiles over two slots (5 + 1), the
    slots' layouts the video's, its one `<image>` expanded to 6 * 9 + 1 tokens in one run;
    the length table measures what encoding gives (tokens, slots)."""
    config, stored = prepared
    tokenizer = tokenizer_for(config)
    encoder = ExampleEncoder(config, GEOMETRY, tokenizer)
    for record_id, sample in [("video-file", FILE_SAMPLE), ("video-folder", FOLDER_SAMPLE)]:
        example = encoder(stored[record_id])
        assert example["drop_reason"] == ""
        image_tokens = np.flatnonzero(example["input_ids"] == tokenizer.image_token_id)
        assert len(image_tokens) == VIDEO_TOKENS
        assert np.all(np.diff(image_tokens) == 1)  # one placeholder, expanded in place
        assert example["image_mask"].tolist() == [True, True]
        tiles = example["images"].reshape(-1, *example["images"].shape[2:])  # slot-major
        for tile, index in zip(tiles, sample, strict=False):
            expected = normalised(frame_colour(index), config)
            np.testing.assert_allclose(tile, np.broadcast_to(expected, tile.shape), atol=1e-6)
        assert not tiles[FRAMES:].any()  # the second slot: one frame, then zeros
        for layout, expected in zip(
            example["image_layout"], GEOMETRY.video_layouts(FRAMES), strict=True
        ):
            np.testing.assert_array_equal(layout, expected)
        assert GEOMETRY.layout_tokens(example["image_layout"]).tolist() == [5 * 9, 9 + 1]
        tokens, slots, reason = encoder.measure(stored[record_id])
        assert (tokens, slots, reason) == (int(example["attention_mask"].sum()), 2, "")
    two = encoder(stored["two-images"])
    assert (two["input_ids"] == tokenizer.image_token_id).sum() == 2 * SEVERAL_TOKENS
    assert encoder.measure(stored["two-images"])[:2] == (int(two["attention_mask"].sum()), 2)


def test_slots_count_against_the_image_limits_and_packing(prepared):
    """A video of 6 frames fills 2 slots: over `max_images_per_sample=1` it is dropped
    (too_many_images, in the length table too); packed, it takes 2 of a row's slots, next
    to a record's two images."""
    config, stored = prepared
    tokenizer = tokenizer_for(config)
    one_slot = ExampleEncoder(
        dataclasses.replace(config, max_images_per_sample=1), GEOMETRY, tokenizer
    )
    dropped = one_slot(stored["video-file"])
    assert dropped["drop_reason"] == "too_many_images" and "6 frames" in dropped["detail"]
    assert one_slot.measure(stored["video-file"]) == (0, 2, "too_many_images")
    packed = dataclasses.replace(config, packing=True, max_images_per_row=4)
    row = RowEncoder(packed, GEOMETRY, tokenizer)(
        {"records": [stored["video-file"], stored["two-images"]]}
    )
    assert row["dropped"] == [] and row["image_mask"].tolist() == [True] * 4
    video_tokens = (row["input_ids"] == tokenizer.image_token_id) & (row["attention_mask"] == 1)
    assert video_tokens.sum() == VIDEO_TOKENS
    np.testing.assert_array_equal(row["image_layout"][:2], GEOMETRY.video_layouts(FRAMES))
    np.testing.assert_array_equal(row["image_layout"][2], GEOMETRY.several_layout())


def test_a_model_without_video_drops_a_video_record(prepared):
    """A LLaVA-1.5 geometry (no blended layouts) refuses a video record by its own kind,
    when encoding and in the length table."""
    config, stored = prepared
    encoder = ExampleEncoder(config, ImageGeometry.square(48, 36), tokenizer_for(config))
    example = encoder(stored["video-folder"])
    assert example["drop_reason"] == "video_not_supported"
    assert example["file"] == "clips/frames" and "OneVision" in example["detail"]
    assert encoder.measure(stored["video-folder"])[2] == "video_not_supported"


def test_bad_video_records_are_reported_by_kind(prepared, files):
    """Missing, too short, with `image` too, two `<image>`, a frame linked out of the image
    folder: each its problem, naming the record and the file; under `error` nothing is
    prepared and the message names them."""
    config, _ = prepared
    builder = datasets.builder_for(config)
    with open(os.path.join(builder.data_dir, "validation_report.json")) as file:
        report = json.load(file)["train"]
    assert report["counts"] == {kind: 1 for kind in BAD_KINDS.values()}
    problems = {problem["record_id"]: problem for problem in report["examples"]}
    assert {record_id: problems[record_id]["kind"] for record_id in BAD_KINDS} == BAD_KINDS
    short = problems["short"]
    assert short["file"].endswith("short.avi") and "3 frames" in short["detail"]
    assert problems["missing"]["file"].endswith("nowhere.mp4")
    assert "outside.png" in problems["frame-outside"]["detail"]
    strict = data_config(files, on_bad_record="error", data_dir=files["root"] + "/strict")
    with pytest.raises(BadRecordsError) as error:
        datasets.prepare(strict)
    assert "unreadable_video: 1" in str(error.value) and "short.avi" in str(error.value)
    assert not datasets.is_prepared(datasets.builder_for(strict))


def test_video_frames_keys_the_prepared_data(prepared, files, tmp_path):
    """Another `video_frames` is other prepared data (its own directory, that many frames
    stored); a JSON without videos keeps one key whatever `video_frames` says."""
    config, _ = prepared
    fewer = data_config(files, video_frames=4)
    assert datasets.builder_for(fewer).data_dir != datasets.builder_for(config).data_dir
    source = datasets.open_split(fewer, "train")
    stored = {from_stored(source[i]).id: from_stored(source[i]) for i in range(len(source))}
    assert len(stored["video-file"].image_bytes) == 4
    frame = Image.open(io.BytesIO(stored["video-file"].image_bytes[1]))
    np.testing.assert_array_equal(np.asarray(frame), np.asarray(frame_image(5)))  # 1 * 20 // 4
    images_only = tmp_path / "images.json"
    images_only.write_text(json.dumps(GOOD[:2]))
    keys = {
        json.dumps(source_of(str(images_only), files["images"], None, "skip", frames))
        for frames in (4, 8)
    }
    assert len(keys) == 1 and "video_frames" not in json.loads(keys.pop())


def test_a_tiny_onevision_model_trains_on_video_records(files, tmp_path):
    """configs/tiny.py:onevision reading the LLaVA JSON (two of its four good records
    videos): two steps of 8 records, finite losses, no record left out."""
    from trainer_fixtures import tiny_config

    from llava_jax.train.trainer import train_and_evaluate

    config = tiny_config(
        str(tmp_path / "tfds"),
        "onevision",
        data__source="llava_json",
        data__json_path=files["json"],
        data__image_dir=files["images"],
        data__tokenizer_path=files["tokenizer"],
        data__on_bad_record="skip",
        data__video_frames=FRAMES,  # 6 frames: 2 slots of 3 tiles (tiny.py's grids)
        train__num_steps=2,
    )
    train_and_evaluate(config, str(tmp_path / "run"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines if '"loss"' in line]
    assert len(logged) == 2 and all(np.isfinite([entry["loss"] for entry in logged]))
    assert logged[-1]["dropped_examples"] == 0  # the videos trained, none was left out
