"""Video input on the host: a video file or a folder of frame images -> RGB frames.

LLaVA-OneVision (LLaVA-Video) sees a video as a few frames sampled uniformly over it. The
sampling is transformers' (`video_utils.default_sample_indices_fn` with `num_frames`, what
`LlavaOnevisionVideoProcessor` and `load_video` use): frame `i` of `n` is
`i * total // n`, the first frame of each of `n` equal spans. LLaVA-NeXT's own `load_video`
takes `np.linspace(0, total - 1, n)` instead (the last frame included); the two differ, and
transformers is the reference this project is checked against.

A video with fewer frames than asked is refused, as transformers refuses it (LLaVA-NeXT's
linspace would repeat frames): the message says how many there are.

Video files are decoded with PyAV (FFmpeg): in decoding order, frames converted to RGB
(`rgb24`, as transformers' `read_video_pyav`), decoding stopping at the last frame wanted.
The frame count is the container's (`stream.frames`, as transformers); containers that do
not record it (Matroska/WebM: 0) are decoded once to count, and a count that claims more
frames than decode is corrected by decoding again with the true count.

A folder holds one image per frame, in the order of the file names (plain sort, as
LLaVA-NeXT's training code reads frame folders; hidden files skipped). Names whose numbers
are not zero-padded (`frame_2.png` after `frame_10.png`) are refused rather than read out of
order.
"""

from __future__ import annotations

import operator
import os
import re
import stat

import av
import numpy as np
from PIL import Image

from llava_jax.data.image import ImageDecodeError, ImageFileError, decode_image, read_image_file
from llava_jax.errors import ArgumentError, InputError


def frame_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """The `num_frames` frames sampled uniformly from `total_frames`: `int64[num_frames]`,
    `i * total_frames // num_frames` (transformers' `default_sample_indices_fn`).

    Raises `ValueError` when `num_frames < 1` or `num_frames > total_frames`, `TypeError`
    when either is not an integer.
    """
    total_frames, num_frames = operator.index(total_frames), operator.index(num_frames)
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: ask for at least one frame")
    if num_frames > total_frames:
        raise ValueError(
            f"num_frames={num_frames} is more than the video's {total_frames} frames: "
            f"ask for at most {total_frames}"
        )
    # integer arithmetic: exact where transformers' older `np.arange(0, total, total / n)`
    # rounds (total=17, n=7: 8 indices; total=30, n=22: other frames)
    return np.arange(num_frames, dtype=np.int64) * total_frames // num_frames


