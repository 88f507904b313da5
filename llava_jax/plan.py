"""The train step planned ahead of time: compiled for a TPU slice (or N CPU devices, or this
machine's GPUs) with abstract inputs, nothing allocated, and the compiler's own memory plan.

    python -m llava_jax.plan --config=configs/llava_v15.py:7b,finetune --topology=v5p:2x2x2 \
        [--config.model.remat_policy=full ...] [--search_batch=false]

Topologies: TPU slices by their Cloud names (`v4-32`, `v5e-64`, `v5p-16`, `v6e-16`) or
topologies (`v4:2x2x4`, `v5e:8x8`, `v5p:2x2x2`, `v6e:4x4`; compiling for them needs libtpu,
`pip install -e ".[tpu]"`, but no TPU), `cpu:N` (N fake CPU devices) or `gpu`. Prints per
device: parameters, optimizer state, the batch, the compiler's temporaries and the total,
against the chip's memory; whether it fits; the compile time; and the largest per-device
batch that fits with the same settings (found by compiling a few sizes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from llava_jax.plan_checks import (
    GIB,
    _size,
    check_mesh_and_batch,
    check_mesh_divides_model,
    check_state_fits,
    minimum_state_bytes,
)


@dataclasses.dataclass
class Plan:
    """One compiled train step: bytes per device, as the compiler lays them out."""

    topology: str
    num_devices: int
    chip: str
    hbm_bytes: int | None
    mesh_shape: dict[str, int]
    global_batch: int
    micro_batches: int
    device_batch: int  # sequences per device in one micro-batch
    length: int
    param_bytes: int
    optimizer_bytes: int
    batch_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    compile_seconds: float
    out_of_memory: str | None = None  # the compiler's message when it refused the program

    @property
    def total_bytes(self) -> int:
        """Arguments + outputs not aliased to them (the donated state) + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool | None:
        if self.out_of_memory:
            return False
        return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes


# --- devices ----------------------------------------------------------------------------------


def check_topology(topology: str) -> str:
    """`--topology`'s value, checked as text before JAX starts: `gpu`, `cpu`, `cpu:N` (N >= 1)
    or a TPU slice or topology (`hardware.tpu_topology_name`). Raises ValueError naming the
    flag and the accepted forms."""
    if topology == "gpu" or topology == "cpu":
        return topology
    if topology.startswith("cpu:"):
        count = topology.partition(":")[2]
        if not (count.isascii() and count.isdigit() and int(count) >= 1):
            raise ValueError(
                f"--topology={topology}: N in cpu:N is how many CPU devices to compile for, a "
                "whole number from 1 (e.g. --topology=cpu:8)"
            )
        return topology
    from llava_jax.hardware import tpu_topology_name

    try:
        tpu_topology_name(topology)
    except ValueError as err:
        raise ValueError(f"--topology={topology}: {err}") from None
    return topology


def plan_devices(topology: str) -> list[Any]:
    """The devices to compile for: a TPU slice's compile-only devices, `cpu:N`, or `gpu`."""
    import jax

    from llava_jax.hardware import tpu_devices

    check_topology(topology)
    if topology == "gpu":
        try:
            return jax.devices("gpu")
        except RuntimeError as err:
            raise ValueError(f"--topology=gpu, but this machine has no GPU: {err}") from None
    if topology == "cpu" or topology.startswith("cpu:"):
        wanted = int(topology.partition(":")[2] or 1)
        devices = jax.devices("cpu")
        if len(devices) < wanted:
            raise ValueError(
                f"--topology={topology}: JAX has {len(devices)} CPU devices; start it with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={wanted}"
            )
        return devices[:wanted]
    try:
        return tpu_devices(topology)
    except ValueError as err:
        raise ValueError(f"--topology={topology}: {err}") from None


def _cpu_device_count(argv: Sequence[str]) -> int | None:
    """`--topology=cpu:N` among the arguments: N, so fake devices exist before JAX starts
    (None where there is none, or N is no count: `check_topology` says so later)."""
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--topology="):
            value = arg.split("=", 1)[1]
        elif arg == "--topology" and i + 1 < len(argv):
            value = argv[i + 1]
        if value and value.startswith("cpu:"):
            count = value.split(":", 1)[1]
            return int(count) if count.isascii() and count.isdigit() else None
    return None


