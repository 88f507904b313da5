"""Answer one prompt about one image (LLaVA's `run_llava`), from the shell.

    python -m llava_jax.generate --checkpoint WORKDIR_OR_MODEL_DIR --image cat.jpg \\
        --prompt "What is in the picture?" [--max-new-tokens 128 --temperature 0 --top-k 0 \\
        --top-p 1 --seed 0 --template vicuna_v1 --tokenizer DIR --dtype bfloat16]

`--checkpoint` is a training workdir (its newest checkpoint), a Hugging Face LLaVA
directory or a params checkpoint (`--tokenizer` then names the tokenizer); see
`llava_jax/inference/load.py`. With an image, the prompt gets `<image>\\n` in front, as
LLaVA does; the template's generation prompt follows. The answer goes to stdout.

When the prompt fits the model's context but the answer might not, `--max-new-tokens` is
lowered to what fits (with a note on stderr). Problems with the inputs (a missing or
unreadable image, a prompt longer than the context, a directory without a checkpoint)
print one line, `error: ...`, and exit with code 2.

The argument and error helpers here are shared by `llava_jax.chat` and `llava_jax.evaluate`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from llava_jax.inference.load import InputError, LoadedModel

EXIT_INPUT_ERROR = 2  # as argparse uses for a bad command line


# --- shared by the inference CLIs ----------------------------------------------------------------


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
        "--mesh",
        help="DATA,FSDP,TENSOR device mesh, -1 for the rest, e.g. --mesh=-1,1,1 (default: one "
        "device)",
    )


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


def model_from_args(args: argparse.Namespace) -> LoadedModel:
    from llava_jax.inference.load import load_model

    return load_model(
        args.checkpoint,
        mesh=mesh_from_args(args),
        template=args.template,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        step=args.step,
    )


def check_image_file(path: str) -> None:
    """Fail before the (slow) model load when the image is missing or cannot be decoded."""
    from llava_jax.inference.load import read_image

    read_image(path)


def run_cli(body: Callable[[], int]) -> int:
    """Run a CLI body; `InputError` becomes `error: <message>` on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return body()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR


# --- this CLI ----------------------------------------------------------------------------------


def answer(
    model: LoadedModel,
    prompt: str,
    image_path: str | None,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """The model's answer to `prompt` about the image at `image_path` (or no image).

    Raises `InputError` for an image that is missing or unreadable, or a prompt that
    leaves no room for an answer in the context.
    """
    images = None
    if image_path is not None:
        images = model.load_image(image_path)[None, None]  # float32[1, 1, H, W, 3]
    ids = model.prompt_ids([model.user_turn(prompt, with_image=images is not None)])
    fits = model.check_prompt(ids, max_new_tokens, clamp=True)
    if fits < max_new_tokens:
        print(
            f"note: the prompt has {len(ids)} tokens; --max-new-tokens lowered from "
            f"{max_new_tokens} to {fits} to fit the model's context of {model.context_length}",
            file=sys.stderr,
        )
    sampling = model.sampling(fits, temperature, top_k, top_p, seed)
    result = model.generator().generate([ids], images, None, sampling)
    return result.texts[0].strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--image", help="image file (omit for a text-only prompt)")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    add_sampling_arguments(parser, max_new_tokens=128, temperature=0.0)
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)

    def body() -> int:
        if args.image is not None:
            check_image_file(args.image)
        model = model_from_args(args)
        print(
            answer(
                model,
                args.prompt,
                args.image,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
            ),
            flush=True,
        )
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
