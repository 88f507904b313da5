"""Benchmark: does LoRA learn? LoRA (bf16 and int8 frozen base) beside a full finetune.

The tiny LLaVA (configs/tiny.py) is first trained on part of the synthetic task: the
`caption` style only (one description per image; no questions), `--pretrain-steps` steps,
every tower. From that checkpoint three runs of the same length (`--steps`) learn the rest,
the `instruct` style (questions about colour, shape, count and position), on the same data
in the same order:

  full        the projector and the whole decoder train (LLaVA's stage 2), lr 1e-3
  lora_bf16   LoRA on every dense layer of the decoder's blocks, base stored in bfloat16
  lora_int8   the same with the frozen base in int8 (per output channel)

LoRA (rank 16, alpha 32, dropout 0.05) trains its factors and the projector (LLaVA's
recipe: the projector at the full finetune's rate, the adapters at a higher one, 2e-3).
The LoRA runs repeat for each of `--seeds` (the seed of the dropout masks), so the int8
base's difference can be read against the spread between seeds of the bf16 base itself.
Every step is logged. Each run ends with the trainer's held-out evaluation (greedy answers
to the test split's questions, and the loss on 500 held-out examples). Prints, per run:
held-out accuracy, held-out loss, final training loss (mean of the last 50 steps),
parameter bytes (all, trained, frozen), training time (first to last step); then how much
quantizing the trained bf16-base run's base to int8 afterwards changes its held-out loss;
and writes
`lora_loss.png` (the loss curves) and `lora_learning.json` under `--out`.

    python bench/lora_learning.py [--pretrain-steps 600] [--steps 400] [--seeds 0,1]
        [--out /tmp/lora_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNS = {
    "full": {
        "train.train_pattern": "proj/.*|llm/.*",
        "optimizer.learning_rate": "1e-3",
    },
    "lora_bf16": {
        "train.train_pattern": "proj/.*",
        "model.lora.rank": "16",
        "model.lora.alpha": "32.0",
        "model.lora.dropout": "0.05",
        "model.lora.base_dtype": "bfloat16",
        "optimizer.learning_rate": "2e-3",
        "optimizer.projector_learning_rate": "1e-3",
    },
    "lora_f32": {
        "train.train_pattern": "proj/.*",
        "model.lora.rank": "16",
        "model.lora.alpha": "32.0",
        "model.lora.dropout": "0.05",
        "model.lora.base_dtype": "param",
        "optimizer.learning_rate": "2e-3",
        "optimizer.projector_learning_rate": "1e-3",
    },
    "lora_int8": {
        "train.train_pattern": "proj/.*",
        "model.lora.rank": "16",
        "model.lora.alpha": "32.0",
        "model.lora.dropout": "0.05",
        "model.lora.base_dtype": "int8",
        "optimizer.learning_rate": "2e-3",
        "optimizer.projector_learning_rate": "1e-3",
    },
}


def train(workdir: str, overrides: dict[str, str], log) -> None:
    """Run `python -m llava_jax.main` (configs/tiny.py + overrides)."""
    command = [
        sys.executable,
        "-m",
        "llava_jax.main",
        f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in overrides.items()),
    ]
    log(" ".join(command))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def parameter_bytes(workdir: str) -> dict[str, int]:
    """Bytes of the saved parameters: all, trained (LoRA factors + what train_pattern
    names), frozen; read from the run's newest checkpoint on the host."""
    import jax
    import numpy as np

    from llava_jax import checkpoint as ckpt
    from llava_jax.train.optimizer import trainable_mask

    _, run_config = ckpt.read_run_config(workdir)
    params = ckpt.restore_params(workdir)
    mask = trainable_mask(params, run_config["train"]["train_pattern"])
    sizes = {"all": 0, "trained": 0, "frozen": 0}
    for leaf, trained in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True):
        size = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        sizes["all"] += size
        sizes["trained" if trained else "frozen"] += size
    return sizes


def held_out_loss_with_an_int8_base(workdir: str, batches: int = 6) -> tuple[float, float]:
    """The held-out loss of a trained LoRA run as trained, and with its frozen base
    quantized to int8 afterwards (the same adapters): how much int8 alone costs."""
    import dataclasses
    import itertools

    import numpy as np

    from llava_jax.data.pipeline import make_train_iterator
    from llava_jax.inference.load import load_model
    from llava_jax.models.lora import prepare_base
    from llava_jax.train.step import loss_sums

    loaded = load_model(workdir)
    config = loaded.config
    int8 = config.replace(lora=dataclasses.replace(config.lora, base_dtype="int8"))
    variants = {
        "trained": (config, loaded.params),
        "int8": (int8, prepare_base(int8, loaded.params)),
    }
    data = loaded.data.replace(global_batch_size=64, passes=1)
    iterator = make_train_iterator(data, loaded.geometry, loaded.tokenizer, split="test")
    sums = {name: [0.0, 0.0] for name in variants}
    from llava_jax.models.inputs import Batch
    from llava_jax.models.llava import Llava

    for raw in itertools.islice(iterator, batches):
        batch = Batch.from_arrays({k: np.asarray(v) for k, v in raw.items()})
        for name, (cfg, params) in variants.items():
            _, ce, _, tokens = loss_sums(Llava(cfg), params, batch)
            sums[name][0] += float(ce)
            sums[name][1] += float(tokens)
    iterator.close()
    return sums["trained"][0] / sums["trained"][1], sums["int8"][0] / sums["int8"][1]


