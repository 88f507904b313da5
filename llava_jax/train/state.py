"""The train state, born sharded: abstract shapes -> logical specs -> mesh shardings -> jit."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import struct
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh

from llava_jax.models.config import ModelConfig
from llava_jax.models.inputs import ImageGeometry
from llava_jax.models.llava import Llava, abstract_params, dummy_inputs
from llava_jax.models.lora import is_lora_factor, prepare_base, without_lora
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


# LLaVA-NeXT's row-closing embedding: fresh when a NeXT run starts from a LLaVA-1.5 model.
NEWLINE_PATH = ("proj", "image_newline")


def base_abstract_params(setup: TrainSetup, source: ModelConfig | None = None) -> Any:
    """Sharded `ShapeDtypeStruct`s of the parameters a run starts from: the state's, or,
    for a LoRA run, those of its base model (no factors, kernels as trained), to restore an
    earlier run's checkpoint into before `init_train_state` adds the adapters. A NeXT run
    from a `source` model without anyres (LLaVA-1.5's stage 1) restores all but the
    `image_newline`, which `init_train_state` adds."""
    config = setup.model_config
    geometry = ImageGeometry.of
    fresh_newline = source is not None and geometry(config).tiled and not geometry(source).tiled
    if not config.lora.enabled and not fresh_newline:
        return setup.abstract_state.params
    if fresh_newline:
        config = config.replace(
            image_grid_pinpoints=(), vision_aspect_ratio="", video_token_id=None
        )
    boxed = abstract_params(without_lora(config))
    shardings = param_shardings(boxed, setup.mesh, setup.rules)
    return abstract_arrays(nn.meta.unbox(boxed), shardings)


def init_train_state(setup: TrainSetup, rng: jax.Array, params: Any = None) -> TrainState:
    """A sharded train state: fresh parameters from `rng`, or `params` given on the host
    (numpy, e.g. from `load_hf`), each placed shard by shard so no device holds a full copy.
    """
    shardings = setup.state_shardings
    if params is None:
        inputs = dummy_inputs(setup.model_config)

        def init(rng: jax.Array) -> Any:
            variables = setup.model.init(rng, **inputs)
            return prepare_base(setup.model_config, nn.meta.unbox(variables["params"]))

        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            params = jax.jit(init, out_shardings=shardings.params)(rng)
    else:
        params = _with_fresh_adapters(setup, rng, params)

    def init_opt(params: Any) -> Any:
        return setup.optimizer.init(split_trainable(params, setup.mask))

    opt_state = jax.jit(init_opt, out_shardings=shardings.opt_state)(params)
    step = global_array(np.zeros((), np.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def _with_fresh_adapters(setup: TrainSetup, rng: jax.Array, params: Any) -> Any:
    """Host `params` placed on the mesh. A base model starting LoRA lacks the factors, and a
    LLaVA-1.5 model starting LLaVA-NeXT its `image_newline`: they are initialised from `rng`
    on the devices (only those leaves are computed; the rest of the init is dead code to
    XLA), then the frozen base is stored as `lora.base_dtype` says, on the devices, each
    shard where it will live."""
    final = flatten_dict(setup.state_shardings.params)
    given = flatten_dict(params)
    if set(given) == set(final):
        return place(params, setup.state_shardings.params)
    config = setup.model_config
    raw = flatten_dict(
        param_shardings(abstract_params(config, stored=False), setup.mesh, setup.rules)
    )
    missing = [path for path in raw if path not in given]
    unknown = [path for path in missing if not is_lora_factor(path) and path != NEWLINE_PATH]
    unknown += [path for path in given if path not in raw]
    if unknown:
        raise ValueError(
            "the initial parameters do not fit the model: "
            + ", ".join("/".join(p) for p in unknown[:3])
        )
    inputs = dummy_inputs(config)

    def init(rng: jax.Array) -> dict:
        variables = setup.model.init(rng, **inputs)
        flat = flatten_dict(nn.meta.unbox(variables["params"]))
        return {path: flat[path] for path in missing}

    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        fresh = jax.jit(init, out_shardings={path: raw[path] for path in missing})(rng)
    placed = flatten_dict(place(params, unflatten_dict({p: raw[p] for p in given})))
    tree = unflatten_dict({path: (placed | fresh)[path] for path in raw})
    return jax.jit(
        lambda tree: prepare_base(config, tree),
        out_shardings=setup.state_shardings.params,
        donate_argnums=0,
    )(tree)
