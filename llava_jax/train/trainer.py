"""`train_and_evaluate(config, workdir)`: the whole run, as a library function.

Start-up checks -> tokenizer and data -> model config and initial weights -> sharded
state (or the newest checkpoint) -> the loop (progress bar, metrics to JSONL and
TensorBoard, async checkpoints, periodic evaluation, SIGTERM and NaN handling) -> final
evaluation (`eval.json`) and the loss curve (`loss.png`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from llava_jax import checkpoint as ckpt
from llava_jax.config import check_config, micro_batches, model_config_from
from llava_jax.convert import load_hf, load_towers
from llava_jax.data import datasets
from llava_jax.data.pipeline import make_train_iterator, to_global_batch, tokenizer_for
from llava_jax.data.tokenizer import LoadedTokenizer
from llava_jax.hardware import chip_for, measured_matmul_peak
from llava_jax.models.config import ModelConfig
from llava_jax.sharding import data_parallel_size, make_mesh
from llava_jax.train.flops import pattern_trains, train_step_flops
from llava_jax.train.metrics import MetricsWriter, plot_losses
from llava_jax.train.optimizer import make_optimizer
from llava_jax.train.state import TrainSetup, TrainState, init_train_state, make_setup
from llava_jax.train.step import jit_train_step, make_eval_step, make_train_step, metrics_to_host

Params = dict[str, Any]


class TrainingStopped(RuntimeError):
    """The run cannot go on (NaN loss); the last good checkpoint is left intact."""


# --- start-up ---------------------------------------------------------------------------------


def check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise PermissionError(f"workdir {workdir} cannot be written: {err}") from None


def _numerics(config: ml_collections.ConfigDict) -> dict[str, Any]:
    model = config.model
    return dict(
        dtype=model.dtype,
        param_dtype=model.param_dtype,
        scan_layers=model.scan_layers,
        remat_policy=model.remat_policy,
        attention=model.attention,
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


def initial_model(
    config: ml_collections.ConfigDict, tokenizer: LoadedTokenizer
) -> tuple[ModelConfig, Params | None]:
    """The model config and host parameters the run starts from (None: init from scratch
    or, for `checkpoint`, restored later onto the mesh)."""
    mode, pin = config.init.mode, not config.model.vocab_follows_tokenizer
    if mode == "scratch":
        return _follow_tokenizer(model_config_from(config), tokenizer, pin), None
    if mode == "hf":
        model_config, params = load_hf(config.init.hf_path, **_numerics(config))
    elif mode == "towers":
        model = config.model
        model_config, params = load_towers(
            config.init.vision_path,
            config.init.text_path,
            rng=jax.random.key(config.init.seed),
            projector=model.projector,
            projector_bias=model.projector_bias,
            projector_act=model.projector_act,
            vision_feature_layer=model.vision_feature_layer,
            vision_feature_select_strategy=model.vision_feature_select_strategy,
            **_numerics(config),
        )
    else:  # checkpoint: the architecture of the run it continues, numerics of this one
        source = config.init.checkpoint_path
        if os.path.exists(os.path.join(source, ckpt.MODEL_CONFIG_FILE)):
            model_config, params = ckpt.load_params(source)
            params = jax.tree.map(np.asarray, params)
        else:
            _, run_config = ckpt.read_run_config(source)
            values = dict(run_config["model"])
            values.pop("vocab_follows_tokenizer", None)
            model_config, params = ModelConfig.from_dict(values), None
        model_config = dataclasses.replace(model_config, **_numerics(config))
    model_config = _follow_tokenizer(model_config, tokenizer, pin)
    if params is not None:
        params = resize_vocabulary(params, model_config.text.vocab_size)
    return model_config, params


def _data_config(config: ml_collections.ConfigDict, model_config: ModelConfig):
    """The data settings the model dictates: image size and tokens per image."""
    data = copy.deepcopy(config.data)
    data.image_size = model_config.vision.image_size
    data.num_image_tokens = model_config.num_image_tokens
    return data


def _total_steps(config: ml_collections.ConfigDict, data) -> int:
    if config.train.num_steps:
        return int(config.train.num_steps)
    records = len(datasets.open_split(data, "train"))
    return max(1, math.floor(records * config.train.num_epochs / data.global_batch_size))


# --- the run ----------------------------------------------------------------------------------


class _Preemption:
    """SIGTERM (TPU preemption) is noted here and acted on at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading_is_main():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving at the next step boundary, then exiting")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

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


