"""Orbax checkpoints: training checkpoints that resume exactly, and params checkpoints.

A training workdir holds `checkpoints/<step>/{state, data, config, checksums}`; `checksums`
is one 32-bit sum per saved array (`tree_checksums`), checked when the step is restored,
so flipped bytes in a data file are found instead of trained on. A checkpoint that cannot
be read or fails its checksums is moved aside to `checkpoints/bad-<step>/` (with
`REASON.txt`) and the one before it is used.

A params checkpoint (weight exchange, `python -m llava_jax.convert`) is a directory with

  model_config.json   `ModelConfig.to_dict()`
  params/             Orbax PyTree of `{'img', 'proj', 'llm'}`
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llava_jax.models.config import ModelConfig

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_params(directory: str, config: ModelConfig, params: Any) -> None:
    """Write `params` and `config` as a params checkpoint (blocks until written)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()


def _saved_shapes(directory: str, sharding: Any = None) -> Any:
    """The saved tree as `ShapeDtypeStruct`s (on `sharding`, if given), read from metadata."""
    metadata = ocp.StandardCheckpointer().metadata(directory).item_metadata.tree
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
        metadata,
        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"),
    )


def load_params(directory: str, target: Any = None) -> tuple[ModelConfig, Any]:
    """Read a params checkpoint. `target`: a tree of arrays or `jax.ShapeDtypeStruct`s with
    shardings to restore onto (default: as saved, on the default device)."""
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, MODEL_CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{directory}: not a params checkpoint (no {MODEL_CONFIG_FILE})")
    with open(config_path) as f:
        config = ModelConfig.from_section(json.load(f), config_path)
    checkpointer = ocp.StandardCheckpointer()
    params_path = os.path.join(directory, PARAMS_DIR)
    try:
        if target is None:
            target = _saved_shapes(params_path)
        return config, checkpointer.restore(params_path, target)
    except Exception as err:  # noqa: BLE001 - Orbax raises many types for a damaged folder
        raise ValueError(
            f"{params_path}: the parameters cannot be read ({type(err).__name__}: {err})"[:600]
        ) from None


def load_model_params(path: str) -> tuple[ModelConfig, Any]:
    """A params checkpoint (`save_params`), or a training workdir's newest checkpoint:
    (model config, parameters on the default device)."""
    if os.path.exists(os.path.join(path, MODEL_CONFIG_FILE)):
        return load_params(path)
    if not os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        raise FileNotFoundError(
            f"{path}: neither a params checkpoint (no {MODEL_CONFIG_FILE}) nor a training "
            f"workdir (no {CHECKPOINT_DIR}/)"
        )
    step, run_config = read_run_config(path)
    return ModelConfig.from_section(run_config["model"], "the run config's model"), restore_params(
        path, step=step
    )


# --- integrity ------------------------------------------------------------------------------


def _path_name(path: tuple) -> str:
    """`params/llm/embed/embedding`: the same name whether a leaf sits in a `TrainState`
    (attribute keys) or in a plain dict."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32[]: sum over elements of (bits x an odd weight of the position), mod 2**32.

    Integer addition is exact in any order, so the sum does not depend on the mesh or the
    reduction; an odd weight times any change of one element's bits is never 0 mod 2**32,
    so every single-element change (one flipped bit included) changes the sum.
    """
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:  # wider types gain a trailing axis of 32-bit words
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        narrow = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
    # the flat position from per-axis iotas: no reshape, so a sharded leaf stays sharded
    position = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
        position = position + iota * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    weight = position * jnp.uint32(2654435761) | jnp.uint32(1)
    return jnp.sum(bits * weight, dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])


