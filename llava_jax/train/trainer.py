"""`train_and_evaluate(config, workdir)`: the whole run, as a library function.

Start-up checks -> tokenizer and data -> model config and initial weights -> sharded
state (or the newest checkpoint) -> the loop (progress bar, metrics to JSONL and
TensorBoard, async checkpoints, periodic evaluation, SIGTERM and NaN handling) -> final
evaluation (`eval.json`) and the loss curve (`loss.png`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from llava_jax import checkpoint as ckpt
from llava_jax.convert import load_hf, load_towers
from llava_jax.data import datasets
from llava_jax.data.config import DataConfig
from llava_jax.data.conversation import IMAGE_PLACEHOLDER
from llava_jax.data.pipeline import (
    length_table,
    make_train_iterator,
    to_global_batch,
    tokenizer_for,
    train_sequences,
)
from llava_jax.data.prompt import prompt_ids
from llava_jax.data.tokenizer import LoadedTokenizer
from llava_jax.hardware import chip_for, measured_matmul_peak
from llava_jax.models.attention import resolve as resolve_attention
from llava_jax.models.config import ModelConfig
from llava_jax.models.inputs import ImageGeometry
from llava_jax.sharding import data_parallel_size, device_bytes
from llava_jax.train.config import RunConfig, TrainConfig
from llava_jax.train.evaluator import Evaluator
from llava_jax.train.flops import pattern_trains, train_step_flops
from llava_jax.train.metrics import MetricsWriter, plot_losses
from llava_jax.train.optimizer import make_optimizer
from llava_jax.train.resume import check_resumable
from llava_jax.train.state import (
    TrainSetup,
    TrainState,
    base_abstract_params,
    init_train_state,
    make_setup,
)
from llava_jax.train.step import build_train_step, metrics_to_host

Params = dict[str, Any]


class TrainingStopped(RuntimeError):
    """The run cannot go on (NaN loss); the last good checkpoint is left intact."""


# --- start-up ---------------------------------------------------------------------------------


def check_workdir(workdir: str) -> None:
    """The workdir and its checkpoint folder can be written (a save into a read-only folder
    would otherwise fail late, in the background)."""
    checkpoints = os.path.join(workdir, ckpt.CHECKPOINT_DIR)
    for folder in (workdir, checkpoints):
        what = "workdir" if folder == workdir else "checkpoint folder"
        try:
            if folder == workdir:
                os.makedirs(folder, exist_ok=True)
            elif not os.path.isdir(folder):
                continue
            probe = os.path.join(folder, f".write_probe_{jax.process_index()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as err:
            raise PermissionError(f"{what} {folder} cannot be written: {err}") from None


def check_room_for_an_answer(
    data: DataConfig, model: ModelConfig, tokenizer: LoadedTokenizer
) -> None:
    """`data.max_len` holds a one-image prompt of the template and at least one answer
    token; otherwise every record would be dropped as too long."""
    turns = [{"from": "human", "value": IMAGE_PLACEHOLDER}]
    template = data.conversation_template
    image_tokens = ImageGeometry.of(model).fewest_tokens
    needed = len(prompt_ids(turns, template, tokenizer, image_tokens)) + 2
    if data.max_len < needed:
        raise ValueError(
            f"config.data.max_len={data.max_len} leaves no room for an answer: one image is "
            f"{image_tokens} tokens, and the {data.template!r} template's shortest "
            f"prompt with an image plus one answer token and its end is {needed} tokens"
        )


def _follow_tokenizer(model_config: ModelConfig, tokenizer: LoadedTokenizer, pin: bool):
    """The model's vocabulary grows to the tokenizer's; the image and pad ids follow it."""
    text = model_config.text
    vocab = text.vocab_size if pin else max(text.vocab_size, tokenizer.vocab_size)
    if tokenizer.vocab_size > vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but config.model.text.vocab_size "
            f"is pinned to {vocab}"
        )
    eos = tokenizer.tokenizer.eos_token_id
    text = dataclasses.replace(
        text,
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=text.eos_token_id if eos is None else int(eos),
    )
    return dataclasses.replace(model_config, text=text, image_token_id=tokenizer.image_token_id)


def resize_vocabulary(params: Params, vocab_size: int) -> Params:
    """Grow the embedding (and untied LM head) to `vocab_size` rows, new rows set to the
    mean of the old ones (as transformers' `resize_token_embeddings` with mean init)."""
    llm = dict(params["llm"])
    embedding = np.asarray(llm["embed"]["embedding"])
    extra = vocab_size - embedding.shape[0]
    if extra <= 0:
        return params
    mean_row = embedding.mean(axis=0, keepdims=True)
    llm["embed"] = {"embedding": np.concatenate([embedding, np.repeat(mean_row, extra, 0)])}
    if "lm_head" in llm:
        kernel = np.asarray(llm["lm_head"]["kernel"])
        mean_col = kernel.mean(axis=1, keepdims=True)
        llm["lm_head"] = {"kernel": np.concatenate([kernel, np.repeat(mean_col, extra, 1)], 1)}
    return {**params, "llm": llm}


def checkpoint_model(source: str) -> tuple[ModelConfig, Params | None]:
    """The model config of `config.init.checkpoint_path` (a params checkpoint or a training
    workdir), with the params checkpoint's parameters on the host (a workdir's are restored
    later, onto the mesh: None)."""
    if os.path.exists(os.path.join(source, ckpt.MODEL_CONFIG_FILE)):
        model_config, params = ckpt.load_params(source)
        return model_config, jax.tree.map(np.asarray, params)
    _, run_config = ckpt.read_run_config(source)
    return ModelConfig.from_section(run_config["model"], f"{source}: the run config's model"), None


def initial_model(run: RunConfig, tokenizer: LoadedTokenizer) -> tuple[ModelConfig, Params | None]:
    """The model config and host parameters the run starts from (None: init from scratch
    or, for `checkpoint`, restored later onto the mesh)."""
    init, model = run.init, run.model
    pin = not init.vocab_follows_tokenizer
    if init.mode == "scratch":
        return _follow_tokenizer(model, tokenizer, pin), None
    if init.mode == "hf":
        model_config, params = load_hf(init.hf_path, **model.numerics())
    elif init.mode == "towers":
        model_config, params = load_towers(
            init.vision_path,
            init.text_path,
            rng=jax.random.key(init.seed),
            projector=model.projector,
            projector_bias=model.projector_bias,
            projector_act=model.projector_act,
            vision_feature_layer=model.vision_feature_layer,
            vision_feature_select_strategy=model.vision_feature_select_strategy,
            image_grid_pinpoints=model.image_grid_pinpoints,  # NeXT: a fresh image_newline
            vision_aspect_ratio=model.vision_aspect_ratio,  # OneVision
            video_token_id=model.video_token_id,
            **model.numerics(),
        )
    else:  # checkpoint: the architecture of the run it continues, numerics of this one
        source = init.checkpoint_path
        model_config, params = checkpoint_model(source)
        model_config = model_config.replace(**model.numerics())
        if model.image_grid_pinpoints:  # this run's images (a 1.5 model gets a fresh newline)
            model_config = model_config.replace(
                image_grid_pinpoints=model.image_grid_pinpoints,
                vision_aspect_ratio=model.vision_aspect_ratio,
                video_token_id=model.video_token_id,
            )
        if model_config.lora.enabled:
            raise ValueError(
                f"config.init.checkpoint_path={source} holds a LoRA model: merge its adapters "
                "first (python -m llava_jax.convert merge-lora), or resume that run in its own "
                "workdir"
            )
    # This run's adapters (none, or new ones on the base it starts from).
    model_config = model_config.replace(lora=model.lora)
    model_config = _follow_tokenizer(model_config, tokenizer, pin)
    if params is not None:
        params = resize_vocabulary(params, model_config.text.vocab_size)
    return model_config, params


def _total_steps(
    train: TrainConfig, data: DataConfig, geometry: ImageGeometry, tokenizer: LoadedTokenizer
) -> int:
    if train.num_steps:
        return int(train.num_steps)
    rows = train_sequences(data, geometry, tokenizer, train.num_epochs)  # records, or rows
    return max(1, math.floor(rows / data.global_batch_size))


def check_packing_attention(model: ModelConfig, data: DataConfig, mesh: Any) -> None:
    """Packed rows need attention that keeps to each segment; cudnn knows only lengths."""
    if not data.packing:
        return
    platform = mesh.devices.flat[0].platform
    if resolve_attention(model.attention, platform, model.dtype) == "cudnn":
        raise ValueError(
            f"config.data.packing=true needs attention that honours segments, and "
            f"config.model.attention={model.attention!r} runs cudnn here, which takes only "
            "each row's length; set config.model.attention to dot_product, chunked or xla "
            "(or splash on TPU)"
        )


# --- the run ----------------------------------------------------------------------------------


class StopNow(KeyboardInterrupt):
    """A second stop signal: leave at once, without saving."""


class _StopSignals:
    """SIGTERM (TPU preemption) and SIGINT (Ctrl-C) are noted here and acted on at the next
    step boundary (save, then exit); a second one leaves at once (`StopNow`)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading_is_main():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            raise StopNow(f"{name} received again: leaving at once, without saving")
        self.requested = True
        logging.warning(
            "%s received: saving at the next step boundary, then exiting (again: leave at once)",
            name,
        )

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def agreed(self) -> bool:
        """All processes stop together if any of them was signalled."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def peak_flops_per_device(mesh: Any, dtype: str) -> float:
    """The FLOP/s MFU is held against: the chip's dense bf16 peak from the table, or, for a
    device the table does not know (a CPU), a matmul in the model's dtype measured now."""
    peak = chip_for(mesh.devices.flat[0]).peak_flops
    return peak if peak else measured_matmul_peak(dtype)


def make_run_setup(
    run: RunConfig, model_config: ModelConfig, total_steps: int, mesh: Any = None
) -> tuple[TrainSetup, Any]:
    """(setup, schedule) for `run` on `mesh` (default: `run.mesh`)."""
    if mesh is None:
        mesh = run.mesh.make_mesh()
    optimizer, schedule = make_optimizer(run.optimizer, total_steps)
    setup = make_setup(model_config, optimizer, run.train.train_pattern, mesh, run.mesh.rules)
    return setup, schedule


def train_and_evaluate(config: ml_collections.ConfigDict | RunConfig, workdir: str) -> dict:
    """Train as `config` says, in `workdir`, resuming from its newest checkpoint; then
    evaluate. Returns a summary: final step, whether it stopped early, eval results."""
    return Run(config, workdir).execute()


class Run:
    """One invocation of the trainer: everything fixed at start-up, then `execute()`."""

    def __init__(self, config: ml_collections.ConfigDict | RunConfig, workdir: str):
        if not isinstance(config, RunConfig):
            config = RunConfig.from_config(config)
        config.check_sources()
        check_workdir(workdir)
        self.config = config
        self.workdir = workdir
        # Process 0 builds what is shared on disk (synthetic tokenizer, prepared data) before
        # the others read it.
        if jax.process_index() == 0:
            self._load_tokenizer_and_model()
            train_split = datasets.open_split(self.data_config, "train")  # prepares it
            if self.data_config.packing or self.data_config.group_by_modality_length:
                length_table(self.data_config, self.geometry, self.tokenizer, train_split, "train")
        multihost_utils.sync_global_devices("data prepared")
        if jax.process_index() != 0:
            self._load_tokenizer_and_model()
        check_room_for_an_answer(self.data_config, self.model_config, self.tokenizer)
        self.total_steps = _total_steps(
            config.train, self.data_config, self.geometry, self.tokenizer
        )
        self.setup, schedule = make_run_setup(config, self.model_config, self.total_steps)
        check_packing_attention(self.model_config, self.data_config, self.setup.mesh)
        train = config.train
        evaluates = config.eval.num_records > 0 or config.eval.loss_batches > 0
        if evaluates and config.eval.batch_size % data_parallel_size(self.setup.mesh):
            raise ValueError(
                f"config.eval.batch_size={config.eval.batch_size} is not a multiple of the "
                f"data-parallel size {data_parallel_size(self.setup.mesh)}"
            )
        accumulate = train.accumulation_steps_for(
            self.data_config.global_batch_size, data_parallel_size(self.setup.mesh)
        )
        self.train_step = build_train_step(
            train, self.setup, schedule, self.data_config.global_batch_size, accumulate
        )
        data = self.data_config
        self.flops_per_step = train_step_flops(
            self.model_config,
            batch=data.global_batch_size,
            length=data.max_len,
            # LLaVA-NeXT: every tile goes through the vision tower as an image
            images=data.image_slots * self.geometry.max_tiles,
            trainable=pattern_trains(train.train_pattern),
        )
        self.peak_flops = peak_flops_per_device(self.setup.mesh, self.model_config.dtype)
        self.evaluator: Evaluator | None = None
        # What was run: the model as built and the data settings the model dictated.
        self.run_config = dataclasses.replace(
            config, model=self.model_config, data=self.data_config
        ).to_dict()
        # Before anything in the workdir is written: its checkpoints must be this run's.
        check_resumable(
            workdir,
            self.run_config,
            self.tokenizer,
            self.setup.abstract_state,
            accept_new_tokenizer=config.init.accept_new_tokenizer,
        )

    def _load_tokenizer_and_model(self) -> None:
        self.tokenizer = tokenizer_for(self.config.data)
        self.model_config, self.host_params = initial_model(self.config, self.tokenizer)
        self.data_config = self.config.data
        self.geometry = ImageGeometry.of(self.model_config)  # what the data reads of the model

    def _say(self, message: str) -> None:
        """One line for the person at the terminal (process 0 only)."""
        if jax.process_index() == 0:
            print(f"llava_jax: {message}", file=sys.stderr, flush=True)

    def startup_summary(self) -> str:
        """Model size, mesh, data and workdir, in a few lines."""
        shapes = self.setup.abstract_state.params
        sizes = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in shapes.items()}
        trainable = sum(
            x.size
            for x, m in zip(jax.tree.leaves(shapes), jax.tree.leaves(self.setup.mask), strict=True)
            if m
        )
        towers = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sizes.items())
        lora = self.model_config.lora
        adapters = f" + LoRA rank {lora.rank}" if lora.enabled else ""
        state = self.setup.abstract_state
        memory = (
            f"per device: params {device_bytes(state.params) / 2**20:.1f} MiB, "
            f"optimizer {device_bytes(state.opt_state) / 2**20:.1f} MiB"
        )
        mesh = self.setup.mesh
        data = self.data_config
        return "\n".join(
            [
                f"model: {sum(sizes.values()) / 1e6:.1f}M parameters ({towers}); "
                f"{trainable / 1e6:.1f}M train ({self.config.train.train_pattern}{adapters}); "
                f"{self.model_config.dtype} compute; {memory}",
                f"mesh: {' x '.join(f'{k}={v}' for k, v in mesh.shape.items())} over "
                f"{mesh.size} {mesh.devices.flat[0].platform} devices, "
                f"{jax.process_count()} process(es)",
                f"data: {datasets.describe(data)}",
                f"batches: template {data.template} (version {data.template_version}), "
                f"batch "
                f"{data.global_batch_size} x {data.max_len} tokens, {self.total_steps} steps"
                + (
                    ""
                    if datasets.has_split(data, "test")
                    else "; no held-out split (config.data.test_json_path), so no evaluation"
                ),
                f"workdir: {self.workdir} (log: {os.path.join(self.workdir, 'train.log')})",
            ]
        )

    def execute(self) -> dict[str, Any]:
        for line in self.startup_summary().splitlines():
            self._say(line)
        self.iterator = make_train_iterator(self.data_config, self.geometry, self.tokenizer)
        self.checkpoints = ckpt.TrainCheckpoints(
            self.workdir, keep=self.config.train.keep_checkpoints
        )
        self.writer = MetricsWriter(self.workdir, enabled=jax.process_index() == 0)
        summary: dict[str, Any] = {"preempted": False}
        try:
            with _StopSignals() as stop_signals:
                state, start_step = self._restore_or_init()
                state, step = self._loop(state, start_step, stop_signals)
                summary["step"] = step
                if step < self.total_steps:
                    summary["preempted"] = True  # by a signal or stop_at_step: run again to go on
                    return summary
                if step not in self.checkpoints.steps():
                    self._save(step, state)
                self.checkpoints.wait()
                summary["eval"] = self._evaluate(state, step, final=True)
        finally:
            self.checkpoints.close()
            self.writer.close()
            self.iterator.close()
        if jax.process_index() == 0:
            plot_losses(
                os.path.join(self.workdir, "metrics.jsonl"), os.path.join(self.workdir, "loss.png")
            )
        return summary

    def _restore_or_init(self) -> tuple[TrainState, int]:
        restored = self.checkpoints.restore_latest(self.setup.abstract_state, self.iterator)
        if restored is not None:
            step, state = restored
            self._say(f"Resumed from {self.checkpoints.directory} at step {step}")
            if self.config.init.accept_new_tokenizer and jax.process_index() == 0:
                # the user chose the new tokenizer: inference must read it, not the old one
                self.tokenizer.tokenizer.save_pretrained(os.path.join(self.workdir, "tokenizer"))
            return state, step
        rng = jax.random.key(self.config.init.seed)
        params = self.host_params
        if self.config.init.mode == "checkpoint" and params is None:
            source = self.config.init.checkpoint_path
            source_model, _ = checkpoint_model(source)  # a workdir: no parameters read yet
            params = ckpt.restore_params(source, base_abstract_params(self.setup, source_model))
        if jax.process_index() == 0:
            _save_tokenizer_and_config(self.workdir, self.tokenizer, self.run_config)
        return init_train_state(self.setup, rng, params), 0

    def _loop(self, state: TrainState, step: int, stop_signals: _StopSignals):
        from tqdm import tqdm

        train = self.config.train
        bar = tqdm(
            total=self.total_steps,
            initial=step,
            disable=jax.process_index() != 0,
            unit="step",
            dynamic_ncols=True,
        )
        window_start, window_tokens, window_padding = time.perf_counter(), 0.0, 0.0
        window_steps, window_examples = 0, 0.0
        try:
            while step < self.total_steps:
                stop_here = train.stop_at_step is not None and step >= train.stop_at_step
                if stop_here or stop_signals.agreed():
                    if step not in self.checkpoints.steps():
                        self._save(step, state)
                    self.checkpoints.wait()
                    logging.warning(
                        "Stopped at step %d; saved in %s", step, self.checkpoints.directory
                    )
                    return state, step
                batch = to_global_batch(next(self.iterator), self.setup.mesh)
                profile = train.profile_steps
                if profile and step + 1 == profile[0]:
                    jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
                state, metrics = self.train_step(state, batch)
                step += 1
                self.checkpoints.check_saves()  # a failed background save, reported now
                if profile and step == profile[1]:
                    jax.block_until_ready(metrics)
                    jax.profiler.stop_trace()
                host = metrics_to_host(metrics)
                if not math.isfinite(host["loss"]) or not math.isfinite(host["grad_norm"]):
                    raise TrainingStopped(
                        f"loss is {host['loss']} (grad norm {host['grad_norm']}) at step "
                        f"{step}; stopping. {self._last_good()}"
                    )
                window_tokens += host["tokens"]
                window_padding += host["padding_fraction"]
                window_examples += host["examples"]
                window_steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{host['loss']:.4f}")
                if step % train.log_every == 0 or step == self.total_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    flops = self.flops_per_step * window_steps / elapsed / self.setup.mesh.size
                    self.writer.write(
                        step,
                        {
                            "loss": host["loss"],
                            "learning_rate": host["learning_rate"],
                            "grad_norm": host["grad_norm"],
                            "supervised_tokens": host["supervised_tokens"],
                            "real_tokens_per_second": window_tokens / elapsed,
                            "padding_fraction": window_padding / window_steps,
                            "tflops_per_device": flops / 1e12,
                            "mfu": flops / self.peak_flops,
                            "examples_seen": step * self.data_config.global_batch_size,
                            "conversations_per_step": window_examples / window_steps,
                            "dropped_examples": sum(self.iterator.dropped.values()),
                        },
                    )
                    window_start, window_tokens, window_padding = time.perf_counter(), 0.0, 0.0
                    window_steps, window_examples = 0, 0.0
                if step % train.checkpoint_every == 0 or step == self.total_steps:
                    self._save(step, state)
                if train.eval_every and step % train.eval_every == 0 and step < self.total_steps:
                    self._evaluate(state, step)
        finally:
            bar.close()
        return state, step

    def _last_good(self) -> str:
        self.checkpoints.wait()
        steps = self.checkpoints.steps()
        where = os.path.join(self.checkpoints.directory, str(steps[-1])) if steps else "none"
        return f"The last good checkpoint is {where}"

    def _save(self, step: int, state: TrainState) -> None:
        """Save, unless an update made a parameter NaN or Inf (then stop, saving nothing)."""
        finite = _all_finite(state.params)
        if not bool(jax.device_get(finite.addressable_shards[0].data)):
            raise TrainingStopped(
                f"parameters are not finite after step {step}; stopping. {self._last_good()}"
            )
        self.checkpoints.save(step, state, self.iterator, self.run_config)

    def _evaluate(self, state: TrainState, step: int, final: bool = False) -> dict[str, Any]:
        """Held-out loss, and answer accuracy by greedy decoding (also with blank images);
        nothing (an empty dict) when the data has no held-out split."""
        if not datasets.has_split(self.data_config, "test"):
            return {}
        if self.evaluator is None:  # built once: its compiled programs serve every evaluation
            self.evaluator = Evaluator(
                self.setup,
                self.tokenizer,
                self.data_config,
                self.config.eval,
                self.config.train.loss_chunk_size,
            )
        results = self.evaluator(state.params)
        self.writer.write(
            step, {f"eval/{k}": v for k, v in results.items() if isinstance(v, int | float)}
        )
        if final and jax.process_index() == 0:
            with open(os.path.join(self.workdir, "eval.json"), "w") as f:
                json.dump({"step": step, **results}, f, indent=2)
        return results


@jax.jit
def _all_finite(params: Params) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def _save_tokenizer_and_config(workdir: str, tokenizer: LoadedTokenizer, run_config: dict):
    """What inference needs beside the checkpoints: the tokenizer and the resolved config."""
    tokenizer.tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(run_config, f, indent=2)
