"""The arguments of the programs that load a model (`generate`, `chat`, `evaluate`,
`serve`): the model, its mesh and numerics, sampling, and the checks that run before the slow
load. A library function's error about one of its arguments (an `ArgumentError`, e.g.
`load_model`'s "tokenizer=DIR") is said with the flag that gave it ("--tokenizer DIR"):
`FLAGS` is the table, `flag_names` the translation. What every program shares (terminal,
log, cache, errors, `run`) is `program.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import Any

from llava_jax.errors import ArgumentError, InputError
from llava_jax.program import add_common_arguments

# The arguments of library functions (load_model, evaluate_file, ...) the programs' flags give.
FLAGS = {
    "tokenizer": "--tokenizer",
    "template": "--template",
    "step": "--step",
    "dtype": "--dtype",
    "quantize": "--quantize",
    "out_path": "--out",
}


@contextlib.contextmanager
def flag_names() -> Iterator[None]:
    """An `ArgumentError` about an argument a flag gives (`FLAGS`) leaves this block as an
    `InputError` naming the flag instead (`step=3 ...` -> `--step 3 ...`)."""
    try:
        yield
    except ArgumentError as err:
        flag = FLAGS.get(err.argument)
        if flag is None:
            raise
        raise InputError(err.naming(flag)) from err


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="training workdir, Hugging Face LLaVA directory, or params checkpoint",
    )
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's own)")
    parser.add_argument("--template", help="conversation template (default: the model's)")
    parser.add_argument("--step", type=int, help="workdir checkpoint step (default: newest)")
    parser.add_argument("--dtype", help="compute dtype, e.g. bfloat16 (default: as saved)")
    parser.add_argument(
        "--quantize",
        metavar="{none,int8}",
        help="int8: the decoder's attention and MLP weights in int8 with per-channel scales, "
        "dequantized inside each matmul (weight-only; about 1/4 of their float32 bytes); "
        "default: none",
    )
    parser.add_argument(
        "--layers",
        choices=("auto", "scanned", "unscanned"),
        default="auto",
        help="the decoder's layer layout to run: unscanned (one parameter tree per layer) "
        "decodes 1.3-1.8x faster on a CPU, scanned compiles faster; auto: unscanned on a CPU, "
        "as saved elsewhere",
    )
    parser.add_argument(
        "--mesh",
        help="DATA,FSDP,TENSOR device mesh, -1 for the rest, e.g. --mesh=-1,1,1 (default: one "
        "device)",
    )
    add_common_arguments(parser)


def add_sampling_arguments(
    parser: argparse.ArgumentParser, max_new_tokens: int, temperature: float
) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help="0: greedy (argmax)")
    parser.add_argument("--top-k", type=int, default=0, help="0: all tokens")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: all tokens")
    parser.add_argument("--seed", type=int, default=0)


def check_sampling_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Bad knobs are command-line errors (exit 2 with usage), before the model loads."""
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0, got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling knobs as `LoadedModel.sampling` takes them."""
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )


def mesh_from_args(args: argparse.Namespace) -> Any:
    """The `--mesh` of this process's devices, or None."""
    if not args.mesh:
        return None
    from llava_jax.sharding import make_mesh

    try:
        shape = tuple(int(size) for size in args.mesh.split(","))
        return make_mesh(shape)
    except ValueError as err:
        raise InputError(f"--mesh {args.mesh}: {err}") from None


def model_from_args(args: argparse.Namespace) -> Any:
    """The `LoadedModel` the model arguments name; its errors about an argument name the
    flag (`flag_names`)."""
    from llava_jax.inference.load import load_model

    mesh = mesh_from_args(args)
    with flag_names():
        return load_model(
            args.checkpoint,
            mesh=mesh,
            template=args.template,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            step=args.step,
            quantize=getattr(args, "quantize", None),
            scan_layers=scan_layers_from_args(args),
        )


def scan_layers_from_args(args: argparse.Namespace) -> bool | None:
    """`--layers` as `load_model`'s `scan_layers`: None keeps the saved layout."""
    import jax

    choice = getattr(args, "layers", "auto")
    if choice == "auto":
        return False if jax.default_backend() == "cpu" else None
    return choice == "scanned"


DEFAULT_FRAMES = 32  # frames sampled from a video: LLaVA-OneVision's (lmms-eval's default)


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """`--video PATH` and `--frames N` (a LLaVA-OneVision model's video)."""
    parser.add_argument(
        "--video",
        help="video file or folder of frame images (a LLaVA-OneVision model; one <image>, "
        "after the images)",
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=DEFAULT_FRAMES,
        help=f"frames sampled uniformly from --video (default {DEFAULT_FRAMES})",
    )


def check_video_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--frames` below 1 is a command-line error (exit 2 with usage), before the model
    loads."""
    if args.frames < 1:
        parser.error(f"--frames must be >= 1, got {args.frames}")


def check_video_path(path: str) -> None:
    """Fail before the (slow) model load when the video file or frame folder is missing
    (its frames are read once the model is loaded: the model's tile size shapes them)."""
    if not os.path.exists(path):
        raise InputError(f"video not found: {path}")


def check_image_file(path: str) -> None:
    """Fail before the (slow) model load when the image is missing or cannot be decoded."""
    from llava_jax.inference.load import read_image

    read_image(path)


def check_text(text: str, what: str) -> None:
    """Fail before the model load when `text` (a command-line argument) is not valid
    Unicode, e.g. bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    from llava_jax.inference.load import check_text as check

    check(text, what)
