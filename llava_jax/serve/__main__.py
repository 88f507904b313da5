"""Serve a model over HTTP with OpenAI's chat completions API, and a chat page at `/`.

    python -m llava_jax.serve --checkpoint WORKDIR_OR_MODEL_DIR [--host 127.0.0.1] \\
        [--port 8000] [--max-batch 8] [--batch-wait-ms 10] [--chunk-size 4] \\
        [--model-name NAME] [--max-image-bytes 10485760] [--max-image-pixels N] [--frames 32]

`--checkpoint` and the other model arguments are those of `generate` and `chat`. Requests
that arrive within `--batch-wait-ms` of each other are decoded together, up to
`--max-batch` (1: one request at a time). Any OpenAI client works:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}])

The model name is `--model-name`, default the checkpoint directory's name (`GET
/v1/models` says it). Images come inline as data URLs; the server fetches nothing. An image
may have `--max-image-pixels` pixels at most (read from its header, before decoding; default
128 times the pixels of the model's largest input: 14.4 million for a 336 px LLaVA-1.5).
A LLaVA-OneVision model also takes several images in a message and a video (a `video_url`
part, `data:video/mp4;base64,...`, within `--max-image-bytes`), `--frames` of it sampled
uniformly.
Start-up problems (a missing checkpoint, a port in use) print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from llava_jax import cli, program


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--engine",
        choices=("batch", "slots"),
        default="batch",
        help="batch: requests arriving together decode as one batch until it ends; slots: "
        "continuous batching, each request entering a free decode slot between decode steps",
    )
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    parser.add_argument(
        "--max-slots",
        type=int,
        default=8,
        help="--engine slots: the most rows decoded together (fewer when --kv-cache-gib "
        "holds fewer)",
    )
    parser.add_argument(
        "--slot-cache-length",
        type=int,
        default=0,
        help="--engine slots: KV cache slots of a row, the most a prompt's length bucket plus "
        "its max_tokens may take (default: the longest --kv-cache-gib holds for --max-slots "
        "rows, at most the model's context)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=0,
        help="--engine slots: prompt tokens prefilled in one step, a power of two (0: a whole "
        "prompt), so a long prompt does not stall the running answers",
    )
    parser.add_argument(
        "--prefill-budget",
        type=int,
        default=0,
        help="--engine slots with --prefill-chunk: prompt tokens prefilled a round while "
        "answers decode, a multiple of --prefill-chunk, the earliest prompt first (default: "
        "one chunk); more serves more requests, fewer keeps the answers' tokens coming evenly",
    )
    parser.add_argument(
        "--kv-cache-gib",
        type=float,
        default=0.0,
        help="--engine slots: memory for the decode slots' keys and values on each device, "
        "which sets how many slots of --slot-cache-length fit (default: half the device's "
        "memory beside the parameters; 2 GiB on a CPU)",
    )
    parser.add_argument(
        "--image-cache-gib",
        type=float,
        default=1.0,
        help="--engine slots: memory for images' features kept for later requests about the "
        "same image (least recently used out; 0: none)",
    )
    parser.add_argument(
        "--prefix-cache-gib",
        type=float,
        default=1.0,
        help="--engine slots with --prefill-chunk: memory for the keys and values of prompts' "
        "first blocks, kept for later prompts that start the same way (0: none)",
    )
    parser.add_argument(
        "--steps-per-round",
        type=int,
        default=4,
        help="--engine slots: decode steps between two admissions of waiting requests",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=10.0,
        help="how long a request waits for others to fill a batch",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=4, help="tokens decoded between streamed pieces"
    )
    parser.add_argument("--model-name", help="the model's id in the API (default: dir name)")
    parser.add_argument(
        "--max-image-bytes", type=int, default=10 << 20, help="largest image accepted"
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        help="most pixels an image may have, read from its header before decoding "
        "(default: 128 times the pixels of the model's largest input)",
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=cli.DEFAULT_FRAMES,
        help=f"frames sampled from a request's video (default {cli.DEFAULT_FRAMES})",
    )
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error(f"--frames must be >= 1, got {args.frames}")
    if args.max_batch < 1:
        parser.error(f"--max-batch must be >= 1, got {args.max_batch}")
    for flag in ("max_slots", "steps_per_round"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.prefill_chunk < 0 or args.prefill_chunk & (args.prefill_chunk - 1):
        parser.error(f"--prefill-chunk must be 0 or a power of two, got {args.prefill_chunk}")
    if args.prefill_budget < 0:
        parser.error(f"--prefill-budget must be >= 0, got {args.prefill_budget}")
    if args.prefill_budget and args.prefill_chunk and args.prefill_budget % args.prefill_chunk:
        parser.error(
            f"--prefill-budget must be a multiple of --prefill-chunk={args.prefill_chunk}, "
            f"got {args.prefill_budget}"
        )
    for flag in ("image_cache_gib", "prefix_cache_gib", "kv_cache_gib"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.slot_cache_length < 0:
        parser.error(f"--slot-cache-length must be >= 0, got {args.slot_cache_length}")
    if args.batch_wait_ms < 0:
        parser.error(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    if args.chunk_size < 1:
        parser.error(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    if args.max_image_bytes < 1:
        parser.error(f"--max-image-bytes must be >= 1, got {args.max_image_bytes}")
    if args.max_image_pixels is not None and args.max_image_pixels < 1:
        parser.error(f"--max-image-pixels must be >= 1, got {args.max_image_pixels}")

    def body() -> int:
        import uvicorn

        from llava_jax.serve.app import create_app, default_max_image_pixels
        from llava_jax.serve.batcher import Batcher
        from llava_jax.serve.slot_batcher import SlotBatcher

        model = cli.model_from_args(args)
        name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
        if args.engine == "slots":
            batcher = SlotBatcher(
                model,
                max_slots=args.max_slots,
                cache_length=args.slot_cache_length,
                steps_per_round=args.steps_per_round,
                prefill_chunk=args.prefill_chunk,
                prefill_budget=args.prefill_budget,
                kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
                image_cache_bytes=int(args.image_cache_gib * (1 << 30)),
                # the prefix cache's blocks are prefill chunks: none without them
                prefix_cache_bytes=int(args.prefix_cache_gib * (1 << 30))
                if args.prefill_chunk
                else 0,
            )
            batching = f"up to {args.max_slots} decode slots"
        else:
            batcher = Batcher(
                model,
                max_batch=args.max_batch,
                batch_wait_s=args.batch_wait_ms / 1000,
                chunk_size=args.chunk_size,
            )
            batching = f"max batch {args.max_batch}, batch wait {args.batch_wait_ms:g} ms"
        max_pixels = args.max_image_pixels or default_max_image_pixels(model)
        app = create_app(
            model,
            batcher,
            name,
            max_image_bytes=args.max_image_bytes,
            max_request_bytes=2 * args.max_image_bytes + (1 << 20),
            max_image_pixels=max_pixels,
            video_frames=args.frames,
        )
        print(
            f"Serving {name} (template {model.template.name}) on http://{args.host}:{args.port} "
            f"({batching}, "
            f"images up to {max_pixels} pixels)",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="info" if args.verbose else "warning",
            access_log=args.verbose,
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        server.run()
        return 0 if server.started else 1

    return program.run(body, args)


if __name__ == "__main__":
    sys.exit(main())
