"""One way to load a model for inference, whatever the directory holds, and the model it gives.

`load_model(path)` reads a training workdir, a Hugging Face LLaVA directory or a params
checkpoint (`inference/checkpoints.py` finds and reads each kind), then picks the template,
quantizes and lays out the parameters as asked, and places them.

`LoadedModel` then turns an image file into a `ModelImage` (the normalised pixels the model
takes and the number of image tokens it takes in the prompt; for a LLaVA-NeXT model the
image's tiles and feature layout, any size; for a LLaVA-OneVision model also its form as one
of several images), a video into a `ModelVideo` (OneVision: its frames over image slots,
one `<image>` in the prompt), and a conversation with its images into prompt tokens,
exactly as training did (its `data` settings: template, image size, aspect, mean and std,
the grid), makes the CLI knobs a `SamplingConfig` that stops at the template's end
of answer, stacks rows of images into the engine's arrays (`batch_images`), and generates
with one `Engine` (built once, so its compiled programs serve every call); the programs
make their prompts with these steps through one routine, `prompting.prepare_prompt`.
Problems the user can fix (a path, an image, a prompt that does not fit) raise `InputError`
with a message that names the thing; one about an argument of `load_model`, an
`ArgumentError` naming the argument (`step=3`), which a program says as its flag.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from llava_jax.data.config import DataConfig
from llava_jax.data.conversation import (
    IMAGE_PLACEHOLDER,
    DroppedExample,
    ImageCountError,
    Template,
    get_template,
    with_system,
)
from llava_jax.data.image import (
    ImageDecodeError,
    ImageFileError,
    ImageTooLargeError,
    decode_image,
    read_image_file,
)
from llava_jax.data.image_tiles import ImageTiler
from llava_jax.data.prompt import prompt_ids, user_turn
from llava_jax.data.tokenizer import LoadedTokenizer
from llava_jax.errors import ArgumentError, InputError
from llava_jax.inference.checkpoints import KIND_NAMES, detect_kind, load_checkpoint
from llava_jax.inference.engine import Engine, fit_new_tokens
from llava_jax.inference.generation import GenerationResult, GenerationStream
from llava_jax.inference.sampling import SamplingConfig
from llava_jax.models.config import ModelConfig
from llava_jax.models.inputs import ImageGeometry
from llava_jax.models.quantize import (
    check_mode,
    decoder_dense_bytes,
    is_quantized,
    quantize_abstract,
    quantize_params,
)
from llava_jax.sharding import DEFAULT_RULES, Rules, param_shardings

ROLES = ("USER", "ASSISTANT")  # as LLaVA's serve.cli shows them


@dataclasses.dataclass(frozen=True)
class ModelImage:
    """One image as the model takes it.

    pixels: the image's tiles float32[T, S, S, 3], normalised (T: the model's most tiles; a
    square image is one tile); `layout` int32[N] (OneVision: int32[N, 8]): where each of its
    image tokens comes from (models/inputs.py). num_tokens: the image tokens its `<image>`
    becomes in the prompt (a tiled image's depend on its size). several_tile: a OneVision
    model's image as one of several images of a prompt, one tile float32[S, S, 3] (padded
    to a square, `ImageTiler.encode_several`); None for other models.
    """

    pixels: np.ndarray
    num_tokens: int
    layout: np.ndarray
    several_tile: np.ndarray | None = None

    @property
    def slots(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """The image slots it fills: `((pixels, layout),)`."""
        return ((self.pixels, self.layout),)

    def one_of_several(self, geometry: ImageGeometry) -> ModelImage:
        """The image in a OneVision prompt with several images: its one padded tile, then
        zeros, and a newline (`ImageGeometry.several_layout`, `several_tokens`)."""
        if self.several_tile is None:
            raise ValueError("this image was not prepared for a OneVision model (several_tile)")
        pixels = np.zeros(geometry.tiles_shape(self.pixels.shape[-1]), np.float32)
        pixels[0] = self.several_tile
        # several_tile kept: the image in its several form gives the same form again
        return ModelImage(
            pixels, geometry.several_tokens, geometry.several_layout(), self.several_tile
        )


@dataclasses.dataclass(frozen=True)
class ModelVideo:
    """A video as a OneVision model takes it: its frames over one or more image slots.

    slots: each slot's `(tiles float32[T, S, S, 3], layout int32[N, 8])`, frames T to a
    slot in order (`ImageTiler.encode_video`); num_tokens: the tokens of its one `<image>`
    in the prompt (`ImageGeometry.video_tokens`); frames: how many it has.
    """

    slots: tuple[tuple[np.ndarray, np.ndarray], ...]
    num_tokens: int
    frames: int


Media = ModelImage | ModelVideo  # what one `<image>` of a prompt shows


def media_in_prompt(geometry: ImageGeometry, media: Sequence[Media]) -> tuple[Media, ...]:
    """`media` as a prompt shows them: on a OneVision model, a prompt with several images
    (videos not counted, as transformers' `batch_num_images`) shows each as one tile and a
    newline (`ModelImage.one_of_several`); otherwise unchanged."""
    media = tuple(media)
    images = sum(isinstance(item, ModelImage) for item in media)
    if not geometry.blended or images < 2:
        return media
    return tuple(
        item.one_of_several(geometry) if isinstance(item, ModelImage) else item for item in media
    )


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: config, parameters (on the mesh or first device), tokenizer,
    and the data settings it was trained with (template, image size/aspect/mean/std).

    kind: "workdir" | "hf" | "params"; step: the training step (workdirs only). quantize:
    "int8" when the decoder's dense layers hold int8 weights (models/quantize.py), else None.
    """

    config: ModelConfig
    params: Any
    tokenizer: LoadedTokenizer
    data: DataConfig
    path: str
    kind: str
    step: int | None = None
    mesh: Any = None
    rules: Rules = DEFAULT_RULES
    quantize: str | None = None
    _engine: Engine | None = dataclasses.field(default=None, repr=False)

    @functools.cached_property
    def geometry(self) -> ImageGeometry:
        """The model's images: their size, token counts and (NeXT) grids."""
        return ImageGeometry.of(self.config)

    @functools.cached_property
    def tiler(self) -> ImageTiler:
        """The host's tiles and layouts of the model's images (data/image_tiles.py)."""
        return ImageTiler.of_geometry(self.geometry)

    # --- text -----------------------------------------------------------------------------
    @property
    def template(self) -> Template:
        return self.data.conversation_template

    @property
    def context_length(self) -> int:
        return self.config.text.max_position_embeddings

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.tokenizer.eos_token_id
        return int(eos) if eos is not None else self.config.text.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id when the model has a row for it (a pad token the tokenizer
        loader added may lie past the embedding), else the model's pad/eos id or 0."""
        vocab = self.config.text.vocab_size
        for candidate in (
            self.tokenizer.pad_token_id,
            self.config.text.pad_token_id,
            self.eos_token_id,
        ):
            usable = candidate is not None and 0 <= candidate < vocab
            if usable and candidate != self.config.image_token_id:
                return int(candidate)
        return 0

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The template's end of answer (e.g. `</s>`), when it is more than whitespace."""
        end = self.template.end.strip()
        return (end,) if end else ()

    def user_turn(self, text: str, with_image: bool | int) -> dict:
        """A human turn; with an image, `<image>\\n` comes first, as LLaVA's CLIs do (or
        the image goes where the text already has its one `<image>`). `with_image`: True,
        or the number of images (a video counts as one) the turn shows; with several, the
        text writes `<image>` once for each, where each goes, or not at all (then one
        `<image>\\n` each comes first, in order).

        Raises `InputError` when `text` is not valid Unicode (e.g. a lone surrogate, or
        bytes that were not UTF-8) or has more `<image>` placeholders than the turn has
        images (with several, a number other than none or one each): the model would be
        asked for image features it was not given.
        """
        check_text(text, "the prompt")
        placeholders = text.count(IMAGE_PLACEHOLDER)
        count = int(with_image)
        if count > 1:
            if placeholders not in (0, count):
                raise InputError(
                    f"the prompt has {IMAGE_PLACEHOLDER} written {placeholders} time(s) but "
                    f"the turn has {count} images: write {IMAGE_PLACEHOLDER} once for each, "
                    "where it goes, or not at all (then each comes first, in order)"
                )
            if placeholders == 0:
                text = f"{IMAGE_PLACEHOLDER}\n" * count + text
            return user_turn(text, True)
        if placeholders > count:
            images = "one image" if count else "no image"
            raise InputError(
                f"the prompt has {IMAGE_PLACEHOLDER} written {placeholders} time(s) but the "
                f"turn has {images}: {IMAGE_PLACEHOLDER} marks where an image goes "
                f"({'at most once' if count else 'give an image, or leave it out'})"
            )
        return user_turn(text, bool(count))

    def check_image_tokens(self, prompt_ids: np.ndarray, images: Sequence[Media]) -> None:
        """Raises `InputError` unless the prompt `int32[L]` has exactly the image tokens of
        its `images` (as the prompt shows them, `in_prompt`; a video's all its frames': the
        engine needs exactly those)."""
        wanted = sum(image.num_tokens for image in images)
        found = int(np.sum(np.asarray(prompt_ids) == self.config.image_token_id))
        if found == wanted:
            return
        raise InputError(
            f"the prompt has {found} image tokens but {len(images)} image(s), which need "
            f"{wanted} ({', '.join(str(image.num_tokens) for image in images) or 'none'})"
        )

    def prompt_ids(
        self,
        turns: Sequence[dict],
        images: Sequence[Media] = (),
        system: str | None = None,
    ) -> np.ndarray:
        """`int32[L]`: the conversation rendered with the template, ending where the
        assistant's next answer starts, tokenized, each `<image>` expanded to its image's
        tokens (`images`, in order, as the prompt shows them (`in_prompt`): a tiled image's
        count depends on its size, a video's on its frames). `system`: a system prompt in
        place of the template's own (`conversation.with_system`).

        Raises `InputError` when the conversation writes `<image>` a different number of
        times than it has images (a square image's count needs no image: with none given,
        every `<image>` takes it)."""
        images = self.in_prompt(images)
        counts = self.geometry.prompt_counts([image.num_tokens for image in images])
        template = self.template
        if system is not None:
            try:
                template = with_system(template, system)
            except ValueError as err:
                raise InputError(f"a system message: {err}") from None
        try:
            return prompt_ids(turns, template, self.tokenizer, counts)
        except DroppedExample as err:  # roles out of order: a caller's mistake
            if err.reason == "reserved_character":
                raise InputError(f"the prompt cannot be tokenized: {err.detail}") from None
            raise ValueError(f"cannot render the conversation: {err}") from None
        except ImageCountError:
            written = sum(str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in turns)
            raise InputError(
                f"the prompt has {IMAGE_PLACEHOLDER} written {written} time(s) but "
                f"{len(images)} image(s): each image needs its own {IMAGE_PLACEHOLDER}"
            ) from None

    def in_prompt(self, images: Sequence[Media]) -> tuple[Media, ...]:
        """The images (and videos) of one prompt as it shows them (`media_in_prompt`: a
        OneVision prompt with several images shows each as one tile)."""
        return media_in_prompt(self.geometry, images)

    def check_prompt(self, prompt_ids: np.ndarray, max_new_tokens: int, clamp: bool = False) -> int:
        """The number of new tokens the prompt `int32[L]` leaves room for.

        Raises `PromptTooLongError` naming the lengths when the prompt leaves no room for an
        answer, or (unless `clamp`) when `L + max_new_tokens` exceeds the context.
        """
        image_tokens = int(np.sum(np.asarray(prompt_ids) == self.config.image_token_id))
        return fit_new_tokens(
            len(prompt_ids),
            max_new_tokens,
            self.context_length,
            clamp=clamp,
            image_tokens=image_tokens,
        )

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.tokenizer.decode(list(map(int, tokens)))

    # --- images ---------------------------------------------------------------------------
    def load_image(self, path: str, root: str | None = None) -> ModelImage:
        """An image file -> a `ModelImage`, prepared as in training.

        Raises `InputError` naming the file when it is missing, not a regular file (a FIFO
        would block), outside the folder `root` (when given, symlinks resolved) or not a
        readable image.
        """
        return self.preprocess_image(read_image(path, root))

    def image_from_bytes(
        self,
        data: bytes,
        what: str = "the image",
        max_pixels: int | None = None,
        limit_name: str = "max_pixels",
    ) -> ModelImage:
        """Encoded image bytes (PNG, JPEG, …, e.g. from a request) -> a `ModelImage`, as
        `load_image` does for a file. Raises `InputError` naming `what` when the
        bytes are not an image that can be decoded, or claim more pixels than PIL's limit
        or `max_pixels` (refused from the header, never decoded; `limit_name` says what
        sets the limit, e.g. a server flag)."""
        try:
            image = decode_image(data, max_pixels, limit_name)
        except ImageTooLargeError as err:
            width, height = err.size
            raise InputError(
                f"the image {what} is too large: {width}x{height} = {width * height} pixels, "
                f"more than the limit of {err.limit} pixels ({err.limit_name})"
            ) from None
        except ImageDecodeError as err:
            reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))
            raise InputError(f"unreadable image {what}: {reason}") from None
        return self.preprocess_image(image)

    def preprocess_image(self, image: Image.Image) -> ModelImage:
        """A decoded RGB image -> a `ModelImage` with the model's data settings: padded or
        resized to a square and normalised; a NeXT model's tiled (any size); a OneVision
        model's also as one of several (`several_tile`: the prompt decides which it shows)."""
        data = self.data
        tiles, layout, count = self.tiler.encode(
            image, data.image_mean, data.image_std, data.image_aspect
        )
        several_tile = None
        if self.geometry.blended:
            several = self.tiler.encode_several(image, data.image_mean, data.image_std)[0]
            several_tile = several[0].copy()  # the one tile, not the slot's zeros
        return ModelImage(tiles, count, layout, several_tile)

    # --- videos ---------------------------------------------------------------------------
    def check_takes_video(self) -> None:
        """Raises `InputError` unless the model takes videos (a LLaVA-OneVision model)."""
        if not self.geometry.blended:
            raise InputError(
                f"the model {self.path} takes no video: videos need a LLaVA-OneVision model "
                "(vision_aspect_ratio anyres_max_N)"
            )

    def load_video(self, path: str, frames: int) -> ModelVideo:
        """A video file, or a folder of frame images, -> a `ModelVideo` of `frames` frames
        sampled uniformly (`data/video.py` `read_video`), each resized to one tile and
        normalised with the model's mean and std.

        Raises `InputError` naming the path (missing, unreadable, fewer frames than asked)
        or saying the model takes no video; `ArgumentError` when `frames < 1`."""
        from llava_jax.data.video import read_video

        self.check_takes_video()
        return self.video_from_frames(read_video(path, frames))

    def video_from_bytes(
        self,
        data: bytes,
        frames: int,
        what: str = "the video",
        max_pixels: int | None = None,
        limit_name: str = "max_pixels",
    ) -> ModelVideo:
        """An encoded video (MP4, WebM, …, e.g. from a request) -> a `ModelVideo`, as
        `load_video` does for a file. Raises `InputError` naming `what` when the bytes are
        not a video that can be decoded, have fewer than `frames` frames, or frames of more
        than `max_pixels` pixels (refused from the stream's header, before decoding)."""
        import tempfile

        import av

        from llava_jax.data.video import read_video

        self.check_takes_video()
        with tempfile.NamedTemporaryFile(suffix=".video") as file:
            file.write(data)
            file.flush()
            try:
                with av.open(file.name, mode="r") as container:
                    streams = container.streams.video
                    size = (streams[0].width, streams[0].height) if streams else None
            except av.error.FFmpegError as err:
                raise InputError(f"unreadable video {what}: {err.strerror or err}") from None
            if size is None:
                raise InputError(f"no video stream in the video {what}")
            width, height = size
            if max_pixels is not None and width * height > max_pixels:
                raise InputError(
                    f"the video {what} is too large: frames of {width}x{height} = "
                    f"{width * height} pixels, more than the limit of {max_pixels} pixels "
                    f"({limit_name})"
                )
            try:
                decoded = read_video(file.name, frames)
            except InputError as err:  # names the temporary file: say `what` instead
                raise InputError(str(err).replace(file.name, what)) from None
        return self.video_from_frames(decoded)

    def video_from_frames(self, frames: Sequence[Image.Image]) -> ModelVideo:
        """Decoded RGB frames, in order -> a `ModelVideo` (`ImageTiler.encode_video`)."""
        self.check_takes_video()
        data = self.data
        slots, count = self.tiler.encode_video(frames, data.image_mean, data.image_std)
        return ModelVideo(tuple(slots), count, len(frames))

    @property
    def image_shape(self) -> tuple[int, ...]:
        """An image slot's tiles (T, H, W, C)."""
        return self.geometry.tiles_shape(self.config.vision.num_channels)

    def batch_images(
        self, rows: Sequence[Sequence[Media]], min_slots: int = 0
    ) -> dict[str, np.ndarray | None]:
        """The engine's image arguments for B rows of images (each row's as its prompt shows
        them: `PreparedPrompt.images`): `images` float32[B, I, *image_shape], `image_mask`
        bool[B, I] and `image_layout` int32[B, I, *layout_shape], I the most slots any row
        fills (an image fills one, a video one per `max_tiles` frames), at least
        `min_slots` (rows with fewer are masked). With no image and `min_slots` 0 every
        value is None: the vision tower does not run."""
        row_slots = [[slot for item in row for slot in item.slots] for row in rows]
        slots = max(min_slots, *map(len, row_slots), 0)
        if slots == 0:
            return {"images": None, "image_mask": None, "image_layout": None}
        images = np.zeros((len(rows), slots, *self.image_shape), np.float32)
        mask = np.zeros((len(rows), slots), bool)
        layout = self.geometry.empty_layouts(len(rows), slots)
        for b, filled in enumerate(row_slots):
            for i, (pixels, slot_layout) in enumerate(filled):
                images[b, i] = pixels
                mask[b, i] = True
                layout[b, i] = slot_layout
        return {"images": images, "image_mask": mask, "image_layout": layout}

    # --- generation -----------------------------------------------------------------------
    def sampling(
        self,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> SamplingConfig:
        """Sampling that stops at the eos token or the template's end of answer."""
        eos = self.eos_token_id
        return SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_token_ids=() if eos is None else (eos,),
            stop_strings=self.stop_strings,
            pad_token_id=self.pad_token_id,
        )

    @property
    def engine(self) -> Engine:
        """The model's one `Engine` (on its mesh, decoding text with its tokenizer)."""
        if self._engine is None:
            self._engine = Engine(
                self.config, mesh=self.mesh, rules=self.rules, tokenizer=self.tokenizer.tokenizer
            )
        return self._engine

    def generate(
        self, prompts: Sequence[np.ndarray], *args: Any, **kwargs: Any
    ) -> GenerationResult:
        """`Engine.generate` with this model's parameters."""
        return self.engine.generate(self.params, prompts, *args, **kwargs)

    def stream(self, prompts: Sequence[np.ndarray], *args: Any, **kwargs: Any) -> GenerationStream:
        """`Engine.stream` with this model's parameters."""
        return self.engine.stream(self.params, prompts, *args, **kwargs)