def hbm_bytes_from_gib(gib: float | None) -> int | None:
    """`--hbm_gib` as bytes (None: the chip's own memory); a value that is not a positive
    number is refused, naming the flag."""
    if gib is None:
        return None
    if not math.isfinite(gib) or gib <= 0:
        raise ValueError(
            f"--hbm_gib={gib:g}: give the memory of one device in GiB, a number above 0 "
            "(e.g. --hbm_gib=16), or leave the flag out to plan against the chip's own memory"
        )
    return max(int(gib * GIB), 1)


# --- the plan ---------------------------------------------------------------------------------


def plan_train_step(
    config: Any,
    devices: list[Any],
    topology: str,
    *,
    device_batch: int | None = None,
    hbm_bytes: int | None = None,
) -> Plan:
    """Compile the run's train step for `devices` and read the compiler's memory plan.

    `device_batch` (sequences per device per micro-batch) replaces the config's global
    batch size by `device_batch × data-parallel size × micro-batches`. `hbm_bytes`: the
    memory to plan against, instead of the chip's.
    """
    import flax.linen as nn
    import jax

    from llava_jax.hardware import chip_for
    from llava_jax.models.inputs import abstract_batch
    from llava_jax.models.llava import abstract_params
    from llava_jax.sharding import batch_sharding, data_parallel_size, device_bytes
    from llava_jax.train.config import RunConfig

    if hbm_bytes is not None and hbm_bytes < 1:
        raise ValueError(f"hbm_bytes={hbm_bytes}: the memory to plan against must be above 0")
    if device_batch is not None and device_batch < 1:
        raise ValueError(f"device_batch={device_batch}: sequences per device must be 1 or more")
    check_mesh_and_batch(config, len(devices), topology, check_batch=device_batch is None)
    if not isinstance(config, RunConfig):
        config = RunConfig.from_config(config)
    model_config = config.model
    chip = chip_for(devices[0])
    budget = hbm_bytes if hbm_bytes is not None else chip.hbm_bytes  # per device
    if budget is not None:  # before any program of the whole model: it may be enormous
        state_bytes = minimum_state_bytes(model_config, config.train.train_pattern)
        where = f"on {topology} ({len(devices)} x {chip.name}, {_size(budget)} each)"
        check_state_fits(state_bytes, len(devices), budget, where, hbm_bytes is not None)
    from llava_jax.train.step import build_train_step
    from llava_jax.train.trainer import make_run_setup  # slow to import (tokenizers)

    mesh = config.mesh.make_mesh(devices)
    rules = config.mesh.rules
    check_mesh_divides_model(abstract_params(model_config), mesh, rules)
    data_parallel = data_parallel_size(mesh)
    global_batch = config.data.global_batch_size
    if device_batch is None:
        micro_batches = config.train.accumulation_steps_for(global_batch, data_parallel)
    else:  # the same global batch, accumulated over micro-batches of this size if it divides
        micro_batches = max(global_batch // (device_batch * data_parallel), 1)
        global_batch = device_batch * data_parallel * micro_batches
    setup, schedule = make_run_setup(config, model_config, total_steps=1000, mesh=mesh)
    step = build_train_step(config.train, setup, schedule, global_batch, micro_batches)
    batch = abstract_batch(
        model_config, global_batch, config.data.max_len, config.data.image_slots,
        batch_sharding(mesh),
    )  # fmt: skip
    start = time.perf_counter()
    state = setup.abstract_state
    arguments = device_bytes(state) + device_bytes(batch)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = step.jitted.lower(state, batch)
        try:
            memory = lowered.compile().memory_analysis()
            refused = None
        except jax.errors.JaxRuntimeError as err:
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            # The TPU compiler refuses a program that cannot fit: keep what it needed.
            refused = str(err).splitlines()[0]
            memory = _memory_from_refusal(refused, arguments)
    seconds = time.perf_counter() - start
    return Plan(
        topology=topology,
        num_devices=len(devices),
        chip=chip.name,
        hbm_bytes=budget,
        mesh_shape=dict(mesh.shape),
        global_batch=global_batch,
        micro_batches=micro_batches,
        device_batch=global_batch // (data_parallel * micro_batches),
        length=config.data.max_len,
        param_bytes=device_bytes(state.params),
        optimizer_bytes=device_bytes(state.opt_state),
        batch_bytes=device_bytes(batch),
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        compile_seconds=seconds,
        out_of_memory=refused,
    )


_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _memory_from_refusal(message: str, argument_bytes: int) -> Any:
    """What an out-of-memory refusal says was needed, as `memory_analysis()` fields."""
    import re
    import types

    def amount(pattern: str) -> int | None:
        match = re.search(pattern, message)
        return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else None

    temporaries = amount(r"temporaries \(([\d.]+)([KMGT])")
    if temporaries is None:
        used = amount(r"[Uu]sed ([\d.]+)([KMGT])")
        temporaries = max((used or 0) - argument_bytes, 0)
    return types.SimpleNamespace(
        argument_size_in_bytes=argument_bytes,
        output_size_in_bytes=0,
        alias_size_in_bytes=0,
        temp_size_in_bytes=temporaries,
    )


def largest_device_batch(
    config: Any,
    devices: list[Any],
    topology: str,
    first: Plan,
    limit: int = 256,
    known: Sequence[Plan] = (),
) -> tuple[int, list[Plan]]:
    """The largest sequences-per-device (per micro-batch) whose step fits the chip: a line
    through two compiled sizes predicts it, compiles confirm it. `known`: other sizes
    already compiled (not compiled again). Returns (size, plans)."""
    if first.hbm_bytes is None:
        raise ValueError(f"the memory of {first.chip} is not known; nothing to search against")
    plans = {p.device_batch: dataclasses.replace(p, hbm_bytes=first.hbm_bytes) for p in known}
    plans[first.device_batch] = first

    def fits(size: int) -> bool:
        if size not in plans:
            plans[size] = plan_train_step(
                config, devices, topology, device_batch=size, hbm_bytes=first.hbm_bytes
            )
        return bool(plans[size].fits)

    other = first.device_batch * 2 if first.device_batch > 1 or first.fits else 2
    if first.device_batch == 1 and not first.fits:
        return 0, list(plans.values())
    if other not in plans:
        fits(other)
    small, large = sorted((first.device_batch, other))
    slope = max((plans[large].total_bytes - plans[small].total_bytes) / (large - small), 1.0)
    guess = small + (first.hbm_bytes - plans[small].total_bytes) / slope
    guess = int(min(max(guess, 1), limit))
    low, high = 0, limit + 1  # low fits (0: nothing), high does not
    for size, plan in plans.items():
        if plan.fits:
            low = max(low, size)
        else:
            high = min(high, size)
    probe = min(max(guess, low + 1), high - 1) if high - low > 1 else None
    while probe is not None:
        if fits(probe):
            low = probe
            probe = probe + 1 if probe + 1 < high else None
        else:
            high = probe
            probe = (low + high) // 2 if high - low > 1 else None
            if probe == low:
                probe = None
    return low, list(plans.values())


def format_plan(plan: Plan, config_name: str, largest: int | None = None) -> str:
    def gib(n: int | None) -> str:
        if n is None:
            return "?"
        return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"

    verdict = {True: "fits", False: "does NOT fit", None: "memory unknown"}[plan.fits]
    if plan.out_of_memory:
        verdict += " (the compiler refused it)"
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh_shape.items())
    batch = f"{plan.global_batch} x {plan.length} tokens"
    if plan.micro_batches > 1:
        batch += f" in {plan.micro_batches} micro-batches"
    rows = [
        f"{config_name} on {plan.topology}: {plan.num_devices} x {plan.chip} "
        f"({gib(plan.hbm_bytes)} each), mesh {mesh}",
        f"  global batch        {batch}; {plan.device_batch} per device per micro-batch",
        f"  parameters          {gib(plan.param_bytes)}",
        f"  optimizer state     {gib(plan.optimizer_bytes)}",
        f"  batch               {gib(plan.batch_bytes)}",
        f"  temporaries         {gib(plan.temp_bytes)}",
        f"  total per device    {gib(plan.total_bytes)} of {gib(plan.hbm_bytes)}: {verdict}",
        f"  compile time        {plan.compile_seconds:.1f} s",
    ]
    if largest == 0:
        rows.append("  largest batch       none fits, not even 1 per device")
    elif largest is not None:
        rows.append(f"  largest batch       {largest} per device per micro-batch fits")
    return "\n".join(rows)


