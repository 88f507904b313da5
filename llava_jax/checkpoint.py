"""Orbax checkpoints: training checkpoints that resume exactly, and params checkpoints.

A training workdir holds `checkpoints/<step>/{state, data, config}`. A params checkpoint
(weight exchange, `python -m llava_jax.convert`) is a directory with

  model_config.json   `ModelConfig.to_dict()`
  params/             Orbax PyTree of `{'img', 'proj', 'llm'}`
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

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
        config = ModelConfig.from_dict(json.load(f))
    checkpointer = ocp.StandardCheckpointer()
    params_path = os.path.join(directory, PARAMS_DIR)
    if target is None:
        target = _saved_shapes(params_path)
    return config, checkpointer.restore(params_path, target)


# --- training checkpoints -------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoints"


class TrainCheckpoints:
    """Orbax `CheckpointManager` under `workdir/checkpoints/`: the train state, the data
    iterator's state (one file per process) and the run config, saved asynchronously.

    `restore_latest` takes the newest complete checkpoint; one that cannot be read is passed
    over with a warning that names it.
    """

    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True, create=True
            ),
        )

    def save(self, step: int, state: Any, data_iterator: Any, config: dict) -> None:
        import grain

        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[int, Any] | None:
        """(step, state) from the newest readable checkpoint, the iterator set in place;
        None when there is none. `abstract_state` carries the target shardings."""
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
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is skipped
                logging.warning(
                    "Checkpoint %s is unreadable and is passed over: %s",
                    os.path.join(self.directory, str(step)),
                    f"{type(err).__name__}: {err}"[:500],
                )
                continue
            return step, restored.state
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_run_config(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, run config dict) of a training workdir's checkpoint (default: the newest)."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
    if not steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint in {directory}")
    step = max(steps) if step is None else step
    with open(os.path.join(directory, str(step), "config", "metadata")) as f:
        return step, _migrated(json.load(f))


def _migrated(run_config: dict) -> dict:
    """A run config saved by an earlier version, in today's layout."""
    model = run_config.get("model", {})
    if "vocab_follows_tokenizer" in model:  # now config.init.vocab_follows_tokenizer
        follows = model.pop("vocab_follows_tokenizer")
        run_config.setdefault("init", {}).setdefault("vocab_follows_tokenizer", follows)
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
    return restored["params"]