def check_text(text: str, what: str) -> None:
    """Raises `InputError` naming `what` and the position when `text` is not valid Unicode
    (a lone surrogate: from JSON's "\\ud800", or bytes that were not UTF-8 on the command
    line or on stdin); a tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end].encode("utf-8", "backslashreplace").decode("ascii")
        raise InputError(
            f"{what} is not valid Unicode text: {bad} at character {err.start} (bytes that "
            "are not UTF-8, or a lone surrogate)"
        ) from None


def read_image(path: str, root: str | None = None) -> Image.Image:
    """Decode an image file to RGB; `InputError` naming the file if missing, not a regular
    file, outside the folder `root` (when given) or unreadable."""
    try:
        data = read_image_file(path, root)
    except ImageFileError as err:  # the message names the path and the reason
        raise InputError(str(err)) from None
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except OSError as err:
        raise InputError(f"cannot read image {path}: {err.strerror or err}") from None
    except ValueError as err:  # e.g. "embedded null byte" in the path
        raise InputError(f"cannot read image {path!r}: {err}") from None
    try:
        return decode_image(data)
    except ImageDecodeError as err:
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x…>"): say the file instead.
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))
        raise InputError(f"unreadable image {path}: {reason}") from None


# --- the parameters as they will run --------------------------------------------------------------


def _quantize(config: ModelConfig, params: Any, mesh: Any, rules: Rules) -> Any:
    """The decoder's dense layers in int8 (`quantize_params`), computed where the parameters
    are; on a mesh, each quantized leaf takes the shardings of its logical axes."""
    from llava_jax.models.llava import abstract_params

    before = decoder_dense_bytes(params)
    shardings = None
    if mesh is not None:
        boxed = quantize_abstract(config, abstract_params(config))
        shardings = param_shardings(boxed, mesh, rules)
    params = jax.jit(lambda p: quantize_params(config, p), out_shardings=shardings)(params)
    logging.info(
        "Quantized the decoder's dense layers to int8: %.2f MB -> %.2f MB",
        before / 1e6,
        decoder_dense_bytes(params) / 1e6,
    )
    return params


def _relayout(config: ModelConfig, params: Any, scan: bool, mesh: Any, rules: Rules) -> Any:
    """`params` in the scanned (stacked) or unscanned (one tree per layer) layout of `scan`,
    on the mesh's shardings of that layout when there is a mesh."""
    from llava_jax.models.llava import abstract_params, to_scan_layout, to_unscanned_layout

    target = config.replace(scan_layers=scan)
    convert = to_scan_layout if scan else to_unscanned_layout
    if mesh is None:
        return convert(params, config)
    boxed = abstract_params(target)
    if is_quantized(params):
        boxed = quantize_abstract(target, boxed)
    return jax.device_put(convert(params, config), param_shardings(boxed, mesh, rules))


