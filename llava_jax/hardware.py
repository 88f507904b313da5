"""What the accelerators are: per-chip memory and peak FLOP/s, and TPU slice topologies.

One table, used by the ahead-of-time plan (`llava_jax.plan`: does it fit?) and by the
trainer's MFU metric (how much of the peak does a step reach?). Peaks are dense bf16
matrix throughput per chip (per device as JAX counts them), as the vendors state them.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int | None  # None: not known (CPU)
    peak_flops: float | None  # dense bf16 FLOP/s per device; None: measure it


# device_kind (as jax.Device reports it) -> chip. v4 and v5p count a megacore chip as one
# device; v5e and v6e have one TensorCore per chip.
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip("TPU v4", 32 * GIB, 275e12),
    "TPU v5 lite": Chip("TPU v5e", 16 * GIB, 197e12),
    "TPU v5e": Chip("TPU v5e", 16 * GIB, 197e12),
    "TPU v5": Chip("TPU v5p", 95 * GIB, 459e12),
    "TPU v5p": Chip("TPU v5p", 95 * GIB, 459e12),
    "TPU v6 lite": Chip("TPU v6e", 32 * GIB, 918e12),
    "TPU v6e": Chip("TPU v6e", 32 * GIB, 918e12),
    "NVIDIA A100-SXM4-40GB": Chip("A100 40GB", 40 * GIB, 312e12),
    "NVIDIA A100-SXM4-80GB": Chip("A100 80GB", 80 * GIB, 312e12),
    "NVIDIA H100 80GB HBM3": Chip("H100 SXM", 80 * GIB, 989e12),
    "NVIDIA H100": Chip("H100", 80 * GIB, 989e12),
    "NVIDIA H200": Chip("H200", 141 * GIB, 989e12),
}


def chip_for(device: Any) -> Chip:
    """The chip a `jax.Device` is: from the table by its device_kind (or a prefix of it);
    a GPU not in the table reports its own memory and no peak; a CPU neither."""
    kind = getattr(device, "device_kind", "")
    if kind in CHIPS:
        return CHIPS[kind]
    for known, chip in CHIPS.items():
        if known.startswith("NVIDIA") and kind.startswith(known):
            return chip
    memory = None
    stats = getattr(device, "memory_stats", None)
    if callable(stats):
        try:
            memory = (stats() or {}).get("bytes_limit")
        except Exception:  # compile-only devices have no memory to ask about
            memory = None
    return Chip(kind or device.platform, memory, None)


_measured_peak: dict[str, float] = {}


def measured_matmul_peak(dtype: str = "float32", size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a jitted square matmul on the default device, measured once per dtype: the
    peak to hold MFU against where no vendor figure applies (a CPU)."""
    if dtype in _measured_peak:
        return _measured_peak[dtype]
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        matmul(a).block_until_ready()
        runs += 1
    peak = 2 * size**3 * runs / (time.perf_counter() - start)
    _measured_peak[dtype] = peak
    return peak


# --- TPU slices -------------------------------------------------------------------------------

# Accelerator names (`v4-32`, as Cloud TPU names a slice) -> topology. v4 and v5p names
# count TensorCores (2 per chip); v5e and v6e names count chips.
_SLICES = {
    "v4": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
           512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"},
    "v5p": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
            512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"},
}  # fmt: skip
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_SLICE = re.compile(r"^(v4|v5e|v5p|v6e)-(\d+)$")


_KNOWN_FORMS = (
    "give a TPU slice (v4-32, v5e-64, v5p-16, v6e-16), a TPU topology (v4:2x2x4, v5e:8x8, "
    "v5p:2x2x2, v6e:4x4), cpu:N or gpu"
)
# Other names of the known generations: Cloud's accelerator types and the chips' own.
_FAMILY_NAMES = {"v5litepod": ("v5e",), "v5lite": ("v5e",), "v5": ("v5e", "v5p"), "v6": ("v6e",)}


def _family_hint(name: str) -> str:
    """What the generation in an unknown `name` is, where it has one: a name of a known
    generation to write instead, or the generations this table knows."""
    family = re.split(r"[-:]", name, maxsplit=1)[0]
    if family in _SLICES:  # a known generation, written some other way
        return f"{family} is known, but {name!r} is neither {family}-N nor {family}:AxB[xC]; "
    if family in _FAMILY_NAMES:
        names = _FAMILY_NAMES[family]
        return f"{family!r} is written {' or '.join(names)} here (e.g. {names[0]}-16); "
    if re.fullmatch(r"v\d+\w*", family):
        return f"{family!r} is not a TPU generation this plan knows ({', '.join(_SLICES)}); "
    return ""


def tpu_topology_name(name: str) -> str:
    """`v4-32` or `v4:2x2x4` -> the libtpu topology name (`v4:2x2x4`); an unknown name is an
    error that lists what is known."""
    match = _SLICE.match(name)
    if match:
        generation, cores = match.group(1), int(match.group(2))
        shape = _SLICES[generation].get(cores)
        if shape is None:
            raise ValueError(
                f"TPU slice {name!r} is not one this plan knows; known {generation} slices: "
                + ", ".join(f"{generation}-{n}" for n in _SLICES[generation])
            )
        return f"{generation}:{shape}"
    match = _TOPOLOGY.match(name)
    if not match:
        raise ValueError(f"topology {name!r} is not known: {_family_hint(name)}{_KNOWN_FORMS}")
    generation, shape = match.groups()
    dims = len(shape.split("x"))
    if (generation in ("v4", "v5p")) != (dims == 3):
        raise ValueError(
            f"topology {name!r}: {generation} slices are "
            f"{'3' if generation in ('v4', 'v5p') else '2'}-dimensional (e.g. "
            f"{generation}:{'2x2x2' if dims == 2 else '4x4'})"
        )
    return name


def tpu_devices(name: str) -> list[Any]:
    """Compile-only devices of a TPU slice (needs libtpu: `pip install -e ".[tpu]"`); no TPU
    is needed, the program is only compiled for it."""
    import os

    topology = tpu_topology_name(name)
    from jax.experimental import topologies

    generation = topology.split(":")[0]
    kwargs = {}
    if generation in ("v4", "v5p"):  # one device per chip (megacore), 2x2x1 chips per host
        kwargs = dict(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1))
    # Only compiling: several processes may hold libtpu at once (tests run in parallel).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # libtpu probes for its hosts when it starts; name this one, but only for the call, so
    # the variable does not make later programs of this process think they are on a pod.
    previous = os.environ.get("TPU_WORKER_HOSTNAMES")
    os.environ["TPU_WORKER_HOSTNAMES"] = previous or "localhost"
    try:
        description = topologies.get_topology_desc(
            topology_name=topology.replace("v5p:", "v5:"), platform="tpu", **kwargs
        )
    except Exception as err:
        message = str(err).splitlines()[0]
        if "libtpu" in message.lower() or "no module" in message.lower():
            raise RuntimeError(
                f"cannot compile for {name}: libtpu is missing (pip install -e '.[tpu]'): {message}"
            ) from None
        raise ValueError(f"libtpu does not accept topology {topology!r}: {message}") from None
    finally:
        if previous is None:
            del os.environ["TPU_WORKER_HOSTNAMES"]
    return list(description.devices)
