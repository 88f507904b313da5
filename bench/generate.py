"""Benchmark: tokens per second of llava_jax's generation beside transformers' `generate`,
and against this machine's memory roofline.

Both sides run the same random LLaVA (built with transformers, converted with `load_hf`;
nothing downloaded), float32, greedy, exactly `--new-tokens` new tokens (no eos), each
prompt with one image. The default model's decoder is LLaMA-shaped and large enough that
its weights (~300 MB read per decode step) do not fit this CPU's last-level cache, so a
decode step is bound by memory bandwidth:

    roofline (tokens/s) = batch * bandwidth / bytes one decode step must read
    bytes per step      = decoder weights (all layers, final norm, LM head; the embedding
                          table only for the rows looked up) + the live part of the KV cache
                          (prompt + tokens so far, averaged over the decode steps)

The bandwidth is measured in the same run (the fastest of a numpy copy, a JAX copy and a
JAX read-only sum over 512 MiB arrays), so the fraction of the roofline is a lower bound.

Each call is timed end to end (prefill + decode) and its decode part alone: llava_jax
through `Engine.stream` (the first chunk is the prefill's token, the rest one decode call),
transformers through a stopping criterion that stamps the time of every new token. The
decode rate counts the tokens after the first. Compile time and each side's first call are
excluded. Timings are medians of `--repeats` interleaved rounds. llava_jax runs with its
decoder layers unscanned (`model.scan_layers=False`, one parameter tree per layer) and
scanned (stacked, `nn.scan`), the same weights.

    python bench/generate.py                 # batch 1 and 8, prompts 64 and 1024 tokens
    python bench/generate.py --quick         # a small model, batch 1, prompt 64: smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time

import numpy as np

MODELS = {
    # ~99M parameters (75M of them read per decode step: 300 MB in float32).
    "default": dict(hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4),
    # The old tiny benchmark model (the weights fit in the last-level cache).
    "quick": dict(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4),
}
VOCAB = 32000


def build_model(directory: str, shape: dict, image_size: int = 28, context: int = 2048):
    """A random LLaVA of `shape` (CLIP of `image_size` px, patch 14: 28 px gives 4 image
    tokens, 336 px LLaVA-1.5's 576), saved with `save_pretrained`."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=14,
        ),
        text_config=LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=shape["hidden"],
            intermediate_size=shape["intermediate"],
            num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kv_heads"],
            max_position_embeddings=context,
        ),
        image_token_index=VOCAB - 1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    return config, model


def make_batch(batch_size: int, length: int, image_token: int, seed: int = 0):
    """B prompts of exactly `length` tokens, each with one image (4 image tokens)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(batch_size):
        prompt = rng.integers(1, image_token, length).astype(np.int32)
        prompt[1:5] = image_token
        prompts.append(prompt)
    images = rng.standard_normal((batch_size, 1, 1, 28, 28, 3)).astype(np.float32)
    return prompts, images


def seconds_per_call(fn, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn`, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure_bandwidth(mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth in bytes/s (best of `repeats`), three ways over `mib` MiB arrays."""
    import jax
    import jax.numpy as jnp

    n = mib * 2**20 // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)

    def best(fn) -> float:
        return min(seconds_per_call(fn, repeats))

    out = {"numpy copy (read + write)": 2 * src.nbytes / best(lambda: np.copyto(dst, src))}
    # JAX: x <- x * 1.5 in place (donated: no fresh pages to fault in), and a sum of x.
    scale = jax.jit(lambda x: x * 1.5, donate_argnums=0)
    total = jax.jit(jnp.sum)
    state = {"x": jnp.ones(n, jnp.float32)}

    def rescale():
        state["x"] = scale(state["x"]).block_until_ready()

    out["jax x *= 1.5 (read + write)"] = 2 * src.nbytes / best(rescale)
    out["jax sum (read)"] = src.nbytes / best(lambda: total(state["x"]).block_until_ready())
    return out


def decode_bytes(params: dict, config, batch: int, prompt: int, new: int, cache_bytes: int):
    """Bytes one decode step must read, averaged over the `new - 1` decode steps: the
    decoder's weights (the embedding table only for the looked-up rows) + the live KV cache."""
    import jax

    llm = params["llm"]
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(llm))
    embed = llm["embed"]["embedding"]
    if not config.text.tie_word_embeddings:  # the table is not the LM head: only B rows
        weights -= embed.size * embed.dtype.itemsize
        weights += batch * embed.shape[1] * embed.dtype.itemsize
    text = config.text
    per_token = 2 * text.num_layers * text.num_kv_heads * text.resolved_head_dim * cache_bytes
    live_tokens = prompt + new / 2  # the step making token i (1..new-1) reads prompt + i
    return weights, batch * per_token * live_tokens


