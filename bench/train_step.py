"""Benchmark: llava_jax's jitted train step beside transformers + torch AdamW.

Same process, same weights (the transformers model is saved and read back by `load_hf`),
float32, the same batch, every tower trainable, AdamW with clipping at 1.0 on both sides.
Rounds alternate (JAX, torch, JAX, torch, …) so load on the machine hits both alike; the
figure is the median tokens/s of each side and their ratio. Compile time and each side's
first step are excluded. llava_jax runs with its defaults (`model.attention=auto`, the LM
head and loss fused in chunks of 128, scanned layers) unless flags say otherwise.

Default model ("small"): CLIP ViT at 224 px, patch 16 (196 image tokens), width 384,
6 layers, 6 heads, MLP 1536; LLaMA width 512, 8 layers, 8 heads, 4 KV heads, MLP 1408,
vocabulary 32064; batch 4 of length 512, answers on the last 312 tokens.

    python bench/train_step.py [--rounds 5] [--steps 2] [--attention auto]
                               [--remat none] [--loss-chunk 128] [--scan-layers 1]
                               [--profile]

llava_jax's MFU is printed too: the step's FLOPs (llava_jax.train.flops) against the chip's
peak (llava_jax.hardware; on a CPU, a matmul measured in the compute dtype). On a GPU, the
~1B-decoder LLaVA in bf16 with cuDNN attention, llava_jax alone:

    python bench/train_step.py --model 1b --dtype bfloat16 --attention cudnn \
        --batch 8 --length 2048 --answer 1400 --remat minimal --torch 0

`--profile` also runs one step of each side under its own profiler (JAX's, torch's) and
prints the time per category: vision (tower and projector), attention (the decoder's
attention core), dense (the decoder's projections and MLP), LM head + loss, optimizer
(with clipping), other (norms, RoPE, residuals, embeddings, copies).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import os
import platform
import re
import statistics
import sys
import tempfile
import time

# torch's OpenMP threads otherwise busy-wait between its ops, and in one process that spin
# takes CPU time from JAX's turn; passive waiting costs torch nothing measurable here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SMALL = dict(
    vision=dict(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
        image_size=224,
        patch_size=16,
    ),
    text=dict(
        vocab_size=32064,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
)
# A ~1.1B-parameter decoder (TinyLlama's shape) behind a CLIP ViT-L/14-336: the GPU run.
ONE_B = dict(
    vision=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    ),
    text=dict(
        vocab_size=32064,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    ),
)
MODELS = {"small": SMALL, "1b": ONE_B}
IMAGE_TOKEN = 32000
CATEGORIES = ("vision", "attention", "dense", "lm head + loss", "optimizer", "other")


def build_hf_model(directory: str, sizes: dict, seed: int = 0):
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**sizes["vision"]),
        text_config=LlamaConfig(**sizes["text"]),
        image_token_index=IMAGE_TOKEN,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(directory)
    return model


def make_batch(
    sizes: dict, batch_size: int, length: int, answer_length: int, seed: int = 0
) -> dict:
    """bos, the image tokens, prompt text, then `answer_length` supervised answer tokens."""
    vision = sizes["vision"]
    per_image = (vision["image_size"] // vision["patch_size"]) ** 2
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, IMAGE_TOKEN, (batch_size, length)).astype(np.int32)
    input_ids[:, 0] = 1
    input_ids[:, 1 : 1 + per_image] = IMAGE_TOKEN
    loss_mask = np.zeros((batch_size, length), np.float32)
    loss_mask[:, length - answer_length :] = 1.0
    size = vision["image_size"]
    return {
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "attention_mask": np.ones((batch_size, length), np.int32),
        "images": rng.standard_normal((batch_size, 1, 1, size, size, 3)).astype(np.float32),
        "image_mask": np.ones((batch_size, 1), bool),
    }


# --- the two sides ----------------------------------------------------------------------------


class JaxSide:
    def __init__(self, directory: str, batch: dict, args):
        import jax

        from llava_jax.convert import load_hf
        from llava_jax.models.inputs import Batch
        from llava_jax.sharding import DEFAULT_RULES, batch_sharding, make_mesh, place
        from llava_jax.train.optimizer import OptimizerConfig, make_optimizer
        from llava_jax.train.state import init_train_state, make_setup
        from llava_jax.train.step import jit_train_step, make_train_step

        model_config, params = load_hf(
            directory,
            dtype=args.dtype,
            param_dtype="float32",
            scan_layers=bool(args.scan_layers),
            remat_policy=args.remat,
        )
        model_config = dataclasses.replace(model_config, attention=args.attention)
        mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
        optimizer, schedule = make_optimizer(
            OptimizerConfig(learning_rate=1e-5, warmup_ratio=0.0), total_steps=1000
        )
        self.setup = make_setup(model_config, optimizer, ".*", mesh, DEFAULT_RULES)
        self.model_config = model_config
        self.state = init_train_state(self.setup, jax.random.key(0), params)
        step_fn = make_train_step(self.setup, schedule, loss_chunk_size=args.loss_chunk)
        self.step = jit_train_step(self.setup, step_fn, len(batch["input_ids"]))
        self.batch = Batch.from_arrays(place(batch, {k: batch_sharding(mesh) for k in batch}))

    def run(self, steps: int) -> float:
        import jax

        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics["loss"])
        return float(metrics["loss"])

    def profile(self) -> dict[str, float]:
        """Share per category of one step, from a JAX profiler trace: each XLA op's time,
        named by the scope of the code it came from (as the compiled HLO records it)."""
        import jax
        from jax.profiler import ProfileData

        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.batch)
        with jax.set_mesh(self.setup.mesh):
            hlo = self.step.jitted.lower(self.setup.abstract_state, shapes).compile().as_text()
        scopes = {}
        for line in hlo.splitlines():
            match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
            if match:
                scopes[match.group(1)] = match.group(2)
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                self.run(1)
            (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
            data = ProfileData.from_file(path)
        spans = []
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    op = dict(event.stats).get("hlo_op")
                    # Loops and conditionals contain the ops that run in them.
                    if op and not op.startswith(("while", "cond", "call")):
                        category = _jax_category(scopes.get(op, ""))
                        spans.append((event.start_ns, event.start_ns + event.duration_ns, category))
        return _shares(_wall_time_by_category(spans))


def _wall_time_by_category(spans: list[tuple[float, float, str]]) -> dict[str, float]:
    """Wall time per category when ops overlap (XLA runs independent ops on several
    threads): each instant is shared equally among the ops running then."""
    edges = sorted({t for start, end, _ in spans for t in (start, end)})
    starts = collections.defaultdict(list)
    ends = collections.defaultdict(list)
    for start, end, category in spans:
        starts[start].append(category)
        ends[end].append(category)
    running: collections.Counter = collections.Counter()
    times: collections.Counter = collections.Counter()
    for left, right in zip(edges, edges[1:], strict=False):
        for category in ends[left]:
            running[category] -= 1
        for category in starts[left]:
            running[category] += 1
        count = sum(running.values())
        if count:
            for category, n in running.items():
                times[category] += (right - left) * n / count
    return times


def _jax_category(scope: str) -> str:
    if "/vision/" in scope:
        return "vision"
    if "lm_head_loss" in scope:
        return "lm head + loss"
    if "/optimizer/" in scope:
        return "optimizer"
    if "/attention/" in scope:
        return "attention"
    if re.search(r"/layers/(attn/)?(query|key|value|out|gate|up|down)/", scope):
        return "dense"
    return "other"


def _shares(times: dict[str, float]) -> dict[str, float]:
    """Each category's share of the summed op time (ops overlap on several threads, and a
    profiler slows a step down, so shares, not the sums, carry over to an unprofiled step)."""
    total = sum(times.values()) or 1.0
    return {name: times.get(name, 0.0) / total for name in CATEGORIES}


class TorchSide:
    def __init__(self, model, batch: dict):
        import torch

        self.model = model.train()
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        )
        labels = np.where(batch["loss_mask"] > 0, batch["input_ids"], -100)
        self.inputs = dict(
            input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
            pixel_values=torch.tensor(batch["images"][:, 0, 0].transpose(0, 3, 1, 2)),
            labels=torch.tensor(labels, dtype=torch.long),
        )

    def run(self, steps: int) -> float:
        import torch

        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.model(**self.inputs).loss
            loss.backward()
            with torch.profiler.record_function("optimizer"):
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
        return float(loss.detach())

    def profile(self) -> dict[str, float]:
        """Share per category of one step, from torch's profiler: each op's own time,
        named by the module it ran in (labels pushed by forward hooks) or by its kind; a
        backward op takes the category of the forward op that made it."""
        from torch.profiler import ProfilerActivity, profile, record_function

        modules = {
            "vision": [self.model.model.vision_tower, self.model.model.multi_modal_projector],
            "lm head + loss": [self.model.lm_head],
        }
        handles, open_ranges = [], {}
        for label, mods in modules.items():
            for module in mods:

                def enter(module, args, label=label):
                    open_ranges[id(module)] = record_function(label)
                    open_ranges[id(module)].__enter__()

                def leave(module, args, output):
                    open_ranges.pop(id(module)).__exit__(None, None, None)

                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave))
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                self.run(1)
        finally:
            for handle in handles:
                handle.remove()
        events = list(prof.events())
        forward_category = {}
        for event in events:
            if event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
                forward_category.setdefault(event.sequence_nr, _torch_forward_category(event))
        own_time = collections.Counter()
        for event in events:
            category = _torch_category(event, forward_category)
            own_time[category] += event.self_cpu_time_total
        return _shares(own_time)


def _ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def _torch_forward_category(event) -> str:
    names = [e.name for e in _ancestors(event)]
    for label in ("optimizer", "vision", "lm head + loss"):
        if label in names:
            return label
    joined = " ".join(names)
    if "scaled_dot_product" in joined:
        return "attention"
    if re.search(r"cross_entropy|log_softmax|nll_loss", joined):
        return "lm head + loss"
    if re.search(r"aten::(linear|addmm|mm|matmul)\b", joined):
        return "dense"
    return "other"


def _torch_category(event, forward_category: dict[int, str]) -> str:
    for ancestor in _ancestors(event):
        if ancestor.name.startswith("autograd::engine::evaluate_function"):
            return forward_category.get(ancestor.sequence_nr, "other")
    return _torch_forward_category(event)


# --- the benchmark ----------------------------------------------------------------------------


def timed(run, steps: int) -> float:
    start = time.perf_counter()
    run(steps)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--text-layers", type=int, default=0, help="0: the preset's")
    parser.add_argument("--dtype", default="float32", help="llava_jax compute dtype")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per round and side")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--answer", type=int, default=312)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--loss-chunk", type=int, default=128)
    parser.add_argument("--scan-layers", type=int, default=1)
    parser.add_argument("--torch", type=int, default=1, help="0: llava_jax alone (MFU only)")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    import jax
    import torch

    from llava_jax.hardware import chip_for, measured_matmul_peak
    from llava_jax.train.flops import train_step_flops

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sizes = {k: dict(v) for k, v in MODELS[args.model].items()}
    if args.text_layers:
        sizes["text"]["num_hidden_layers"] = args.text_layers
    batch = make_batch(sizes, args.batch, args.length, args.answer)
    with tempfile.TemporaryDirectory() as directory:
        model = build_hf_model(directory, sizes)
        ours = JaxSide(directory, batch, args)
    theirs = TorchSide(model, batch) if args.torch else None
    if theirs is None:
        del model

    start = time.perf_counter()
    first = f"first step: llava_jax loss {ours.run(1):.5f} "
    first += f"(compile included: {time.perf_counter() - start:.1f} s)"
    if theirs is not None:
        first += f", transformers loss {theirs.run(1):.5f}"
    print(first)
    tokens = args.batch * args.length * args.steps
    jax_rates, torch_rates = [], []
    for _ in range(args.rounds):
        jax_rates.append(tokens / timed(ours.run, args.steps))
        if theirs is not None:
            torch_rates.append(tokens / timed(theirs.run, args.steps))
    jax_rate = statistics.median(jax_rates)
    device = jax.devices()[0]
    print(
        f"{platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} on "
        f"{device.device_kind} ({args.model}, {args.dtype}, attention {args.attention}, "
        f"loss chunk {args.loss_chunk}, scan {bool(args.scan_layers)}, remat {args.remat}); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}"
    )
    print(f"llava_jax     {jax_rate:8.1f} tokens/s  (rounds: {[round(r) for r in jax_rates]})")
    flops = train_step_flops(
        ours.model_config,
        batch=args.batch,
        length=args.length,
        images=1,
        trainable=lambda path: True,
    )
    peak = chip_for(device).peak_flops or measured_matmul_peak(args.dtype)
    achieved = flops * jax_rate / (args.batch * args.length)
    print(
        f"              {achieved / 1e12:8.3f} TFLOP/s of {peak / 1e12:.3f} peak: "
        f"MFU {achieved / peak:.1%} ({flops / 1e12:.3f} TFLOP per step)"
    )
    if theirs is None:
        return
    torch_rate = statistics.median(torch_rates)
    print(f"transformers  {torch_rate:8.1f} tokens/s  (rounds: {[round(r) for r in torch_rates]})")
    print(f"ratio         {jax_rate / torch_rate:8.2f}x")
    if args.profile:
        # Each side's step time (from the rounds above), split by its profile's shares.
        jax_step = args.batch * args.length / jax_rate
        torch_step = args.batch * args.length / torch_rate
        ours_profile, theirs_profile = ours.profile(), theirs.profile()
        print(f"\nseconds per step (profile shares)  {'llava_jax':>10s} {'transformers':>13s}")
        for name in CATEGORIES:
            print(
                f"  {name:32s} {jax_step * ours_profile[name]:10.3f} "
                f"{torch_step * theirs_profile[name]:13.3f}"
            )
        print(f"  {'step':32s} {jax_step:10.3f} {torch_step:13.3f}")


if __name__ == "__main__":
    main()
