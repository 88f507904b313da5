"""Convert weights between Hugging Face and llava_jax params checkpoints.

  python -m llava_jax.convert hf-to-params --hf DIR --out CKPT [--overwrite]
  python -m llava_jax.convert params-to-hf --params CKPT --out DIR [--dtype bfloat16] \\
      [--merge-lora] [--overwrite]
  python -m llava_jax.convert towers --vision CLIP_DIR --text LLAMA_DIR --out CKPT \\
      [--projector mlp2x_gelu] [--image-token-id N] [--overwrite]
  python -m llava_jax.convert lora-to-peft --params CKPT --out DIR \\
      [--base-model NAME_OR_PATH] [--overwrite]
  python -m llava_jax.convert peft-to-params --params BASE_CKPT --adapter DIR --out CKPT \\
      [--overwrite]
  python -m llava_jax.convert merge-lora --params CKPT --out CKPT [--overwrite]

Wherever `--params` is read, it may also be a training workdir (its newest checkpoint), e.g.
`params-to-hf --params workdir/llava-lora --merge-lora --out hf_out` after a LoRA run.

LoRA (`config.model.lora`): a params checkpoint of a LoRA model holds the frozen base and
the adapters' factors. `params-to-hf` writes such a checkpoint only with `--merge-lora` (each
adapted kernel becomes `W + (alpha/rank)·A·B`); `lora-to-peft` writes the adapters alone as a
Hugging Face PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`;
`--base-model` is recorded as its `base_model_name_or_path`); `peft-to-params` puts a PEFT
adapter on a plain params checkpoint of its base model, giving a LoRA params checkpoint
(adapting exactly the modules PEFT would: those its `target_modules` selects; factors PEFT
would not load, a non-finite `lora_alpha` and NaN factors are refused);
`merge-lora` turns a LoRA params checkpoint into the plain one it stands for (e.g. to start
another training stage from it). A LoRA checkpoint whose scale `alpha/rank` or factors are
not finite is refused by `merge-lora`, `lora-to-peft` and `params-to-hf --merge-lora`.

`--out` is a folder that is new or empty; one that holds anything (an earlier export, say)
is refused unless `--overwrite`, which replaces it whole: nothing of what it held stays
beside the new files. Either way the output is written to a hidden sibling folder first
and renamed into place at the end, so a run cut short never leaves a half-written folder,
or a mix of old and new files, at `--out`.

Problems with the inputs or the output (a missing or unreadable checkpoint, an unsupported
architecture, an `--out` that is a file, not empty, or the input itself) print one line,
`error: ...`, and exit with code 2 (`--debug`: the traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from llava_jax.checkpoint import load_model_params, save_params
from llava_jax.convert.hf import load_hf, load_towers, save_hf
from llava_jax.convert.peft import export_peft_adapter, import_peft_adapter
from llava_jax.convert.safetensors_io import CheckpointError
from llava_jax.errors import InputError
from llava_jax.models.lora import LORA_FACTORS, adapted_layers, merge_lora
from llava_jax.program import (
    EXIT_INPUT_ERROR,
    add_debug_argument,
    report_error,
    setup_logging,
    skip_absent_accelerators,
)

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class OutputError(InputError):
    """`--out` cannot be written as asked; the message names the folder and why."""


def check_output_folder(out: str, inputs: Sequence[str], overwrite: bool) -> None:
    """Raises `OutputError` when `out` is a file, lies under a file, is (or holds, or lies
    inside) one of the `inputs`, or is a folder that is not empty without `overwrite`."""
    target = os.path.realpath(out)
    if os.path.exists(target) and not os.path.isdir(target):
        raise OutputError(f"--out {out} is a file, not a folder")
    ancestor = os.path.dirname(target)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputError(f"--out {out}: {ancestor} is a file, not a folder")
    for source in inputs:
        source_path = os.path.realpath(source)
        inside = (target + os.sep).startswith(source_path + os.sep)
        if inside or (source_path + os.sep).startswith(target + os.sep):
            raise OutputError(f"--out {out} overlaps the input {source}: write somewhere else")
    if os.path.isdir(target) and not overwrite:
        names = sorted(os.listdir(target))
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise OutputError(
                f"--out {out} is not empty (it holds {shown}): give --overwrite to replace "
                "it whole, or choose a new or empty folder"
            )


def read_input(what: str, path: str, load: Callable[[], Any]) -> Any:
    """`load()`; an error becomes an `InputError` that names `what` and `path` (with its
    kind where the message may not say it: a damaged checkpoint can fail deep inside
    Orbax), unless its message names the path already."""
    try:
        return load()
    except (InputError, CheckpointError, FileNotFoundError) as err:
        if path in str(err) or os.path.abspath(path) in str(err):
            raise
        raise InputError(f"{what} {path}: {err}") from err
    except Exception as err:  # noqa: BLE001 - reported with its type; --debug shows more
        raise InputError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from err


def write_folder(out: str, write: Callable[[str], None]) -> None:
    """`write(folder)` into a new hidden sibling of `out`, then put it in `out`'s place
    (the folder `out` held before, if any, is removed only once the new one is in place).

    A run cut short leaves `out` as it was; the sibling `.NAME.partial-*` is removed when
    `write` raises.
    """
    target = os.path.realpath(out)  # a link to a folder: replace the folder it names
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging = os.path.join(parent, f".{name}.partial-{tag}")
    os.mkdir(staging)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(target):
        old = os.path.join(parent, f".{name}.old-{tag}")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out folder whole (default: refuse it)",
    )
    add_debug_argument(output)
    commands = parser.add_subparsers(dest="command", required=True)
    hf_in = commands.add_parser(
        "hf-to-params", parents=[output], help="HF LLaVA directory -> params checkpoint"
    )
    hf_in.add_argument("--hf", required=True)
    hf_in.add_argument("--out", required=True)
    hf_out = commands.add_parser(
        "params-to-hf", parents=[output], help="params checkpoint -> HF LLaVA directory"
    )
    hf_out.add_argument("--params", required=True)
    hf_out.add_argument("--out", required=True)
    hf_out.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    hf_out.add_argument(
        "--merge-lora",
        action="store_true",
        help="write a LoRA checkpoint's merged model (default: refuse a LoRA checkpoint)",
    )
    towers = commands.add_parser(
        "towers", parents=[output], help="CLIP + LLaMA directories -> params checkpoint"
    )
    towers.add_argument("--vision", required=True)
    towers.add_argument("--text", required=True)
    towers.add_argument("--out", required=True)
    towers.add_argument("--projector", default="mlp2x_gelu")
    towers.add_argument(
        "--image-token-id",
        type=int,
        default=None,
        help="default: the LLaMA vocabulary size (one token past it)",
    )
    to_peft = commands.add_parser(
        "lora-to-peft", parents=[output], help="LoRA params checkpoint -> PEFT adapter folder"
    )
    to_peft.add_argument("--params", required=True)
    to_peft.add_argument("--out", required=True)
    to_peft.add_argument(
        "--base-model",
        default=None,
        help="the adapter's base_model_name_or_path (a hub name or a folder; default: none)",
    )
    from_peft = commands.add_parser(
        "peft-to-params",
        parents=[output],
        help="base params checkpoint + PEFT adapter folder -> LoRA params checkpoint",
    )
    from_peft.add_argument("--params", required=True, help="the base model's params checkpoint")
    from_peft.add_argument("--adapter", required=True)
    from_peft.add_argument("--out", required=True)
    merge = commands.add_parser(
        "merge-lora", parents=[output], help="LoRA params checkpoint -> plain params checkpoint"
    )
    merge.add_argument("--params", required=True)
    merge.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    skip_absent_accelerators()
    try:
        if args.command == "hf-to-params":
            check_output_folder(args.out, [args.hf], args.overwrite)
            config, params = read_input(
                "the Hugging Face directory", args.hf, lambda: load_hf(args.hf)
            )
            write_folder(args.out, lambda folder: save_params(folder, config, params))
        elif args.command == "params-to-hf":
            check_output_folder(args.out, [args.params], args.overwrite)
            config, params = read_input(
                "the params checkpoint", args.params, lambda: load_model_params(args.params)
            )
            if config.lora.enabled and not args.merge_lora:
                raise InputError(
                    f"the params checkpoint {args.params} holds a LoRA model "
                    f"(lora.rank={config.lora.rank}): give --merge-lora to write the merged "
                    "model, or write the adapter alone with lora-to-peft"
                )
            if config.lora.enabled:
                _check_lora_numbers(args.params, config, params)
            dtype = DTYPES.get(args.dtype)
            write_folder(
                args.out,
                lambda folder: save_hf(
                    config, params, folder, dtype=dtype, merge_lora=args.merge_lora
                ),
            )
        elif args.command == "lora-to-peft":
            check_output_folder(args.out, [args.params], args.overwrite)
            config, params = _read_lora_checkpoint(args.params, "nothing to export")
            write_folder(
                args.out,
                lambda folder: export_peft_adapter(
                    config, params, folder, base_model_name_or_path=args.base_model
                ),
            )
        elif args.command == "peft-to-params":
            check_output_folder(args.out, [args.params, args.adapter], args.overwrite)
            config, params = read_input(
                "the params checkpoint", args.params, lambda: load_model_params(args.params)
            )
            if config.lora.enabled:
                raise InputError(
                    f"the params checkpoint {args.params} holds a LoRA model already "
                    f"(lora.rank={config.lora.rank}): give the plain base model's checkpoint "
                    "(merge-lora makes one of it)"
                )
            config, params = read_input(
                "the PEFT adapter",
                args.adapter,
                lambda: import_peft_adapter(config, params, args.adapter),
            )
            write_folder(args.out, lambda folder: save_params(folder, config, params))
        elif args.command == "merge-lora":
            check_output_folder(args.out, [args.params], args.overwrite)
            config, params = _read_lora_checkpoint(args.params, "nothing to merge")
            config, params = merge_lora(config, params)
            write_folder(args.out, lambda folder: save_params(folder, config, params))
        else:
            check_output_folder(args.out, [args.vision, args.text], args.overwrite)
            fields = {"projector": args.projector}
            if args.image_token_id is not None:
                fields["image_token_id"] = args.image_token_id
            config, params = read_input(
                "the towers",
                f"{args.vision} + {args.text}",
                lambda: load_towers(args.vision, args.text, **fields),
            )
            write_folder(args.out, lambda folder: save_params(folder, config, params))
    except (InputError, CheckpointError, OSError, ValueError, KeyError) as err:
        if args.debug:
            raise
        report_error(err if isinstance(err, InputError) else _described(err))
        return EXIT_INPUT_ERROR
    print(f"wrote {args.out}")
    return 0


def _read_lora_checkpoint(path: str, otherwise: str) -> tuple[Any, Any]:
    """(config, params) of the params checkpoint `path`, which must hold a LoRA model."""
    config, params = read_input("the params checkpoint", path, lambda: load_model_params(path))
    if not config.lora.enabled:
        raise InputError(
            f"the params checkpoint {path} holds no LoRA adapters (lora.rank=0): {otherwise}"
        )
    _check_lora_numbers(path, config, params)
    return config, params


def _check_lora_numbers(path: str, config: Any, params: Any) -> None:
    """Refuses a LoRA checkpoint whose scale (`lora.alpha / lora.rank`) or factors are not
    finite: its merged kernels, or its exported adapter, would be NaN."""
    lora = config.lora
    if not math.isfinite(lora.scale):
        raise InputError(
            f"the params checkpoint {path} has lora.alpha={lora.alpha} at lora.rank="
            f"{lora.rank}: the adapters' scale alpha/rank is not finite, so every adapted "
            "kernel would be NaN; make it again from an adapter with a finite lora_alpha"
        )
    for layer, node in adapted_layers(params):
        for name in LORA_FACTORS:
            bad = int(np.count_nonzero(~np.isfinite(np.asarray(node[name], np.float32))))
            if bad:
                raise InputError(
                    f"the params checkpoint {path}: {layer.module_path}/{name} holds {bad} "
                    "NaN or infinite value(s), so that kernel would be NaN; use a checkpoint "
                    "from before the adapters went bad"
                )


def _described(err: Exception) -> Exception:
    """The error with its kind in front where its message alone would not say it (a
    `KeyError` is only the key)."""
    if isinstance(err, (CheckpointError, FileNotFoundError)) or type(err) is ValueError:
        return err
    return InputError(f"{type(err).__name__}: {err}")


if __name__ == "__main__":
    sys.exit(main())
