"""What `python -m llava_jax.plan` checks before it compiles anything (no program of the
whole model is built for them): the mesh against the devices and the global batch, the
mesh against the model's dimensions, and the bytes of parameters and optimizer state,
counted from the architecture, against the memory of all the devices together; and byte
counts as its messages write them."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

GIB = 1024**3


def check_mesh_divides_model(boxed_params: Any, mesh: Any, rules: Any) -> None:
    """A mesh axis that does not divide the dimension a rule shards over would leave that
    parameter replicated on every device; refuse it, naming the parameter and sizes."""
    import flax.linen as nn
    import jax

    from llava_jax.sharding import path_string

    table = dict(rules)
    problems = []
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    for path, leaf in leaves:
        if not isinstance(leaf, nn.Partitioned):
            continue
        for name, dim in zip(leaf.names, leaf.value.shape, strict=True):
            axes = table.get(name)
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            size = math.prod(mesh.shape[a] for a in axes)
            if size > 1 and dim % size:
                problems.append(f"{path_string(path)}: {name}={dim} over {'x'.join(axes)}={size}")
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; … ({len(problems)} in all)" if len(problems) > 6 else ""
        )
        raise ValueError(
            f"mesh {dict(mesh.shape)} does not divide the model ({shown}). Choose mesh axis "
            "sizes that divide these dimensions (config.mesh.shape)."
        )


def check_mesh_and_batch(
    config: Any, num_devices: int, topology: str, *, check_batch: bool = True
) -> int:
    """`config.mesh` against the devices to plan for, and `config.data.global_batch_size`
    against the mesh's data-parallel size, before anything is built: a message names the
    flag, the device count and values that would work. Returns the data-parallel size."""
    section = config.mesh
    shape, dcn = _sizes(section.shape), _sizes(section.dcn_shape)
    have = f"--topology={topology} has {num_devices} devices"
    slices = 1
    if section.dcn_shape is not None:
        slices = math.prod(dcn) if dcn and len(dcn) == 3 and min(dcn) >= 1 else 0
        if not slices or num_devices % slices:
            raise ValueError(
                f"--config.mesh.dcn_shape={_shown(section.dcn_shape)} does not split the "
                f"devices into slices ({have}): give 3 sizes from 1 over (data, fsdp, tensor) "
                f"whose product, the number of slices, divides {num_devices} (e.g. (2, 1, 1)), "
                "or None for one slice"
            )
        have += f", {num_devices // slices} in each of its {slices} slices"
    per_slice = num_devices // slices
    fixes = (
        f"give 3 sizes over (data, fsdp, tensor) whose product is {per_slice}, e.g. "
        f"({per_slice}, 1, 1) or (1, {per_slice}, 1), or -1 for the one that takes the devices "
        "the others leave, e.g. (-1, 1, 1)"
    )
    flag = f"--config.mesh.shape={_shown(section.shape)}"
    if (
        shape is None
        or len(shape) != 3
        or shape.count(-1) > 1
        or min(size if size != -1 else 1 for size in shape) < 1
    ):
        raise ValueError(f"{flag} is no mesh ({have}): {fixes}")
    known = math.prod(size for size in shape if size != -1)
    if -1 in shape:
        if per_slice % known:
            raise ValueError(
                f"{flag} cannot be filled ({have}): the sizes besides -1 multiply to {known}, "
                f"which does not divide {per_slice}; {fixes}"
            )
        shape = tuple(per_slice // known if size == -1 else size for size in shape)
    elif known != per_slice:
        per = " per slice" if slices > 1 else ""
        raise ValueError(f"{flag} needs {known} devices{per}, but {have}: {fixes}")
    data, fsdp = shape[0] * (dcn or (1, 1, 1))[0], shape[1] * (dcn or (1, 1, 1))[1]
    data_parallel = data * fsdp
    batch = config.data.global_batch_size
    if check_batch and (batch < 1 or batch % data_parallel):
        fit = max(-(-batch // data_parallel), 1) * data_parallel
        raise ValueError(
            f"--config.data.global_batch_size={batch}: the sequences of one step are split "
            f"over mesh data={data} x fsdp={fsdp} = {data_parallel} data-parallel devices, so "
            f"give a multiple of {data_parallel} (e.g. --config.data.global_batch_size={fit})"
        )
    return data_parallel


def _sizes(value: Any) -> tuple[int, ...] | None:
    """A mesh shape as whole numbers; None for None, or for anything that is not one."""
    try:
        sizes = tuple(value)
        if all(int(size) == size and not isinstance(size, bool) for size in sizes):
            return tuple(int(size) for size in sizes)
    except (TypeError, ValueError):
        pass
    return None


def _shown(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """At least this many bytes of parameters and optimizer state, all devices together:
    counted from the architecture, before any program of the whole model is built."""

    param_bytes: int
    optimizer_bytes: int
    layers: dict[str, tuple[int, int]]  # "vision" / "text" -> (layers, parameter bytes of one)

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes


_LAYER_STACK = re.compile(r"layers(_\d+)?")
_TOWERS = {"img": "vision", "llm": "text"}
# Unscanned, the train pattern is matched against each layer's own paths, up to this many
# layers (a fraction of a second); the optimizer state of layers past them is not counted.
_PATTERN_LAYERS = 10_000


def minimum_state_bytes(model_config: Any, train_pattern: str) -> StateBytes:
    """The parameter and Adam bytes of `model_config`, from a model of the same widths with
    one layer per tower (its parameter tree, abstract: nothing allocated) and the layer
    counts: about the same cost for 2 layers or a million, in either layout.

    Exact for the scanned layout, and for the unscanned one up to 10,000 layers. Past them,
    the optimizer state of the further layers is left out; and unscanned with LoRA, whose
    target may name layers by index (`llm/layers_7/…`), each layer counts as the smaller of
    adapted and not, without optimizer state: a lower bound."""
    from llava_jax.train.optimizer import compile_train_pattern, path_trains

    pattern = compile_train_pattern(train_pattern)

    def trains(path: str, floating: bool) -> bool:  # integers (int8 bases) have no gradient
        return floating and path_trains(pattern, path)

    counts = {"img": model_config.vision.num_layers, "llm": model_config.text.num_layers}
    by_index = not model_config.scan_layers  # unscanned: paths carry the layer's index
    lora = model_config.lora.enabled
    params: dict[str, int] = dict.fromkeys(("rest", *counts), 0)
    moments = dict(params)
    layer = dict(params)  # one layer's parameter bytes
    for part, path, size, floating in _one_layer_leaves(model_config, lora=lora):
        if part == "rest":
            params[part] += size
            moments[part] += 2 * size * trains(path, floating)
            continue
        layer[part] += size
        if not by_index:
            moments[part] += 2 * size * counts[part] * trains(path, floating)
        elif not lora:
            layers = range(min(counts[part], _PATTERN_LAYERS))
            moments[part] += 2 * size * sum(trains(path.format(i), floating) for i in layers)
    if by_index and lora:
        plain = dict.fromkeys(counts, 0)
        for part, _, size, _ in _one_layer_leaves(model_config, lora=False):
            if part != "rest":
                plain[part] += size
        layer = {part: min(layer[part], plain.get(part, 0)) for part in layer}
    for part, count in counts.items():
        params[part] = count * layer[part]
    return StateBytes(
        param_bytes=sum(params.values()),
        optimizer_bytes=sum(moments.values()),
        layers={name: (counts[part], layer[part]) for part, name in _TOWERS.items()},
    )


def _one_layer_leaves(model_config: Any, *, lora: bool) -> list[tuple[str, str, int, bool]]:
    """(part, path, bytes, floating) of each parameter of the same model with one layer per
    tower, `lora` or not: part `img` or `llm` for the layer of that stack, `rest` for the
    others; an unscanned layer's path has `{}` for its index (`llm/layers_{}/up/kernel`)."""
    import flax.linen as nn
    import jax
    import numpy as np

    from llava_jax.models.config import LoraConfig
    from llava_jax.models.llava import abstract_params
    from llava_jax.sharding import path_string

    selected = len(model_config.feature_layers)  # the projector's input width counts them
    one = dataclasses.replace(
        model_config,
        vision=dataclasses.replace(model_config.vision, num_layers=1),
        text=dataclasses.replace(model_config.text, num_layers=1),
        vision_feature_layer=-1 if selected == 1 else (-1,) * selected,
        lora=model_config.lora if lora else LoraConfig(),
    )
    leaves = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract_params(one))):
        keys = path_string(path).split("/")
        part = "rest"
        if len(keys) > 2 and _LAYER_STACK.fullmatch(keys[1]):
            part = keys[0]
            if keys[1] != "layers":
                keys[1] = "layers_{}"
        size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        floating = not np.issubdtype(leaf.dtype, np.integer)
        leaves.append((part, "/".join(keys), size, floating))
    return leaves


