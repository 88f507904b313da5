"""The train state, born sharded: abstract shapes -> logical specs -> mesh shardings -> jit."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import struct
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh

from llava_jax.models.config import ModelConfig
from llava_jax.models.llava import Llava, abstract_params, dummy_inputs
from llava_jax.sharding import (
    Rules,
    abstract_arrays,
    global_array,
    param_shardings,
    place,
    replicated,
    shardings_like,
)
from llava_jax.train.optimizer import split_trainable, trainable_mask


@struct.dataclass
class TrainState:
    """step: int32[]; params: the full `{'img','proj','llm'}` tree; opt_state: over the
    trainable part only (frozen leaves have none)."""

    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What stays fixed through a run: the model, the mask, the optimizer, the mesh."""

    model_config: ModelConfig
    mask: Any  # tree of bools over params: trainable leaves
    optimizer: optax.GradientTransformation
    mesh: Mesh
    rules: Rules
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying the shardings (restore target)

    @property
    def model(self) -> Llava:
        return Llava(self.model_config)


def make_setup(
    model_config: ModelConfig,
    optimizer: optax.GradientTransformation,
    train_pattern: str,
    mesh: Mesh,
    rules: Rules,
) -> TrainSetup:
    """Work out, without allocating anything, the mask and where every leaf of the state lives."""
    boxed = abstract_params(model_config)
    shapes = nn.meta.unbox(boxed)
    mask = trainable_mask(shapes, train_pattern)
    params_sharding = param_shardings(boxed, mesh, rules)
    abstract_opt_state = jax.eval_shape(optimizer.init, split_trainable(shapes, mask))
    reference = {
        path: (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            flatten_dict(shapes).items(), flatten_dict(params_sharding).values(), strict=True
        )
    }
    state_shardings = TrainState(
        step=replicated(mesh),
        params=params_sharding,
        opt_state=shardings_like(abstract_opt_state, reference, mesh),
    )
    shapes_state = TrainState(
        step=jax.ShapeDtypeStruct((), np.int32), params=shapes, opt_state=abstract_opt_state
    )
    abstract_state = abstract_arrays(shapes_state, state_shardings)
    return TrainSetup(model_config, mask, optimizer, mesh, rules, state_shardings, abstract_state)


def init_train_state(setup: TrainSetup, rng: jax.Array, params: Any = None) -> TrainState:
    """A sharded train state: fresh parameters from `rng`, or `params` given on the host
    (numpy, e.g. from `load_hf`), each placed shard by shard so no device holds a full copy.
    """
    shardings = setup.state_shardings
    if params is None:
        inputs = dummy_inputs(setup.model_config)

        def init(rng: jax.Array) -> Any:
            variables = setup.model.init(rng, inputs["input_ids"], inputs["images"])
            return nn.meta.unbox(variables["params"])

        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            params = jax.jit(init, out_shardings=shardings.params)(rng)
    else:
        params = place(params, shardings.params)

    def init_opt(params: Any) -> Any:
        return setup.optimizer.init(split_trainable(params, setup.mask))

    opt_state = jax.jit(init_opt, out_shardings=shardings.opt_state)(params)
    step = global_array(np.zeros((), np.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)