def make_optimizer_from(config: ml_collections.ConfigDict, total_steps: int):
    """(optimizer, learning-rate schedule) from `config.optimizer`."""
    opt = config.optimizer
    return make_optimizer(
        learning_rate=opt.learning_rate,
        total_steps=total_steps,
        warmup_ratio=opt.warmup_ratio,
        schedule=opt.schedule,
        weight_decay=opt.weight_decay,
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        grad_clip_norm=opt.grad_clip_norm,
        projector_learning_rate=opt.projector_learning_rate,
    )


def make_run_setup(
    config: ml_collections.ConfigDict, model_config: ModelConfig, total_steps: int, mesh=None
) -> tuple[TrainSetup, Any]:
    """(setup, schedule) for `config` on `mesh` (default: `config.mesh`)."""
    if mesh is None:
        mesh = make_mesh(config.mesh.shape, dcn_shape=config.mesh.dcn_shape)
    optimizer, schedule = make_optimizer_from(config, total_steps)
    rules = tuple(map(tuple, config.mesh.rules))
    return make_setup(model_config, optimizer, config.train.train_pattern, mesh, rules), schedule


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train as `config` says, in `workdir`, resuming from its newest checkpoint; then
    evaluate. Returns a summary: final step, whether it stopped early, eval results."""
    return Run(config, workdir).execute()


class Run:
    """One invocation of the trainer: everything fixed at start-up, then `execute()`."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        check_config(config)
        check_workdir(workdir)
        self.config = config
        self.workdir = workdir
        # Process 0 builds what is shared on disk (synthetic tokenizer, prepared data) before
        # the others read it.
        if jax.process_index() == 0:
            self._load_tokenizer_and_model()
            datasets.open_split(self.data_config, "train")  # prepares on first use
        multihost_utils.sync_global_devices("data prepared")
        if jax.process_index() != 0:
            self._load_tokenizer_and_model()
        self.total_steps = _total_steps(config, self.data_config)
        self.setup, schedule = make_run_setup(config, self.model_config, self.total_steps)
        train = config.train
        accumulate = micro_batches(config, data_parallel_size(self.setup.mesh))
        step_fn = make_train_step(
            self.setup,
            schedule,
            micro_batches=accumulate,
            z_loss_weight=train.z_loss_weight,
            loss_chunk_size=train.loss_chunk_size,
        )
        self.train_step = jit_train_step(
            self.setup, step_fn, self.data_config.global_batch_size, accumulate
        )
        data = self.data_config
        self.flops_per_step = train_step_flops(
            self.model_config,
            batch=data.global_batch_size,
            length=data.max_len,
            images=data.max_images_per_sample,
            trainable=pattern_trains(train.train_pattern),
        )
        self.peak_flops = peak_flops_per_device(self.setup.mesh, self.model_config.dtype)
        # What was run: the model as built and the data settings the model dictated.
        self.run_config = json.loads(config.to_json_best_effort())
        self.run_config["model"].update(self.model_config.to_dict())
        self.run_config["data"] = json.loads(self.data_config.to_json_best_effort())

    def _load_tokenizer_and_model(self) -> None:
        self.tokenizer = tokenizer_for(self.config.data)
        self.model_config, self.host_params = initial_model(self.config, self.tokenizer)
        self.data_config = _data_config(self.config, self.model_config)

    def execute(self) -> dict[str, Any]:
        self.iterator = make_train_iterator(self.data_config, self.tokenizer)
        self.checkpoints = ckpt.TrainCheckpoints(
            self.workdir, keep=self.config.train.keep_checkpoints
        )
        self.writer = MetricsWriter(self.workdir, enabled=jax.process_index() == 0)
        summary: dict[str, Any] = {"preempted": False}
        try:
            state, start_step = self._restore_or_init()
            with _Preemption() as preemption:
                state, step = self._loop(state, start_step, preemption)
            summary["step"] = step
            if step < self.total_steps:
                summary["preempted"] = True  # by SIGTERM or stop_at_step: run again to go on
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
            logging.info("Resumed from %s at step %d", self.checkpoints.directory, step)
            return state, step
        rng = jax.random.key(self.config.init.seed)
        params = self.host_params
        if self.config.init.mode == "checkpoint" and params is None:
            source = self.config.init.checkpoint_path
            params = ckpt.restore_params(source, self.setup.abstract_state.params)
        if jax.process_index() == 0:
            _save_tokenizer_and_config(self.workdir, self.tokenizer, self.run_config)
        return init_train_state(self.setup, rng, params), 0

    def _loop(self, state: TrainState, step: int, preemption: _Preemption):
        from tqdm import tqdm

        train = self.config.train
        bar = tqdm(
            total=self.total_steps,
            initial=step,
            disable=jax.process_index() != 0,
            unit="step",
            dynamic_ncols=True,
        )
        window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
        try:
            while step < self.total_steps:
                stop_here = train.stop_at_step is not None and step >= train.stop_at_step
                if stop_here or preemption.agreed():
                    if step not in self.checkpoints.steps():
                        self._save(step, state)
                    self.checkpoints.wait()
                    logging.warning(
                        "Stopped at step %d; saved in %s", step, self.checkpoints.directory
                    )
                    return state, step
                batch = to_global_batch(next(self.iterator), self.setup.mesh)
                state, metrics = self.train_step(state, batch)
                step += 1
                host = metrics_to_host(metrics)
                if not math.isfinite(host["loss"]) or not math.isfinite(host["grad_norm"]):
                    raise TrainingStopped(
                        f"loss is {host['loss']} (grad norm {host['grad_norm']}) at step "
                        f"{step}; stopping. {self._last_good()}"
                    )
                window_tokens += host["tokens"]
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
                            "tokens_per_second": window_tokens / elapsed,
                            "tflops_per_device": flops / 1e12,
                            "mfu": flops / self.peak_flops,
                            "examples_seen": step * self.data_config.global_batch_size,
                            "dropped_examples": sum(self.iterator.dropped.values()),
                        },
                    )
                    window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
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
        """Held-out loss, and answer accuracy by greedy decoding (also with blank images)."""
        config = self.config
        eval_data = copy.deepcopy(self.data_config)
        eval_data.num_epochs = 1
        eval_data.global_batch_size = min(eval_data.global_batch_size, config.eval.batch_size)
        results: dict[str, Any] = {}
        loss = _eval_loss(
            self.setup,
            state,
            self.tokenizer,
            eval_data,
            config.eval.loss_batches,
            config.train.loss_chunk_size,
        )
        if loss is not None:
            results["eval_loss"] = loss
        if config.eval.num_records > 0:
            from llava_jax.evaluation.answers import answer_accuracy

            results.update(
                answer_accuracy(self.setup, state.params, self.tokenizer, eval_data, config.eval)
            )
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


def _eval_loss(setup, state, tokenizer, eval_data, max_batches, loss_chunk_size) -> float | None:
    if max_batches <= 0:
        return None
    try:
        iterator = make_train_iterator(eval_data, tokenizer, split="test")
    except (KeyError, ValueError, FileNotFoundError) as err:
        logging.warning("No held-out split for the eval loss: %s", err)
        return None
    eval_step = make_eval_step(setup, loss_chunk_size)
    total, tokens = 0.0, 0.0
    try:
        for _ in range(max_batches):
            try:
                batch = to_global_batch(next(iterator), setup.mesh)
            except StopIteration:
                break
            sums = metrics_to_host(eval_step(state.params, batch))
            total += sums["loss_sum"]
            tokens += sums["supervised_tokens"]
    finally:
        iterator.close()
    return total / tokens if tokens else None
