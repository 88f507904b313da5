"""Benchmark: held-out answer accuracy, parameter bytes and decode speed, float vs int8.

Loads a training workdir twice, as it was saved (float32 for the tiny run) and with
`quantize="int8"` (the decoder's attention and MLP kernels in int8, models/quantize.py),
and asks both the questions the trainer's evaluator asks (train/evaluator.py): every
assistant turn of the first `eval.num_records` records of the run's held-out (`test`)
split, greedy, `eval.max_new_tokens` new tokens, stopping at the template's end, the
answer compared with the reference after VQA normalisation. Then the bytes of the
parameters (the decoder's dense layers and the whole model) in float32, bfloat16 and int8,
and decode tokens/s of `Engine.generate` (greedy, no eos, exactly `--new-tokens` tokens;
compile time and one warm-up excluded, median of `--repeats`, float and int8 interleaved).

    python bench/quantize_accuracy.py --workdir workdir/tiny [--num-records 200]
        [--batch-size 64] [--new-tokens 64] [--decode-batch-sizes 1,64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training workdir (read only)")
    parser.add_argument("--num-records", type=int, help="default: the run's eval.num_records")
    parser.add_argument("--batch-size", type=int, help="default: the run's eval.batch_size")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-batch-sizes", default="1,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    from llava_jax.program import skip_absent_accelerators

    skip_absent_accelerators()
    import jax
    import jax.numpy as jnp

    from llava_jax import checkpoint as ckpt
    from llava_jax.data.eval_questions import make_eval_questions
    from llava_jax.evaluation.batch import generate_answers
    from llava_jax.evaluation.vqa_normalize import normalize_vqa_answer
    from llava_jax.inference import SamplingConfig
    from llava_jax.inference.engine import default_length_bucket
    from llava_jax.inference.load import load_model
    from llava_jax.models.quantize import decoder_dense_bytes, nbytes

    step, run_config = ckpt.read_run_config(args.workdir)
    eval_config = run_config.get("eval", {})
    num_records = args.num_records or eval_config.get("num_records", 200)
    batch_size = args.batch_size or eval_config.get("batch_size", 64)
    max_new = eval_config.get("max_new_tokens", 16)

    models = {
        "float32": load_model(args.workdir),
        "int8": load_model(args.workdir, quantize="int8"),
    }
    reference = models["float32"]
    data = reference.data.replace(passes=1)
    questions = make_eval_questions(
        data, reference.geometry, reference.tokenizer, "test", num_records
    )
    references = [normalize_vqa_answer(q.answer) for q in questions]
    length = default_length_bucket(max(len(q.prompt_ids) for q in questions))
    batch_size = min(batch_size, len(questions))
    stops = sorted({q.stop.strip() for q in questions if q.stop.strip()})
    eos = reference.tokenizer.tokenizer.eos_token_id
    sampling = SamplingConfig(
        max_new_tokens=max_new,
        eos_token_ids=() if eos is None else (int(eos),),
        stop_strings=tuple(stops),
        pad_token_id=reference.tokenizer.pad_token_id,
    )
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} (other processes make the timings noisy)"
    )
    print(
        f"{args.workdir} step {step}: {len(questions)} held-out questions of {num_records} "
        f"test records (the trainer's evaluator), greedy, {max_new} new tokens, batch "
        f"{batch_size}"
    )

    results: dict = {"workdir": args.workdir, "step": step, "questions": len(questions)}
    answers = {}
    for name, model in models.items():
        answers[name] = generate_answers(
            model.engine,
            model.params,
            [q.prompt_ids for q in questions],
            [q.images for q in questions],
            [q.image_mask for q in questions],
            sampling,
            batch_size=batch_size,
            image_slots=questions[0].images.shape,
            length=length,
            image_layouts=[q.image_layout for q in questions],
        )
        correct = [
            normalize_vqa_answer(a) == r for a, r in zip(answers[name], references, strict=True)
        ]
        results[f"accuracy_{name}"] = float(np.mean(correct))
    same = np.mean([a == b for a, b in zip(answers["float32"], answers["int8"], strict=True)])
    results["same_answer"] = float(same)
    print(
        f"accuracy: float32 {results['accuracy_float32']:.3f}, int8 "
        f"{results['accuracy_int8']:.3f}; int8 gives the float32 answer on {same:.1%}"
    )

    float_params = reference.params
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), float_params)
    int8_params = models["int8"].params
    sizes = {
        "float32": (decoder_dense_bytes(float_params), nbytes(float_params)),
        "bfloat16": (decoder_dense_bytes(bf16_params), nbytes(bf16_params)),
        "int8": (decoder_dense_bytes(int8_params), nbytes(int8_params)),
    }
    results["bytes"] = {k: {"decoder_dense": d, "model": m} for k, (d, m) in sizes.items()}
    print(f"{'parameters':>10} {'decoder dense bytes':>20} {'whole model bytes':>18}")
    for name, (dense, whole) in sizes.items():
        print(
            f"{name:>10} {dense:>12,} ({dense / sizes['float32'][0]:.3f}) "
            f"{whole:>11,} ({whole / sizes['float32'][1]:.3f})"
        )
    print(
        f"int8 / bfloat16, decoder dense layers: {sizes['int8'][0] / sizes['bfloat16'][0]:.3f} "
        "(the rest — embedding, LM head, vision tower, projector, norms — stays float)"
    )

    # Decode speed: the same prompts (the first questions), exactly `new` tokens each.
    variants = {"float32": float_params, "int8": int8_params}
    new = args.new_tokens
    timing = SamplingConfig(max_new_tokens=new, pad_token_id=reference.tokenizer.pad_token_id)
    print(
        f"decode: {new} new tokens, greedy, no eos; median of {args.repeats}, compile and "
        "warm-up excluded"
    )
    print(f"{'batch':>5} {'float32 tok/s':>14} {'int8 tok/s':>11} {'int8/float32':>13}")
    results["decode_tokens_per_s"] = {}
    for rows in (int(b) for b in args.decode_batch_sizes.split(",")):
        picked = [questions[i % len(questions)] for i in range(rows)]
        prompts = [q.prompt_ids for q in picked]
        images = np.stack([q.images for q in picked])

        def run(params, prompts=prompts, images=images):
            engine = reference.engine  # params, not the engine, differ (it compiles per tree)
            result = engine.generate(params, prompts, images, None, timing, length=length)
            assert all(len(t) == new for t in result.tokens)

        times: dict[str, list[float]] = {name: [] for name in variants}
        for params in variants.values():
            run(params)  # compile
        for _ in range(args.repeats):  # interleaved: a busy machine slows each alike
            for name, params in variants.items():
                start = time.perf_counter()
                run(params)
                times[name].append(time.perf_counter() - start)
        tps = {name: rows * new / statistics.median(t) for name, t in times.items()}
        results["decode_tokens_per_s"][rows] = tps
        print(
            f"{rows:>5} {tps['float32']:>14.1f} {tps['int8']:>11.1f} "
            f"{tps['int8'] / tps['float32']:>12.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
