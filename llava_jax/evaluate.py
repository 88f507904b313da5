"""Answer a benchmark's questions in batches (LLaVA's `eval/model_vqa*.py`).

    python -m llava_jax.evaluate --checkpoint WORKDIR_OR_MODEL_DIR \\
        --questions questions.jsonl --image-dir images/ --out answers.jsonl \\
        [--batch-size 8 --max-new-tokens 128 --temperature 0 --model-id NAME \\
         --quantize int8 ...]
    python -m llava_jax.evaluation.scorers vqa --answers answers.jsonl --annotations ann.jsonl

Questions and answers are in LLaVA's JSONL formats (see `llava_jax/evaluation/batch.py`).
`--image-dir` defaults to the questions file's folder; `--model-id` to the checkpoint's
folder name. A question whose image is missing or unreadable, whose prompt does not fit
the context, whose text is not valid Unicode (e.g. JSON's "\\ud800") or writes `<image>`
without an image to put there gets an answer entry with an `error` field naming the
cause, and the run goes on; a malformed questions file stops before any generation,
naming the file and line (exit code 2). A summary goes to stderr at the end.

The answers are written as each is produced (a line, flushed) to `OUT.partial` beside
`--out`, which is renamed to `--out` at the end: a run that is cut short never leaves an
empty or truncated `--out` (an earlier one stays as it was), and its answers so far are
in `OUT.partial`. An `--out` that is the questions file (under any spelling, or a link
to it) or a folder is refused before the model loads, as are a missing checkpoint, an
unknown template or `--quantize`, or a `--step` the workdir has not saved: one line, exit
code 2 (`--debug`: the traceback). `--quantize int8` answers with the decoder's attention
and MLP weights in int8 (`llava_jax/models/quantize.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from llava_jax import cli, program
from llava_jax.evaluation.batch import check_output_path, evaluate_file, read_questions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_model_arguments(parser)
    parser.add_argument("--questions", required=True, help="LLaVA questions JSONL")
    parser.add_argument("--image-dir", help="folder of the questions' images")
    parser.add_argument("--out", required=True, help="answers JSONL to write")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="questions answered together (a batch is never padded past the questions there are)",
    )
    parser.add_argument("--model-id", help="the answers' model_id")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_sampling_arguments(parser, max_new_tokens=128, temperature=0.0)
    args = parser.parse_args(argv)
    cli.check_sampling_arguments(parser, args)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")

    def body() -> int:
        with cli.flag_names():  # evaluate_file's out_path=... is said as --out ...
            check_output_path(args.questions, args.out)  # never write over the questions
            read_questions(args.questions)  # a malformed file fails before the model loads
            image_dir = args.image_dir or os.path.dirname(os.path.abspath(args.questions))
            model_id = args.model_id or os.path.basename(os.path.normpath(args.checkpoint))
            model = cli.model_from_args(args)
            sampling = model.sampling(**cli.sampling_from_args(args))
            counts = evaluate_file(
                model,
                args.questions,
                image_dir,
                args.out,
                sampling,
                batch_size=args.batch_size,
                model_id=model_id,
                progress=not args.no_progress,
            )
        print(json.dumps({"out": args.out, **counts}), file=sys.stderr)
        return 0

    return program.run(body, args)


if __name__ == "__main__":
    sys.exit(main())
