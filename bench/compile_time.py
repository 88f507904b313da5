"""Benchmark: compile time of the train step with 2 and with 32 decoder layers (scanned).

With `nn.scan` over the layers, XLA compiles one layer body whatever the depth, so the
time should barely grow. The model is bench/train_step.py's "small" LLaVA (decoder width
512, vision tower 6 layers at 224 px), float32, every tower trainable, batch 4 x 512, on
this machine's first device; each depth is lowered and compiled from scratch
(`--repeats` times, the median kept) with JAX's persistent cache off.

    python bench/compile_time.py [--layers 2,32] [--repeats 3] [--remat none]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def compile_seconds(num_layers: int, remat: str, scan: bool) -> tuple[float, float]:
    """(lowering, compile) seconds of a fresh train step with `num_layers` decoder layers."""
    import jax
    import numpy as np

    from llava_jax.models.config import ModelConfig, TextConfig, VisionConfig
    from llava_jax.sharding import DEFAULT_RULES, batch_sharding, make_mesh
    from llava_jax.train.optimizer import OptimizerConfig, make_optimizer
    from llava_jax.train.state import make_setup
    from llava_jax.train.step import jit_train_step, make_train_step

    config = ModelConfig(
        vision=VisionConfig(
            hidden_size=384,
            intermediate_size=1536,
            num_layers=6,
            num_heads=6,
            patch_size=16,
            image_size=224,
        ),
        text=TextConfig(
            vocab_size=32064,
            hidden_size=512,
            intermediate_size=1408,
            num_layers=num_layers,
            num_heads=8,
            num_kv_heads=4,
            max_position_embeddings=2048,
        ),
        image_token_id=32000,
        scan_layers=scan,
        remat_policy=remat,
    )
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-5), total_steps=1000)
    setup = make_setup(config, optimizer, ".*", mesh, DEFAULT_RULES)
    step = jit_train_step(setup, make_train_step(setup, schedule, loss_chunk_size=128), 4)
    shapes = {
        "input_ids": ((4, 512), np.int32),
        "loss_mask": ((4, 512), np.float32),
        "attention_mask": ((4, 512), np.int32),
        "images": ((4, 1, 224, 224, 3), np.float32),
        "image_mask": ((4, 1), np.bool_),
    }
    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh))
        for k, (shape, dtype) in shapes.items()
    }
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        lowered = step.jitted.lower(setup.abstract_state, batch)
        lowered_at = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
    return lowered_at - start, done - lowered_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan", type=int, default=1, help="1: nn.scan over layers")
    args = parser.parse_args()

    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    depths = [int(n) for n in args.layers.split(",")]
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; remat {args.remat}, scan {bool(args.scan)}"
    )
    results = {}
    for depth in depths:
        runs = [compile_seconds(depth, args.remat, bool(args.scan)) for _ in range(args.repeats)]
        lower = statistics.median(r[0] for r in runs)
        compile_ = statistics.median(r[1] for r in runs)
        results[depth] = lower + compile_
        print(
            f"{depth:3d} decoder layers: lower {lower:6.2f} s + compile {compile_:6.2f} s "
            f"= {lower + compile_:6.2f} s  (runs: {[round(sum(r), 2) for r in runs]})"
        )
    first, last = depths[0], depths[-1]
    print(f"ratio {last} / {first} layers: {results[last] / results[first]:.2f}x")


if __name__ == "__main__":
    main()