def tree_checksums(tree: Any) -> dict[str, int]:
    """`{leaf path: uint32 checksum}` of every array in `tree` (on device, any sharding)."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0], strict=True)
    sums = _checksums_jit(list(leaves))
    return {
        _path_name(path): int(np.asarray(s.addressable_shards[0].data))
        for path, s in zip(paths, sums, strict=True)
    }


def checksum_mismatches(tree: Any, expected: dict[str, int]) -> list[str]:
    """The leaves of `tree` whose checksum differs from `expected` (leaves it does not list
    are not checked: a partial restore checks what it restored)."""
    actual = tree_checksums(tree)
    return sorted(k for k, v in actual.items() if k in expected and expected[k] != v)


# --- training checkpoints -------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoints"
CHECKSUMS_ITEM = "checksums"
BAD_PREFIX = "bad-"


class CheckpointSaveFailed(RuntimeError):
    """An asynchronous save did not complete (disk full, permissions, …)."""


class TrainCheckpoints:
    """Orbax `CheckpointManager` under `workdir/checkpoints/`: the train state, the data
    iterator's state (one file per process), the run config and the state's checksums,
    saved asynchronously. Temporary folders a killed save left behind are removed here.

    `restore_latest` takes the newest checkpoint that reads back with matching checksums;
    a bad one is moved aside (`bad-<step>/`, with the reason) so it is never tried again.
    A save that fails in the background is reported by `check_saves` (or `wait`) as one
    `CheckpointSaveFailed` naming the step and the cause.
    """

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=True,
                create=True,
                cleanup_tmp_directories=True,
            ),
        )
        self._saving: int | None = None  # the step whose save may still be running

    def save(self, step: int, state: Any, data_iterator: Any, config: dict) -> None:
        import grain

        self.wait()  # the previous save: its failure is reported as its own
        checksums = tree_checksums(state)
        self._saving = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(data_iterator),
                    config=ocp.args.JsonSave(config),
                    **{CHECKSUMS_ITEM: ocp.args.JsonSave(checksums)},
                ),
                force=True,
            )
        except Exception as err:  # noqa: BLE001 - the synchronous part failed
            raise self._failed(err) from None

    def _failed(self, err: BaseException) -> CheckpointSaveFailed:
        """One line: which save, and the innermost cause (the OS error, not the stack)."""
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = lines[-1] if lines else type(err).__name__
        os_error = re.search(r"Failed [^:]*: \"?[^\"]*\"?: (.*)", cause)
        if os_error:  # tensorstore: 'Failed writing: "<file>": <reason> [os_error_code=..]'
            cause = os_error.group(1)
        step = self._saving
        where = os.path.join(self.directory, str(step)) if step is not None else self.directory
        self._saving = None
        return CheckpointSaveFailed(f"saving checkpoint {where} failed: {cause[:300]}")

    def check_saves(self) -> None:
        """Raise `CheckpointSaveFailed` if the background save has finished and failed
        (cheap; called every step, so a failure is reported when it happens)."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until the running save is done; `CheckpointSaveFailed` if it failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as err:  # noqa: BLE001 - whatever the writer raised, named once
            raise self._failed(err) from None
        self._saving = None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[int, Any] | None:
        """(step, state) from the newest good checkpoint, the iterator set in place; None
        when there is none. `abstract_state` carries the target shardings."""
        import grain

        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iterator),
                    ),
                )
                reason = _checksum_problem(
                    restored.state, os.path.join(self.directory, str(step), CHECKSUMS_ITEM)
                )
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is set aside
                reason = f"unreadable: {type(err).__name__}: {err}"[:500]
            if reason is None:
                return step, restored.state
            self.set_aside(step, reason)
        return None

    def set_aside(self, step: int, reason: str) -> str:
        """Move checkpoint `step` to `bad-<step>/` with `REASON.txt`, so no later run tries
        it again or trips over its step number; returns the new path."""
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, f"{BAD_PREFIX}{step}")
        if jax.process_index() == 0:
            suffix = 1
            while os.path.exists(target):
                target = os.path.join(self.directory, f"{BAD_PREFIX}{step}.{suffix}")
                suffix += 1
            os.rename(source, target)
            with open(os.path.join(target, "REASON.txt"), "w") as f:
                f.write(reason + "\n")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.manager.reload()
        logging.warning(
            "Checkpoint %s is %s; moved to %s, trying the one before it", source, reason, target
        )
        return target

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def _checksum_problem(tree: Any, checksums_dir: str) -> str | None:
    """Why `tree` does not match the checksums saved beside it (None: it matches, or the
    checkpoint predates checksums)."""
    path = os.path.join(checksums_dir, "metadata")
    if not os.path.exists(path):
        return None  # saved before checksums were kept
    with open(path) as f:
        expected = json.load(f)
    bad = checksum_mismatches(tree, expected)
    if not bad:
        return None
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"damaged: checksum mismatch in {', '.join(bad[:3])}{more}"