def load_model(
    path: str,
    *,
    mesh: Any = None,
    rules: Rules = DEFAULT_RULES,
    template: str | None = None,
    tokenizer: str | None = None,
    dtype: Any = None,
    step: int | None = None,
    quantize: str | None = None,
    scan_layers: bool | None = None,
) -> LoadedModel:
    """Load a training workdir, a Hugging Face LLaVA directory or a params checkpoint.

    mesh: place the parameters on it (restored straight onto their shardings); default:
    the first device. template: override the conversation template. tokenizer: a
    tokenizer directory (required for params checkpoints without `tokenizer/`). dtype:
    the compute dtype (e.g. "bfloat16"); parameters keep the dtype they were saved in.
    step: a workdir's checkpoint (default: the newest). quantize: "int8" turns the
    decoder's attention and MLP kernels into int8 weights with per-channel scales
    (models/quantize.py) once loaded; None or "none" keeps them as saved. scan_layers:
    the layer layout to run with (False: one parameter tree per layer, which decodes about
    1.3-1.8x faster on XLA:CPU than the stacked, scanned layers; True: stacked); None keeps the
    saved layout. `LoadedModel.params` and `.config` are in the layout chosen.

    Raises `InputError` naming the path: not a model directory, no checkpoint, a damaged
    one, a step it has not saved; `ArgumentError` naming the argument (`step=3`, which the
    programs say as their flag, `--step 3`): no tokenizer, an unknown `template`, `dtype`
    or `quantize`, a `step` for a directory without steps or other than the path's.
    """
    try:  # before the (slow) load
        quantize = check_mode(quantize)
    except ValueError as err:
        reason = str(err)
        raise ArgumentError("quantize", lambda arg: f"{arg}: {reason}") from None
    kind, directory, named_step = detect_kind(path)
    if step is not None and kind != "workdir":
        raise ArgumentError(
            "step",
            lambda arg: (
                f"{arg(step)}: {path} is a {KIND_NAMES[kind]}, which has no steps (a "
                "step names a checkpoint of a training workdir)"
            ),
        )
    if step is not None and named_step is not None and step != named_step:
        raise ArgumentError(
            "step",
            lambda arg: f"{arg(step)} contradicts the checkpoint path {path} (step {named_step})",
        )
    step = named_step if step is None else step
    if step is not None and step < 0:
        raise ArgumentError("step", lambda arg: f"{arg} must be a step number >= 0, got {step}")
    if template is not None:  # before the (slow) load
        try:
            get_template(template)
        except ValueError as err:
            raise ArgumentError("template", str(err)) from None
    if dtype is not None:
        try:
            dtype = jax.numpy.dtype(dtype)
        except TypeError:
            raise ArgumentError(
                "dtype", f"unknown dtype {dtype!r}: e.g. float32, bfloat16 or float16"
            ) from None
        if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
            name = dtype.name
            raise ArgumentError(
                "dtype", lambda arg: f"{arg} must be a floating-point type, got {name}"
            )
    loaded = load_checkpoint(
        path,
        kind,
        directory,
        step=step,
        tokenizer=tokenizer,
        mesh=mesh,
        rules=rules,
        dtype=dtype,
    )
    config, params, data, run_step = loaded.config, loaded.params, loaded.data, loaded.step
    try:
        chosen = get_template(template or data.template, data.template_version)
    except ValueError as err:
        raise InputError(str(err)) from None
    data = data.replace(template=chosen.name)
    image_tokens = ImageGeometry.of(config).describe()
    logging.info(
        "Loaded %s (%s%s): template %s (version %d), %s, context %d",
        path,
        kind,
        f", step {run_step}" if run_step is not None else "",
        chosen.name,
        chosen.version,
        image_tokens,
        config.text.max_position_embeddings,
    )
    if quantize is not None:
        params = _quantize(config, params, mesh, rules)
    if scan_layers is not None and bool(scan_layers) != config.scan_layers:
        params = _relayout(config, params, bool(scan_layers), mesh, rules)
        config = config.replace(scan_layers=bool(scan_layers))
    if mesh is None:  # on the first device once, not at every call
        params = jax.device_put(params)
    return LoadedModel(
        config=config,
        params=params,
        tokenizer=loaded.tokenizer,
        data=data,
        path=path,
        kind=kind,
        step=run_step,
        mesh=mesh,
        rules=rules,
        quantize=quantize,
    )