# --- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m llava_jax.plan` with `argv` (default: the command line); returns the exit
    status. Anything the user can fix (a flag, a config value, a model no slice of that
    size holds) is one line, `error: …`, on stderr and status 2; `--debug` raises it
    instead. In a process that has imported JAX already, `--topology=cpu:N` needs the N
    devices to be there (XLA_FLAGS is read when JAX starts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "jax" not in sys.modules:  # the environment is read when JAX starts
        count = _cpu_device_count(argv)
        if count:  # fake CPU devices must exist before JAX starts
            os.environ["XLA_FLAGS"] = (
                os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
            ).strip()
        if "gpu" not in argv and "--topology=gpu" not in argv:
            # Compiling for a slice needs no local accelerator: do not probe for one.
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import flags
    from ml_collections import config_flags

    from llava_jax.errors import InputError
    from llava_jax.program import EXIT_INPUT_ERROR, report_error

    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file (configs/*.py[:arg]).",
        flag_values=values,
        lock_config=True,
        sys_argv=["plan", *argv],
    )
    flags.DEFINE_string(
        "topology", None, "v4-32, v5e:8x8, v5p:2x2x2, cpu:8, gpu, …", flag_values=values
    )
    flags.DEFINE_bool(
        "search_batch",
        True,
        "Also find the largest per-device batch that fits.",
        flag_values=values,
    )
    flags.DEFINE_float(
        "hbm_gib", None, "Plan against this much memory per device instead.", flag_values=values
    )
    flags.DEFINE_bool(
        "debug", False, "Show errors with their Python traceback.", flag_values=values
    )
    if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv):
        print(__doc__)
        print(values.get_help())
        return 0
    try:
        rest = values(["plan", *argv])
    except Exception as err:  # noqa: BLE001 - absl and config_flags raise several types
        if "--debug" in argv:
            raise
        report_error(InputError(_flag_error(err)))
        return EXIT_INPUT_ERROR
    try:
        if rest[1:]:
            raise InputError(f"unexpected arguments: {rest[1:]}")
        config_file = _config_name(argv).partition(":")[0]
        if values["config"].present and not os.path.isfile(config_file):
            raise InputError(
                f"--config={_config_name(argv)}: there is no file {config_file!r} (give a "
                "config file, e.g. --config=configs/tiny.py)"
            )
        if values.config is None:
            raise InputError("--config is required (e.g. --config=configs/tiny.py)")
        if values.topology is None:
            raise InputError(
                "--topology is required: a TPU slice (v5e-16), a TPU topology (v5e:4x4), "
                "cpu:N or gpu"
            )
        topology = check_topology(values.topology)
        hbm = hbm_bytes_from_gib(values.hbm_gib)
        devices = plan_devices(topology)
        plan = plan_train_step(values.config, devices, topology, hbm_bytes=hbm)
        largest = None
        if values.search_batch and plan.hbm_bytes is not None:
            largest, _ = largest_device_batch(values.config, devices, topology, plan)
    except (ValueError, RuntimeError, InputError) as err:
        if values.debug:
            raise
        report_error(err)
        return EXIT_INPUT_ERROR
    print(format_plan(plan, _config_name(argv), largest))
    return 0


def _flag_error(err: Exception) -> str:
    """A bad flag or config override as one line (config_flags wraps a KeyError whose text
    is the message)."""
    cause: object = err
    while isinstance(cause, AttributeError | KeyError) and cause.args:
        cause = cause.args[0]
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    if "Traceback (most recent call last):" in lines:  # a config file's own error: its line
        lines = lines[: lines.index("Traceback (most recent call last):")] + lines[-1:]
    return " ".join(lines)


def _config_name(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return "config"


if __name__ == "__main__":
    sys.exit(main())