def plot(results: dict, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        steps, losses = zip(*result["loss_curve"], strict=True)
        ax.plot(steps, losses, label=f"{name} (accuracy {result['accuracy']:.3f})")
    ax.set_xlabel("step (instruct stage)")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="/tmp/lora_bench")
    parser.add_argument("--seeds", default="0,1", help="seeds of the LoRA runs")
    parser.add_argument(
        "--runs", default="full,lora_bf16,lora_int8", help="which of " + ",".join(RUNS)
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from llava_jax.program import skip_absent_accelerators

    skip_absent_accelerators()  # else libtpu starts here and leaves its probe in the env

    def log(message: str) -> None:
        print(message, flush=True)

    pretrain = os.path.join(args.out, "pretrain")
    common = {
        "train.num_steps": str(args.steps),
        "train.log_every": "1",
        "eval.num_records": "200",
    }
    done = os.path.join(args.out, "pretrain.done")
    if not os.path.exists(done):
        train(
            pretrain,
            {
                "data.synthetic_style": "caption",
                "train.num_steps": str(args.pretrain_steps),
                "eval.num_records": "0",
            },
            log,
        )
        log(f"pretrain (caption style, {args.pretrain_steps} steps) done")
        open(done, "w").close()
    results = {}
    for name in args.runs.split(","):
        for seed in [0] if name == "full" else [int(x) for x in args.seeds.split(",")]:
            key = name if seed == 0 else f"{name}_seed{seed}"
            workdir = os.path.join(args.out, key)
            overrides = {
                **common,
                "init.mode": "checkpoint",
                "init.checkpoint_path": pretrain,
                "data.synthetic_style": "instruct",
                "train.seed": str(seed),
                **RUNS[name],
            }
            if not os.path.exists(os.path.join(workdir, "eval.json")):  # else: reuse it
                train(workdir, overrides, log)
            metrics = read_metrics(workdir)
            logged = [r for r in metrics if "loss" in r]
            curve = [(r["step"], r["loss"]) for r in logged]
            seconds = logged[-1]["time"] - logged[0]["time"]  # steps 1..N, no start-up or eval
            with open(os.path.join(workdir, "eval.json")) as f:
                evaluation = json.load(f)
            tail = [loss for _, loss in curve[-50:]]
            results[key] = {
                "accuracy": evaluation["accuracy"],
                "blind_accuracy": evaluation.get("blind_accuracy"),
                "held_out_loss": evaluation["eval_loss"],
                "final_loss": sum(tail) / len(tail),
                "bytes": parameter_bytes(workdir),
                "seconds": seconds,
                "loss_curve": curve,
            }
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; tiny LLaVA, caption pretrain {args.pretrain_steps} steps, "
        f"then {args.steps} instruct steps each"
    )
    print(
        "| run | held-out accuracy | held-out loss | final loss (last 50 steps) "
        "| params (KiB) | trained | frozen | time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        b = r["bytes"]
        print(
            f"| {name} | {r['accuracy']:.3f} | {r['held_out_loss']:.4f} | {r['final_loss']:.4f} "
            f"| {b['all'] / 1024:.0f} | {b['trained'] / 1024:.0f} | {b['frozen'] / 1024:.0f} "
            f"| {r['seconds']:.0f} s |"
        )
    if {"full", "lora_bf16"} <= results.keys():
        gap = results["full"]["accuracy"] - results["lora_bf16"]["accuracy"]
        print(f"full - lora_bf16 accuracy: {100 * gap:+.1f} points (aim: within 3)")
    for key in results:
        if key.startswith("lora_int8"):
            twin = key.replace("lora_int8", "lora_bf16")
            if twin in results:
                for what in ("final_loss", "held_out_loss"):
                    ratio = results[key][what] / results[twin][what] - 1
                    print(f"{key} vs {twin}, {what}: {100 * ratio:+.2f}% (aim: within 2%)")
    bf16 = [results[k] for k in results if k.startswith("lora_bf16")]
    if len(bf16) > 1:
        for what in ("final_loss", "held_out_loss"):
            values = [r[what] for r in bf16]
            print(
                f"lora_bf16 across seeds, {what}: {min(values):.4f}..{max(values):.4f} "
                f"(spread {100 * (max(values) / min(values) - 1):.1f}%)"
            )
    if "lora_bf16" in results:
        trained, int8 = held_out_loss_with_an_int8_base(os.path.join(args.out, "lora_bf16"))
        print(
            f"lora_bf16's held-out loss {trained:.4f}; with its base quantized to int8 "
            f"afterwards (same adapters): {int8:.4f} ({100 * (int8 / trained - 1):+.1f}%)"
        )
        results["lora_bf16"]["held_out_loss_int8_after"] = [trained, int8]
    plot(results, os.path.join(args.out, "lora_loss.png"))
    with open(os.path.join(args.out, "lora_learning.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