def read_video(path: str, num_frames: int) -> list[Image.Image]:
    """`num_frames` RGB frames sampled uniformly (`frame_indices`) from the video file
    `path`, or from the folder `path` of frame images; in order.

    Raises `InputError` naming the path: missing, neither a regular file nor a folder,
    unreadable, no video stream, no frames, fewer frames than `num_frames`, or a frame image
    that cannot be decoded; `ArgumentError` (an `InputError`) when `num_frames < 1`.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int | np.integer):
        raise ArgumentError("num_frames", lambda arg: f"{arg(num_frames)}: a whole number")
    if num_frames < 1:
        raise ArgumentError("num_frames", lambda arg: f"{arg(num_frames)}: ask for at least 1")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"video not found: {path}") from None
    except (OSError, ValueError) as err:  # ValueError: e.g. "embedded null byte"
        raise InputError(f"cannot read video {path!r}: {err}") from None
    if stat.S_ISDIR(mode):
        return _read_frame_folder(path, num_frames)
    if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
        raise InputError(f"not a video file or a folder of frames: {path}")
    return _read_video_file(path, num_frames)


# --- video files ------------------------------------------------------------------------


def _sampled(what: str, total_frames: int, num_frames: int) -> np.ndarray:
    """`frame_indices`, its refusals as `InputError`s naming `what` ("video x.mp4")."""
    if total_frames == 0:
        raise InputError(f"{what} has no frames")
    if num_frames > total_frames:
        raise InputError(
            f"{what} has {total_frames} frames, fewer than num_frames={num_frames}: "
            f"ask for at most {total_frames}"
        )
    return frame_indices(total_frames, num_frames)


def _open_video(path: str) -> tuple[av.container.InputContainer, av.VideoStream]:
    """The container and its first video stream; `InputError` if FFmpeg cannot read the
    file, it has no video stream, or its frames are larger than PIL would decode."""
    try:
        container = av.open(path, mode="r")
    except av.error.FFmpegError as err:
        raise InputError(f"unreadable video {path}: {err.strerror or err}") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"no video stream in {path}")
    stream = container.streams.video[0]
    # the same bound as images (`decode_image`): refused from the header, before decoding
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and stream.width * stream.height > limit:
        container.close()
        raise InputError(
            f"video frames too large to decode in {path}: {stream.width}x{stream.height} "
            f"pixels, over the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)"
        )
    return container, stream


def _decode(path: str, wanted: np.ndarray | None) -> tuple[list[Image.Image], int]:
    """Decodes `path` up to its last `wanted` frame (all of it when `wanted` is None, to
    count): the wanted frames as RGB images, and how many frames were decoded."""
    wanted_set = set() if wanted is None else {int(i) for i in wanted}
    last = max(wanted_set, default=None)
    container, stream = _open_video(path)
    frames, decoded = [], 0
    try:
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index in wanted_set:
                frames.append(frame.to_image())  # rgb24, as transformers' to_ndarray
            if last is not None and index >= last:
                break
    except av.error.FFmpegError as err:
        raise InputError(f"unreadable video {path}: {err.strerror or err}") from None
    finally:
        container.close()
    return frames, decoded


def _read_video_file(path: str, num_frames: int) -> list[Image.Image]:
    container, stream = _open_video(path)
    total_frames = stream.frames  # 0 where the container does not record it
    container.close()
    if total_frames <= 0:
        _, total_frames = _decode(path, None)
    frames, decoded = _decode(path, _sampled(f"video {path}", total_frames, num_frames))
    if len(frames) < num_frames:  # the container claimed more frames than there are
        frames, _ = _decode(path, _sampled(f"video {path}", decoded, num_frames))
    return frames


# --- folders of frame images ----------------------------------------------------------------


def _natural_key(name: str) -> list[str | int]:
    """`name` with its runs of digits as numbers: `frame_2` before `frame_10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def frame_files(folder: str) -> list[str]:
    """The frame images of `folder`, paths in the order of their names: the regular files
    (symbolic links followed) whose names do not start with "."; `InputError` if the
    folder cannot be listed or the plain order of the names is not their numeric order."""
    try:
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file())
    except OSError as err:
        raise InputError(f"cannot read the frame folder {folder}: {err.strerror or err}") from None
    numeric = sorted(names, key=_natural_key)
    if numeric != names:
        first = next(a for a, b in zip(names, numeric, strict=True) if a != b)
        raise InputError(
            f"frame folder {folder}: the names' order is not their numbers' order "
            f"({first!r} sorts before frames numbered lower): zero-pad the numbers "
            "(frame_0001.png, frame_0002.png, ...)"
        )
    return [os.path.join(folder, name) for name in names]


def _read_frame_folder(folder: str, num_frames: int) -> list[Image.Image]:
    files = frame_files(folder)
    frames = []
    for index in _sampled(f"frame folder {folder}", len(files), num_frames):
        file = files[index]
        try:
            frames.append(decode_image(read_image_file(file)))
        except ImageFileError as err:  # names the file and the reason
            raise InputError(str(err)) from None
        except ImageDecodeError as err:
            # PIL names the in-memory buffer ("<_io.BytesIO object at 0x…>"): say the file
            reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))
            raise InputError(f"unreadable frame {file}: {reason}") from None
        except OSError as err:
            raise InputError(f"cannot read frame {file}: {err.strerror or err}") from None
    return frames
