"""One mesh `('data', 'fsdp', 'tensor')`, logical axis rules, and shardings of trees.

Parameters and activations carry logical axis names (`embed`, `mlp`, …); the rules, set in
the config, map each to mesh axes. A dimension that a mesh axis does not divide evenly is
replicated rather than padded, so odd sizes (a 32001-token vocabulary) still run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llava_jax.section import Section

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# docs/design.md, Sharding: a short, fixed vocabulary.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("layers", None),
    ("head_dim", None),
    # A LoRA factor's rank axis: its other axis may map to a mesh axis that is absent or
    # small (`tensor`), so without this a factor would sit whole on every device.
    ("lora_rank", "fsdp"),
)

Rules = Sequence[tuple[str, Any]]


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """The device mesh (`config.mesh`): `shape` per slice over (data, fsdp, tensor), -1 for
    the remaining devices; `dcn_shape` across slices of a multi-slice pod (e.g. (2, 1, 1));
    `rules` map logical axis names to mesh axes."""

    shape: tuple[int, ...] = (-1, 1, 1)
    dcn_shape: tuple[int, ...] | None = None
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.dcn_shape is not None:
            object.__setattr__(self, "dcn_shape", tuple(int(s) for s in self.dcn_shape))
        rules = tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in self.rules)
        object.__setattr__(self, "rules", rules)
        if len(self.shape) != len(MESH_AXES):
            raise ValueError(
                f"config.mesh.shape={self.shape} must have {len(MESH_AXES)} entries {MESH_AXES}"
            )

    def make_mesh(self, devices: Sequence[Any] | None = None) -> Mesh:
        return make_mesh(self.shape, dcn_shape=self.dcn_shape, devices=devices)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace one -1 by the remaining devices; the product must equal `num_devices`."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known <= 0 or num_devices % known:
            raise ValueError(
                f"mesh shape {shape} cannot fill {num_devices} devices "
                f"({num_devices} is not a multiple of {known})"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} "
            f"devices, but there are {num_devices}"
        )
    return shape


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1),
    *,
    dcn_shape: Sequence[int] | None = None,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """A `('data', 'fsdp', 'tensor')` mesh with Auto axis types.

    `shape` is the per-slice (ICI) shape; `dcn_shape`, for multi-slice TPU pods, the shape
    across slices (usually `(num_slices, 1, 1)`), so data parallelism crosses the slow links.
    """
    devices = list(devices) if devices is not None else jax.devices()
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if dcn_shape is None:
        shape = resolve_mesh_shape(shape, len(devices))
        if devices == jax.devices():
            return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
        if devices[0].platform == "tpu":  # e.g. a slice's compile-only devices: ICI layout
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
            return Mesh(grid, MESH_AXES, axis_types=axis_types)
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)
    dcn_shape = tuple(int(s) for s in dcn_shape)
    num_slices = math.prod(dcn_shape)
    if len(devices) % num_slices:
        raise ValueError(f"{len(devices)} devices do not split into {num_slices} slices")
    shape = resolve_mesh_shape(shape, len(devices) // num_slices)
    grid = mesh_utils.create_hybrid_device_mesh(shape, dcn_shape, devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _as_tuple(axes: Any) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> P:
    """PartitionSpec for an array of `shape` whose axes have logical `names`.

    Each mesh axis is used at most once; a dimension the mesh axes do not divide is
    replicated.
    """
    table = dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(names, shape, strict=True):
        axes = tuple(a for a in _as_tuple(table.get(name)) if a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def param_shardings(boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for a tree of `nn.Partitioned` leaves (values: arrays or ShapeDtypeStructs)."""

    def one(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nn.Partitioned):
            spec = logical_to_spec(leaf.names, leaf.value.shape, mesh, rules)
        else:
            spec = P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def abstract_arrays(shapes: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct`s of a tree of shapes, each with its sharding: a target to restore
    a checkpoint onto, or to lower a program for, without allocating anything."""
    return jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        shapes,
        shardings,
    )


def sharded_params(boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """The abstract parameters of a boxed (`nn.Partitioned`) tree, on their mesh shardings."""
    return abstract_arrays(nn.meta.unbox(boxed), param_shardings(boxed, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data` and `fsdp`, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(
    global_batch_size: int, mesh: Mesh, what: str = "config.data.global_batch_size"
) -> None:
    size = data_parallel_size(mesh)
    if global_batch_size % size:
        raise ValueError(
            f"{what}={global_batch_size} is not divisible by the data-parallel size "
            f"{size} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})"
        )


def shardings_like(tree: Any, reference: dict[tuple, tuple[tuple[int, ...], Any]], mesh: Mesh):
    """Shard each leaf of `tree` (e.g. optimizer state) like the parameter it mirrors.

    `reference` maps a parameter's key path to (shape, sharding). A leaf whose key path ends
    with a parameter's path and has its shape takes its sharding; others are replicated.
    """

    def one(path: tuple, leaf: Any) -> NamedSharding:
        keys = tuple(_key_name(k) for k in path)
        for start in range(len(keys)):
            match = reference.get(keys[start:])
            if match is not None and tuple(match[0]) == tuple(leaf.shape):
                return match[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def path_string(path: tuple) -> str:
    """`('llm', 'layers', 'attn', 'query', 'kernel')` key path -> `llm/layers/attn/query/kernel`."""
    return "/".join(str(_key_name(k)) for k in path)


def global_array(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """Host data that every process holds whole -> a global array: each device receives only
    its own slice, and (unlike `device_put`) the sharding may span other processes' devices.
    An array that is already global is resharded on device."""
    if isinstance(value, jax.Array):
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s (or arrays)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def place(tree: Any, shardings: Any) -> Any:
    """`global_array` leaf by leaf: a host tree onto a matching tree of shardings."""
    return jax.tree.map(global_array, tree, shardings)