def check_state_fits(
    state: StateBytes, num_devices: int, hbm_bytes: int, where: str, memory_flag: bool
) -> None:
    """Refuse a model whose parameters and optimizer state exceed the memory of all the
    devices together: no sharding can make it fit, so no program is built for it."""
    total = num_devices * hbm_bytes
    if state.total_bytes <= total:
        return
    tower, (layers, each) = max(state.layers.items(), key=lambda item: item[1][0] * item[1][1])
    part = ""
    if layers * each * 2 > state.param_bytes:  # most of the model is one stack of layers
        name = "decoder" if tower == "text" else "vision tower"
        part = f" ({layers} {name} layers of {_size(each)} each)"
    optimizer = (
        f" and Adam's moments of the trainable ones at least {_size(state.optimizer_bytes)} more"
        if state.optimizer_bytes
        else ""
    )
    needed = -(-state.total_bytes // hbm_bytes)
    more_memory = ", more memory per device (--hbm_gib)" if memory_flag else ""
    raise ValueError(
        f"the model cannot fit {where} even with every array sharded over all "
        f"{num_devices} devices: its parameters alone take {_size(state.param_bytes)}{part}"
        f"{optimizer}, but {num_devices} x {_size(hbm_bytes)} is {_size(total)} in all (at "
        f"least {needed} such devices would be needed). Plan for a larger slice (--topology)"
        f"{more_memory}, a smaller model (e.g. --config.model.{tower}.num_layers) or fewer "
        "trainable parameters (--config.train.train_pattern)"
    )


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    if n < 1024:
        return f"{n} B"
    if n < 2**20:
        return f"{n / 1024:.1f} KiB"
    if n >= 1024 * GIB:
        return f"{n / (1024 * GIB):.1f} TiB"
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"
