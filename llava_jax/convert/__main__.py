"""Convert weights between Hugging Face and llava_jax params checkpoints.

  python -m llava_jax.convert hf-to-params --hf DIR --out CKPT
  python -m llava_jax.convert params-to-hf --params CKPT --out DIR [--dtype bfloat16]
  python -m llava_jax.convert towers --vision CLIP_DIR --text LLAMA_DIR --out CKPT \
      [--projector mlp2x_gelu] [--image-token-id N]
"""

from __future__ import annotations

import argparse
import sys

import ml_dtypes
import numpy as np

from llava_jax.checkpoint import load_params, save_params
from llava_jax.convert.hf import load_hf, load_towers, save_hf
from llava_jax.convert.safetensors_io import CheckpointError

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    hf_in = commands.add_parser("hf-to-params", help="HF LLaVA directory -> params checkpoint")
    hf_in.add_argument("--hf", required=True)
    hf_in.add_argument("--out", required=True)
    hf_out = commands.add_parser("params-to-hf", help="params checkpoint -> HF LLaVA directory")
    hf_out.add_argument("--params", required=True)
    hf_out.add_argument("--out", required=True)
    hf_out.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    towers = commands.add_parser("towers", help="CLIP + LLaMA directories -> params checkpoint")
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
    args = parser.parse_args(argv)
    try:
        if args.command == "hf-to-params":
            config, params = load_hf(args.hf)
            save_params(args.out, config, params)
        elif args.command == "params-to-hf":
            config, params = load_params(args.params)
            save_hf(config, params, args.out, dtype=DTYPES.get(args.dtype))
        else:
            fields = {"projector": args.projector}
            if args.image_token_id is not None:
                fields["image_token_id"] = args.image_token_id
            config, params = load_towers(args.vision, args.text, **fields)
            save_params(args.out, config, params)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