def read_run_config(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, run config dict) of a training workdir's checkpoint (default: the newest whose
    config reads; a newer one that does not is passed over with a warning)."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
    if not steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint in {directory}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint at step {step} (steps: {sorted(steps)})")
    problems = []
    for candidate in [step] if step is not None else sorted(steps, reverse=True):
        path = os.path.join(directory, str(candidate), "config", "metadata")
        try:
            with open(path, encoding="utf-8") as f:
                run_config = json.load(f)
            if not isinstance(run_config, dict) or "model" not in run_config:
                raise ValueError("not a run config")
        except (OSError, ValueError) as err:
            problems.append(f"{path}: {type(err).__name__}: {err}"[:300])
            if step is None:
                logging.warning("Checkpoint config %s is unreadable; passed over", problems[-1])
            continue
        return candidate, _migrated(run_config)
    raise FileNotFoundError(f"{workdir}: no readable checkpoint config ({'; '.join(problems)})")


def saved_state_mismatches(workdir: str, step: int, abstract_state: Any) -> list[str] | None:
    """How checkpoint `step`'s saved state differs from `abstract_state` in structure,
    shape or dtype, as readable lines (empty: it matches); None when its metadata cannot be
    read (a damaged checkpoint, found out when it is restored)."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step), "state")
    try:
        saved = _saved_shapes(directory)
    except Exception:  # noqa: BLE001 - unreadable metadata: restore sets it aside
        return None

    def flat(tree: Any) -> dict[str, Any]:
        return {
            _path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        }

    saved_leaves, wanted_leaves = flat(saved), flat(abstract_state)
    lines = [f"{k}: only in the checkpoint" for k in sorted(set(saved_leaves) - set(wanted_leaves))]
    lines += [f"{k}: not in the checkpoint" for k in sorted(set(wanted_leaves) - set(saved_leaves))]
    for key in sorted(set(saved_leaves) & set(wanted_leaves)):
        a, b = saved_leaves[key], wanted_leaves[key]
        if tuple(a.shape) != tuple(b.shape):
            lines.append(f"{key}: saved {tuple(a.shape)}, now {tuple(b.shape)}")
    return lines


def _migrated(run_config: dict) -> dict:
    """A run config saved by an earlier version, in today's layout."""
    model = run_config.get("model", {})
    if "vocab_follows_tokenizer" in model:  # now config.init.vocab_follows_tokenizer
        follows = model.pop("vocab_follows_tokenizer")
        run_config.setdefault("init", {}).setdefault("vocab_follows_tokenizer", follows)
    # Renamed: data.num_epochs (how often the iterator reads the data, beside
    # train.num_epochs, the run's length) and train.micro_batches (beside
    # per_device_batch_size).
    for section, old, new in (
        ("data", "num_epochs", "passes"),
        ("train", "micro_batches", "accumulation_steps"),
    ):
        block = run_config.get(section, {})
        if isinstance(block, dict) and old in block:
            block.setdefault(new, block.pop(old))
    return run_config


def restore_params(workdir: str, abstract_params: Any = None, step: int | None = None) -> Any:
    """Only the parameters of a training workdir's checkpoint (default: the newest), onto
    the shardings in `abstract_params` (default: as saved, on the default device); e.g.
    stage 2 starting from stage 1."""
    if step is None:
        step, _ = read_run_config(workdir)
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step), "state")
    if abstract_params is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract_params = _saved_shapes(directory, device)["params"]
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract_params
    )
    restored = ocp.PyTreeCheckpointer().restore(
        directory,
        args=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args={"params": restore_args},
            partial_restore=True,
        ),
    )
    checksums = os.path.join(os.path.dirname(directory), CHECKSUMS_ITEM)
    problem = _checksum_problem(restored, checksums)
    if problem is not None:
        raise ValueError(f"checkpoint {os.path.dirname(directory)} is {problem}")
    return restored["params"]
