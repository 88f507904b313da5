"""Answer one prompt about an image, several, or a video (LLaVA's `run_llava`), from the
shell.

    python -m llava_jax.generate --checkpoint WORKDIR_OR_MODEL_DIR --image cat.jpg \\
        --prompt "What is in the picture?" [--max-new-tokens 128 --temperature 0 --top-k 0 \\
        --top-p 1 --seed 0 --template vicuna_v1 --tokenizer DIR --dtype bfloat16 \\
        --quantize int8]
    python -m llava_jax.generate --checkpoint ONEVISION_DIR --image a.jpg --image b.jpg \\
        --prompt "What differs?"
    python -m llava_jax.generate --checkpoint ONEVISION_DIR --video clip.mp4 --frames 32 \\
        --prompt "What happens?"

`--image` may be given several times: each image gets its `<image>\\n` in front of the
prompt, in order (or the prompt writes `<image>` once for each, where each goes). A
LLaVA-OneVision model sees a lone image on its grid (anyres_max) and each of several as
one tile; `--video` (a video file or a folder of frame images, `--frames` sampled
uniformly, default 32) is one `<image>` after the images, its frames' tokens in its place
(OneVision models only).

`--checkpoint` is a training workdir (its newest checkpoint, or `--step`), a Hugging Face
LLaVA or LLaVA-NeXT directory (a NeXT model sees the image, of any size, as tiles) or a
params checkpoint (`--tokenizer` then names the tokenizer); see
`llava_jax/inference/load.py`. `--quantize int8` runs the decoder's attention and MLP
weights in int8 (per-channel scales, `llava_jax/models/quantize.py`). With an image, the
prompt gets `<image>\\n` in front, as LLaVA does; the template's generation prompt follows.
The answer goes to stdout.

When the prompt fits the model's context but the answer might not, `--max-new-tokens` is
lowered to what fits (with a note on stderr). Problems with the inputs (a missing or
unreadable image, a prompt longer than the context, a prompt that is not valid UTF-8 or
writes `<image>` without an image to put there, a directory without a checkpoint, a
`--step` it has not saved, an unknown `--template`, `--dtype` or `--quantize`) print one
line, `error: ...`, and exit with code 2 (`--debug`: the traceback). `--step N` loads step N
with the run config saved with it. Compiled programs are kept in the compilation cache
(`--compilation-cache`), so the next run starts faster.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llava_jax import cli, program
from llava_jax.inference.load import LoadedModel
from llava_jax.inference.prompting import Turn, prepare_prompt

DEFAULT_FRAMES = cli.DEFAULT_FRAMES


def answer(
    model: LoadedModel,
    prompt: str,
    image_path: str | Sequence[str] | None,
    *,
    video_path: str | None = None,
    frames: int = DEFAULT_FRAMES,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """The model's answer to `prompt` about the image at `image_path` (or the images of a
    list of paths, or none), and the video at `video_path` (`frames` of it; after the
    images).

    Raises `InputError` for an image or video that is missing or unreadable (or a video
    on a model that takes none), a prompt that leaves no room for an answer in the context,
    is not valid Unicode, or writes `<image>` more often than it has images (once at most
    for one image, where it goes; once for each or not at all for several; never without
    one).
    """
    paths = [image_path] if isinstance(image_path, str) else list(image_path or ())
    images = [model.load_image(path) for path in paths]
    if video_path is not None:
        images.append(model.load_video(video_path, frames))
    prepared = prepare_prompt(
        model,
        [Turn("user", prompt, with_image=len(images))],
        images,
        max_new_tokens=max_new_tokens,
        sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
    )
    fits = prepared.max_new_tokens
    if fits < max_new_tokens:
        print(
            f"note: the prompt has {len(prepared.ids)} tokens; --max-new-tokens lowered from "
            f"{max_new_tokens} to {fits} to fit the model's context of {model.context_length}",
            file=sys.stderr,
        )
    pixels = model.batch_images([prepared.images])
    return model.generate([prepared.ids], sampling=prepared.sampling, **pixels).texts[0].strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_model_arguments(parser)
    parser.add_argument(
        "--image",
        action="append",
        help="image file (omit for a text-only prompt; repeat for several)",
    )
    cli.add_video_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    cli.add_sampling_arguments(parser, max_new_tokens=128, temperature=0.0)
    args = parser.parse_args(argv)
    cli.check_sampling_arguments(parser, args)
    cli.check_video_arguments(parser, args)

    def body() -> int:
        cli.check_text(args.prompt, "--prompt")
        for path in args.image or ():
            cli.check_image_file(path)
        if args.video is not None:
            cli.check_video_path(args.video)
        model = cli.model_from_args(args)
        text = answer(
            model,
            args.prompt,
            args.image,
            video_path=args.video,
            frames=args.frames,
            **cli.sampling_from_args(args),
        )
        print(text, flush=True)
        return 0

    return program.run(body, args)


if __name__ == "__main__":
    sys.exit(main())