def weight_matrices(unscanned_params: dict) -> list[np.ndarray]:
    """Every matrix a decode step multiplies by, as [in, out]: each decoder layer's
    projections and the LM head (the embedding table is only gathered, so it is left out)."""
    import jax

    matrices = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(unscanned_params["llm"]):
        name = jax.tree_util.keystr(path)
        if not name.endswith("['kernel']"):
            continue
        kernel = np.asarray(leaf)  # q/k/v [in, heads, head_dim]; out [heads, head_dim, out]
        if "['out']" in name:
            matrices.append(kernel.reshape(-1, kernel.shape[-1]))
        else:
            matrices.append(kernel.reshape(kernel.shape[0], -1))
    return matrices


def matvec_ceiling(matrices: list[np.ndarray], batch: int, repeats: int = 20) -> dict[str, float]:
    """Seconds for one chain of `batch`-row matrix products through `matrices` (each product
    feeds the next, so nothing runs out of order): the weights-only part of a decode step, on
    XLA (jit) and on numpy's BLAS. Medians of `repeats`."""
    import jax
    import jax.numpy as jnp

    def chain(xnp, ms):
        x = xnp.ones((batch, ms[0].shape[0]), np.float32)
        for m in ms:
            x = xnp.resize(x, (batch, m.shape[0])) if x.shape[1] != m.shape[0] else x
            x = x @ m
            x = x / (1 + xnp.abs(x).mean())  # stays finite, and keeps the chain dependent
        return x

    on_device = [jnp.asarray(m) for m in matrices]
    xla = jax.jit(lambda ms: chain(jnp, ms))

    def median(fn) -> float:
        return statistics.median(seconds_per_call(fn, repeats))

    return {
        "XLA": median(lambda: xla(on_device).block_until_ready()),
        "numpy BLAS": median(lambda: chain(np, matrices)),
    }


