"""Video frames on the host (`llava_jax/data/video.py`): the uniform sampling is transformers'
(`default_sample_indices_fn`), a video file's frames are the sampled ones pixel for pixel as
transformers' `load_video` decodes them, a folder of frame images reads as its video does,
and what cannot be read is refused naming the path.

The videos are written here with PyAV, 20 frames of 32x24, frame `i` a solid colour that
encodes `i` (`_frame_colour`), with lossless codecs so a decoded frame names its index.
"""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
from PIL import Image
from transformers.video_utils import VideoMetadata, default_sample_indices_fn, load_video

from llava_jax.data.video import frame_indices, read_video
from llava_jax.errors import ArgumentError, InputError

NUM_FRAMES = 20
WIDTH, HEIGHT = 32, 24


def _frame_colour(index: int) -> tuple[int, int, int]:
    """Frame `index`'s colour: red is 12 * index (so `index = red // 12`), the rest varies."""
    return 12 * index, 255 - 12 * index, (37 * index) % 256


def _frame_pixels(index: int) -> np.ndarray:
    """uint8[HEIGHT, WIDTH, 3]: frame `index`, one solid colour."""
    return np.broadcast_to(np.uint8(_frame_colour(index)), (HEIGHT, WIDTH, 3)).copy()


def _write_video(path: str, codec: str, pix_fmt: str, num_frames: int = NUM_FRAMES) -> str:
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(_frame_pixels(index), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush
    return path


def _recorded_frames(path: str) -> int:
    """The container's own frame count (`stream.frames`; 0 where it records none)."""
    with av.open(path) as container:
        return container.streams.video[0].frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    """The test videos, written once: `mkv` (FFV1, lossless, no frame count recorded),
    `avi` (PNG, lossless, 20 frames recorded), `mp4` (MPEG-4 part 2, lossy yuv420p),
    `folder` (the frames as PNG files), `audio` (a WAV file: no video stream)."""
    root = tmp_path_factory.mktemp("videos")
    paths = {
        "mkv": _write_video(str(root / "clip.mkv"), "ffv1", "bgr0"),
        "avi": _write_video(str(root / "clip.avi"), "png", "rgb24"),
        "mp4": _write_video(str(root / "clip.mp4"), "mpeg4", "yuv420p"),
    }
    folder = root / "frames"
    folder.mkdir()
    for index in range(NUM_FRAMES):
        Image.fromarray(_frame_pixels(index)).save(folder / f"frame_{index:04d}.png")
    (folder / ".DS_Store").write_bytes(b"not a frame")  # hidden: not a frame
    paths["folder"] = str(folder)
    audio = str(root / "sound.wav")
    with av.open(audio, "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        silence = np.zeros((1, 800), np.int16)
        frame = av.AudioFrame.from_ndarray(silence, format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    paths["audio"] = audio
    return paths


def _indices_of(frames: list[Image.Image]) -> list[int]:
    """The frame index each decoded frame shows, checking the frame is that whole frame."""
    indices = []
    for frame in frames:
        assert frame.mode == "RGB" and frame.size == (WIDTH, HEIGHT)
        index = int(np.asarray(frame)[0, 0, 0]) // 12
        np.testing.assert_array_equal(np.asarray(frame), _frame_pixels(index))
        indices.append(index)
    return indices


# --- the sampling ------------------------------------------------------------------------


def test_frame_indices_are_transformers_sampling():
    # by hand: i * total // n, the first frame of each of n equal spans
    assert frame_indices(20, 8).tolist() == [0, 2, 5, 7, 10, 12, 15, 17]
    assert frame_indices(10, 4).tolist() == [0, 2, 5, 7]
    assert frame_indices(7, 1).tolist() == [0]
    assert frame_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    # transformers' own function on every (total, n) up to 64 frames
    for total in range(1, 65):
        for num in range(1, total + 1):
            expected = default_sample_indices_fn(VideoMetadata(total_num_frames=total), num)
            np.testing.assert_array_equal(frame_indices(total, num), expected)


def test_frame_indices_refuse_what_transformers_refuses():
    with pytest.raises(ValueError, match="num_frames=0: ask for at least one frame"):
        frame_indices(20, 0)
    with pytest.raises(ValueError, match="more than the video's 20 frames: ask for at most 20"):
        frame_indices(20, 21)
    with pytest.raises(ValueError):  # transformers refuses more frames than the video has too
        default_sample_indices_fn(VideoMetadata(total_num_frames=20), 21)


# --- video files and folders ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mkv", "avi", "folder"])
def test_read_video_gives_the_sampled_frames(videos, kind):
    if kind == "mkv":  # Matroska records no count: the frames are counted by decoding
        assert _recorded_frames(videos["mkv"]) == 0
    if kind == "avi":
        assert _recorded_frames(videos["avi"]) == NUM_FRAMES
    assert _indices_of(read_video(videos[kind], 8)) == [0, 2, 5, 7, 10, 12, 15, 17]
    assert _indices_of(read_video(videos[kind], 1)) == [0]
    assert _indices_of(read_video(videos[kind], NUM_FRAMES)) == list(range(NUM_FRAMES))


def test_read_video_is_transformers_load_video(videos):
    # a lossy yuv420p video: the frames, converted to RGB, equal transformers' pixel for pixel
    for num in (3, 8):
        expected, _ = load_video(videos["mp4"], num_frames=num, backend="pyav")
        ours = np.stack([np.asarray(frame) for frame in read_video(videos["mp4"], num)])
        np.testing.assert_array_equal(ours, expected)


def test_a_recorded_count_larger_than_the_frames_is_corrected(videos, tmp_path):
    # the AVI cut just before frame 12's chunk: its header still says 20 frames
    with av.open(videos["avi"]) as container:
        offsets = [packet.pos for packet in container.demux(video=0) if packet.size]
    cut = str(tmp_path / "cut.avi")
    with open(videos["avi"], "rb") as source, open(cut, "wb") as out:
        out.write(source.read()[: offsets[12] - 8])  # an AVI chunk: 8 header bytes, then data
    assert _recorded_frames(cut) == NUM_FRAMES
    # sampled from the 12 frames there are: i * 12 // 8
    assert _indices_of(read_video(cut, 8)) == [0, 1, 3, 4, 6, 7, 9, 10]


# --- what is refused ---------------------------------------------------------------------


def test_read_video_refuses_what_it_cannot_read(videos, tmp_path):
    missing = str(tmp_path / "missing.mp4")
    with pytest.raises(InputError, match=f"video not found: {missing}"):
        read_video(missing, 8)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n")
    with pytest.raises(InputError, match=f"unreadable video {text}"):
        read_video(str(text), 8)
    with pytest.raises(InputError, match=f"no video stream in {videos['audio']}"):
        read_video(videos["audio"], 8)
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)  # opening it would block until a writer comes
    with pytest.raises(InputError, match=f"not a video file or a folder of frames: {fifo}"):
        read_video(fifo, 8)
    for kind, what in (("mkv", "video"), ("folder", "frame folder")):
        with pytest.raises(InputError, match=f"{what} {videos[kind]} has 20 frames, fewer than "):
            read_video(videos[kind], 21)


@pytest.mark.parametrize("num_frames", [0, -1, 2.0, True])
def test_read_video_refuses_a_bad_num_frames(videos, num_frames):
    with pytest.raises(ArgumentError, match=f"num_frames={num_frames}"):
        read_video(videos["mkv"], num_frames)


def test_frame_folders_that_cannot_be_read_in_order(tmp_path):
    unpadded = tmp_path / "unpadded"
    unpadded.mkdir()
    for index in (1, 2, 10):
        Image.fromarray(_frame_pixels(index)).save(unpadded / f"frame_{index}.png")
    with pytest.raises(InputError, match="zero-pad the numbers"):
        read_video(str(unpadded), 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"frame folder {empty} has no frames"):
        read_video(str(empty), 1)
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(_frame_pixels(0)).save(broken / "0.png")
    (broken / "1.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=f"unreadable frame {broken / '1.png'}"):
        read_video(str(broken), 2)
