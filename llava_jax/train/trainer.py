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
from llava_jax.config import check_config, model_config_from
from llava_jax.convert import load_hf, load_towers
from llava_jax.data import datasets
from llava_jax.data.pipeline import make_train_iterator, to_global_batch, tokenizer_for
from llava_jax.data.tokenizer import LoadedTokenizer
from llava_jax.models.config import ModelConfig
from llava_jax.sharding import make_mesh
from llava_jax.train.metrics import MetricsWriter, plot_losses
from llava_jax.train.optimizer import make_optimizer
from llava_jax.train.state import TrainState, init_train_state, make_setup
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train as `config` says, in `workdir`, resuming from its newest checkpoint; then
    evaluate. Returns a summary: final step, whether it was preempted, eval results."""
    check_config(config)
    check_workdir(workdir)
    tokenizer = tokenizer_for(config.data)
    model_config, host_params = initial_model(config, tokenizer)
    data_config = _data_config(config, model_config)
    if jax.process_index() == 0:
        datasets.open_split(data_config, "train")  # prepares on first use
    multihost_utils.sync_global_devices("data prepared")
    total_steps = _total_steps(config, data_config)

    mesh = make_mesh(config.mesh.shape, dcn_shape=config.mesh.dcn_shape)
    opt = config.optimizer
    optimizer, schedule = make_optimizer(
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
    setup = make_setup(
        model_config,
        optimizer,
        config.train.train_pattern,
        mesh,
        tuple(map(tuple, config.mesh.rules)),
    )
    train_step = jit_train_step(
        setup,
        make_train_step(
            setup,
            schedule,
            micro_batches=config.train.micro_batches,
            z_loss_weight=config.train.z_loss_weight,
        ),
        data_config.global_batch_size,
        config.train.micro_batches,
    )
    iterator = make_train_iterator(data_config, tokenizer)
    checkpoints = ckpt.TrainCheckpoints(workdir, keep=config.train.keep_checkpoints)
    run_config = json.loads(config.to_json_best_effort())
    run_config["model"].update(model_config.to_dict())

    restored = checkpoints.restore_latest(setup.abstract_state, iterator)
    if restored is not None:
        start_step, state = restored
        logging.info("Resumed from %s at step %d", checkpoints.directory, start_step)
    else:
        start_step = 0
        state = _initial_state(config, setup, host_params)
        if jax.process_index() == 0:
            _save_tokenizer_and_config(workdir, tokenizer, run_config)

    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    summary: dict[str, Any] = {"preempted": False}
    try:
        with _Preemption() as preemption:
            state, step = _loop(
                config,
                setup,
                train_step,
                state,
                start_step,
                total_steps,
                iterator,
                checkpoints,
                writer,
                preemption,
                run_config,
                tokenizer,
                data_config,
            )
        summary["step"] = step
        if step < total_steps:
            summary["preempted"] = True  # by SIGTERM or stop_at_step: run again to go on
            return summary
        if step not in checkpoints.steps():
            _save_if_finite(checkpoints, step, state, iterator, run_config)
        checkpoints.wait()
        summary["eval"] = _evaluate(
            config, setup, state, tokenizer, data_config, writer, step, final=True
        )
    finally:
        checkpoints.close()
        writer.close()
        iterator.close()
    if jax.process_index() == 0:
        plot_losses(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss.png"))
    return summary


def _initial_state(config, setup, host_params) -> TrainState:
    rng = jax.random.key(config.init.seed)
    if config.init.mode == "checkpoint" and host_params is None:
        params = ckpt.restore_params(config.init.checkpoint_path, setup.abstract_state.params)
        return init_train_state(setup, rng, params)
    return init_train_state(setup, rng, host_params)


def _save_tokenizer_and_config(workdir: str, tokenizer: LoadedTokenizer, run_config: dict):
    """What inference needs beside the checkpoints: the tokenizer and the resolved config."""
    tokenizer.tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(run_config, f, indent=2)


def _loop(
    config,
    setup,
    train_step,
    state,
    start_step,
    total_steps,
    iterator,
    checkpoints,
    writer,
    preemption,
    run_config,
    tokenizer,
    data_config,
):
    from tqdm import tqdm

    train = config.train
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        disable=jax.process_index() != 0,
        unit="step",
        dynamic_ncols=True,
    )
    step = start_step
    window_start, window_tokens = time.perf_counter(), 0.0
    try:
        while step < total_steps:
            stop_here = train.stop_at_step is not None and step >= train.stop_at_step
            if stop_here or preemption.agreed():
                if step not in checkpoints.steps():
                    _save_if_finite(checkpoints, step, state, iterator, run_config)
                checkpoints.wait()
                logging.warning("Stopped at step %d; saved in %s", step, checkpoints.directory)
                return state, step
            batch = to_global_batch(next(iterator), setup.mesh)
            state, metrics = train_step(state, batch)
            step += 1
            host = metrics_to_host(metrics)
            if not math.isfinite(host["loss"]) or not math.isfinite(host["grad_norm"]):
                raise TrainingStopped(
                    f"loss is {host['loss']} (grad norm {host['grad_norm']}) at step {step}; "
                    f"stopping. {_last_good(checkpoints)}"
                )
            window_tokens += host["tokens"]
            bar.update(1)
            bar.set_postfix(loss=f"{host['loss']:.4f}")
            if step % train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                writer.write(
                    step,
                    {
                        "loss": host["loss"],
                        "learning_rate": host["learning_rate"],
                        "grad_norm": host["grad_norm"],
                        "supervised_tokens": host["supervised_tokens"],
                        "tokens_per_second": window_tokens / max(elapsed, 1e-9),
                        "examples_seen": step * data_config.global_batch_size,
                        "dropped_examples": sum(iterator.dropped.values()),
                    },
                )
                window_start, window_tokens = time.perf_counter(), 0.0
            if step % train.checkpoint_every == 0 or step == total_steps:
                _save_if_finite(checkpoints, step, state, iterator, run_config)
            if train.eval_every and step % train.eval_every == 0 and step < total_steps:
                _evaluate(config, setup, state, tokenizer, data_config, writer, step)
    finally:
        bar.close()
    return state, step


@jax.jit
def _all_finite(params: Params) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def _last_good(checkpoints: ckpt.TrainCheckpoints) -> str:
    checkpoints.wait()
    steps = checkpoints.steps()
    where = os.path.join(checkpoints.directory, str(steps[-1])) if steps else "none"
    return f"The last good checkpoint is {where}"


def _save_if_finite(checkpoints, step, state, iterator, run_config) -> None:
    """Save, unless an update made a parameter NaN or Inf (then stop, saving nothing)."""
    finite = _all_finite(state.params)
    if not bool(jax.device_get(finite.addressable_shards[0].data)):
        raise TrainingStopped(
            f"parameters are not finite after step {step}; stopping. {_last_good(checkpoints)}"
        )
    checkpoints.save(step, state, iterator, run_config)


def _evaluate(config, setup, state, tokenizer, data_config, writer, step, final=False):
    """Held-out loss, and answer accuracy by greedy decoding (also with blank images)."""
    eval_data = copy.deepcopy(data_config)
    eval_data.num_epochs = 1
    eval_data.global_batch_size = min(data_config.global_batch_size, config.eval.batch_size)
    results: dict[str, Any] = {}
    loss = _eval_loss(setup, state, tokenizer, eval_data, config.eval.loss_batches)
    if loss is not None:
        results["eval_loss"] = loss
    if config.eval.num_records > 0:
        from llava_jax.evaluation.answers import answer_accuracy

        results.update(answer_accuracy(setup, state.params, tokenizer, eval_data, config.eval))
    writer.write(step, {f"eval/{k}": v for k, v in results.items() if isinstance(v, int | float)})
    if final and jax.process_index() == 0:
        with open(os.path.join(writer.workdir, "eval.json"), "w") as f:
            json.dump({"step": step, **results}, f, indent=2)
    return results


def _eval_loss(setup, state, tokenizer, eval_data, max_batches) -> float | None:
    if max_batches <= 0:
        return None
    try:
        iterator = make_train_iterator(eval_data, tokenizer, split="test")
    except (KeyError, ValueError, FileNotFoundError) as err:
        logging.warning("No held-out split for the eval loss: %s", err)
        return None
    eval_step = make_eval_step(setup)
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