def rates(runs: list[tuple[float, float]], batch: int, new: int) -> tuple[float, float]:
    """(end-to-end, decode-only) tokens/s from (total s, decode s) runs, medians."""
    total = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return batch * new / total, batch * (new - 1) / decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, batch 1, prompt 64")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (quick 16)")
    parser.add_argument("--batch-sizes", default=None, help="default 1,8 (quick 1)")
    parser.add_argument("--prompt-lengths", default=None, help="default 64,1024 (quick 64)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick 1)")
    parser.add_argument(
        "--layouts",
        default="unscanned,scanned",
        help="llava_jax decoder layer layouts to time (model.scan_layers False / True)",
    )
    parser.add_argument(
        "--torch-threads",
        default="0",
        help="torch thread counts to time transformers with (0: torch's default), e.g. 0,1; "
        "the ratio is against the fastest",
    )
    args = parser.parse_args()
    quick = args.quick
    new = args.new_tokens or (16 if quick else 64)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1" if quick else "1,8")).split(",")]
    lengths = [int(n) for n in (args.prompt_lengths or ("64" if quick else "64,1024")).split(",")]
    repeats = args.repeats or (1 if quick else 3)
    shape = MODELS["quick" if quick else "default"]

    import jax
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from llava_jax.convert import load_hf
    from llava_jax.inference import Engine, SamplingConfig
    from llava_jax.models.llava import to_unscanned_layout

    default_threads = torch.get_num_threads()
    thread_counts = [int(n) or default_threads for n in args.torch_threads.split(",")]

    with tempfile.TemporaryDirectory() as directory:
        hf_config, hf_model = build_model(directory, shape)
        config, params = load_hf(directory)
    # layout -> (engine, params): the same weights, scanned (stacked) or one tree per layer.
    sides = {}
    for layout in args.layouts.split(","):
        scanned = {"scanned": True, "unscanned": False}[layout]
        layout_config = dataclasses.replace(config, scan_layers=scanned)
        layout_params = params if scanned else to_unscanned_layout(params, config)
        layout_engine = Engine(layout_config)
        sides[layout] = (layout_engine, layout_engine.place(layout_params))
    engine = next(iter(sides.values()))[0]
    image_token = hf_config.image_token_index
    hf_model.generation_config.pad_token_id = 0
    hf_model.generation_config.eos_token_id = None
    sampling = SamplingConfig(max_new_tokens=new)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    matrices = weight_matrices(to_unscanned_layout(params, config))

    bandwidths = measure_bandwidth()
    bandwidth = max(bandwidths.values())
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        f"torch {torch.__version__} (default {default_threads} threads); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} (other processes slow both sides)"
    )
    print(
        f"model: LLaMA hidden {shape['hidden']} x {shape['layers']} layers, "
        f"{shape['heads']} heads / {shape['kv_heads']} KV heads, MLP {shape['intermediate']}, "
        f"vocab {VOCAB}, float32, {num_params / 1e6:.1f}M parameters with the vision tower; "
        f"{new} new tokens, greedy; median of {repeats}; compile time and warm-up excluded"
    )
    print(
        "memory bandwidth: "
        + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bandwidths.items())
        + f" -> roofline at {bandwidth / 1e9:.1f} GB/s"
    )

    class Stamps(StoppingCriteria):
        """Records when each new token exists (called once per token, never stops)."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def ours(layout, prompts, images) -> tuple[float, float]:
        engine, params = sides[layout]
        start = time.perf_counter()
        stream = engine.stream(params, prompts, images, sampling=sampling, chunk_size=new)
        next(stream)  # the prefill's token, on the host
        first = time.perf_counter()
        for _ in stream:
            pass
        end = time.perf_counter()
        assert all(len(t) == new for t in stream.result.tokens)
        return end - start, end - first

    def theirs(ids, mask, pixel_values) -> tuple[float, float]:
        stamps = Stamps()
        start = time.perf_counter()
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=pixel_values,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([stamps]),
            )
        end = time.perf_counter()
        assert out.shape[1] == ids.shape[1] + new and len(stamps.times) == new
        return end - start, stamps.times[-1] - stamps.times[0]

    print(
        f"{'batch':>5} {'prompt':>6} {'side':<24} {'tok/s':>8} {'ratio':>6} | "
        f"{'decode tok/s':>12} {'ratio':>6} {'of roofline':>11}"
    )
    for prompt_length in lengths:
        for batch_size in batch_sizes:
            prompts, images = make_batch(batch_size, prompt_length, image_token)
            ids = torch.tensor(np.stack(prompts).astype(np.int64))
            mask = torch.ones_like(ids)
            pixel_values = torch.tensor(images[:, 0, 0].transpose(0, 3, 1, 2))
            for layout in sides:  # compiles the prefill and the decode loop for this shape
                ours(layout, prompts, images)
            theirs(ids, mask, pixel_values)
            ours_runs, theirs_runs = {k: [] for k in sides}, {n: [] for n in thread_counts}
            for _ in range(repeats):  # interleaved, so a busy machine slows both alike
                for layout in sides:
                    ours_runs[layout].append(ours(layout, prompts, images))
                for n in thread_counts:
                    torch.set_num_threads(n)
                    theirs_runs[n].append(theirs(ids, mask, pixel_values))
            torch.set_num_threads(default_threads)

            theirs_rates = [rates(theirs_runs[n], batch_size, new) for n in thread_counts]
            theirs_total = max(r[0] for r in theirs_rates)
            theirs_decode = max(r[1] for r in theirs_rates)
            weights, kv = decode_bytes(
                params, config, batch_size, prompt_length, new, engine.cache_dtype.itemsize
            )
            roofline = batch_size * bandwidth / (weights + kv)
            lines = [("transformers", theirs_total, theirs_decode)]
            for layout in sides:
                lines.append((f"llava_jax {layout}", *rates(ours_runs[layout], batch_size, new)))
            ceilings = matvec_ceiling(matrices, batch_size)
            for side, total, decode in lines:
                print(
                    f"{batch_size:>5} {prompt_length:>6} {side:<24} {total:>8.1f} "
                    f"{total / theirs_total:>5.2f}x | {decode:>12.1f} "
                    f"{decode / theirs_decode:>5.2f}x {decode / roofline:>10.0%}"
                )
            for kernel, seconds in ceilings.items():  # weights only: no attention, no cache
                rate = batch_size / seconds
                print(
                    f"{batch_size:>5} {prompt_length:>6} {kernel + ' matvec chain':<24} "
                    f"{'':>8} {'':>6} | {rate:>12.1f} {rate / theirs_decode:>5.2f}x "
                    f"{rate / roofline:>10.0%}"
                )
            print(
                f"{batch_size:>5} {prompt_length:>6} {'memory roofline':<24} {'':>8} {'':>6} | "
                f"{roofline:>12.1f} {roofline / theirs_decode:>5.2f}x {1:>10.0%}"
            )
            print(
                f"{'':>12} decode step reads {weights / 1e6:.0f} MB of weights + "
                f"{kv / 1e6:.0f} MB of live KV cache",
                flush=True,
            )
    print(f"ratios against transformers at the fastest of {thread_counts} torch threads")
    print(
        "matvec chain: the decode step's weight products alone (every layer's projections and "
        "the LM head, each feeding the next), no attention or cache: what this CPU's matrix "
        "kernels reach on these weights"
    )


if __name__ == "__main__":
    main()
