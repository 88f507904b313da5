"""Command line: flags -> config -> `train_and_evaluate(config, workdir)`.

    python -m llava_jax.main --config=configs/tiny.py --workdir=workdir/tiny \
        [--config.train.num_steps=100 ...] [--verbose] [--compilation_cache=DIR]

The terminal shows a start-up summary, the progress bar, warnings and the final figures;
every library's INFO lines go to WORKDIR/train.log (`--verbose` shows them here too).
Compiled programs are kept in the compilation cache (default: $JAX_COMPILATION_CACHE_DIR
or ~/.cache/llava_jax/xla), so the next start skips compiling. A start-up problem the user
can fix (an unknown config key, a missing path, a bad mesh) is one line and exit status 2.

Several hosts: on TPU pods (`--distributed`) and SLURM clusters,
`jax.distributed.initialize()` finds its peers by itself; elsewhere (GPU clusters,
processes on localhost) give `--coordinator_address`, `--num_processes` and
`--process_id`, or the environment variables LLAVA_COORDINATOR_ADDRESS,
LLAVA_NUM_PROCESSES, LLAVA_PROCESS_ID.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:arg]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_string("cpu_collectives", None, "CPU collectives for multi-process CPU: gloo.")
flags.DEFINE_bool(
    "distributed",
    False,
    "Join the other hosts, found by JAX itself (TPU pods, "
    "SLURM); also LLAVA_DISTRIBUTED=1. launch/tpu_pod.sh sets it.",
)
flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logs on the terminal too.")
flags.DEFINE_string("compilation_cache", None, "Directory for compiled programs ('none': off).")
flags.DEFINE_bool("debug", False, "Show start-up errors with their Python traceback.")
flags.mark_flags_as_required(["config", "workdir"])

_CLUSTER_ENV = ("CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS")


def on_a_cluster(environ: Mapping[str, str]) -> bool:
    """Whether the environment says this is one host of several (a TPU pod, SLURM).

    `TPU_WORKER_HOSTNAMES` counts only when it names two or more hosts: one host
    (`localhost`, set to quiet libtpu) is no pod, and libtpu itself may leave a warning
    sentence in it (a process that initialised libtpu passes it to its children).
    """
    hosts = [h.strip() for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",")]
    several_hosts = len(hosts) > 1 and all(h and " " not in h for h in hosts)
    return (
        several_hosts
        or any(name in environ for name in _CLUSTER_ENV)
        or int(environ.get("SLURM_NTASKS", "1")) > 1
    )


def _flag_or_env(name: str):
    value = getattr(FLAGS, name)
    if value is None:
        value = os.environ.get(f"LLAVA_{name.upper()}")
    return value


def initialize_distributed() -> None:
    """Join the other processes, if there are any."""
    import jax

    if FLAGS.cpu_collectives or os.environ.get("LLAVA_CPU_COLLECTIVES"):
        jax.config.update(
            "jax_cpu_collectives_implementation",
            FLAGS.cpu_collectives or os.environ["LLAVA_CPU_COLLECTIVES"],
        )
    address = _flag_or_env("coordinator_address")
    if address:
        jax.distributed.initialize(
            address,
            num_processes=int(_flag_or_env("num_processes")),
            process_id=int(_flag_or_env("process_id")),
        )
    elif (
        FLAGS.distributed or os.environ.get("LLAVA_DISTRIBUTED") == "1" or on_a_cluster(os.environ)
    ):
        jax.distributed.initialize()  # TPU pod / SLURM: peers found automatically


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from llava_jax import program
    from llava_jax.errors import InputError

    program.setup_logging(FLAGS.verbose, os.path.join(FLAGS.workdir, "train.log"))
    program.skip_absent_accelerators()
    initialize_distributed()
    program.enable_compilation_cache(FLAGS.compilation_cache)
    from llava_jax.checkpoint import CheckpointSaveFailed
    from llava_jax.data.pipeline import NoUsableData
    from llava_jax.train.trainer import Run, TrainingStopped

    try:
        run = Run(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, PermissionError, InputError) as err:
        if FLAGS.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(program.EXIT_INPUT_ERROR)
    except KeyboardInterrupt:
        print("llava_jax: interrupted during start-up; nothing was saved", file=sys.stderr)
        sys.exit(130)
    try:
        summary = run.execute()
    except CheckpointSaveFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        # The failed save's writer threads are left behind; the interpreter's teardown would
        # print their stacks. The leftover temporary folder is removed at the next start.
        logging.shutdown()
        os._exit(1)
    except (TrainingStopped, NoUsableData) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:  # a second Ctrl-C / SIGTERM: out at once
        print(f"llava_jax: {err or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    if summary.get("preempted"):
        logging.warning("Stopped at step %d on request; run again to continue.", summary["step"])
    elif summary.get("eval"):  # empty when the data has no held-out split
        print({k: v for k, v in summary["eval"].items() if not isinstance(v, list)})
    sys.stdout.flush()


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but a bad flag or config override (a typo'd key, a value of the wrong
    type, a missing config file) is one line and exit status 2, not a traceback."""
    try:
        return FLAGS(argv)
    except Exception as err:  # noqa: BLE001 - config_flags raises several types
        if "--debug" in argv:
            raise
        cause: object = err
        while isinstance(cause, AttributeError | KeyError) and cause.args:
            cause = cause.args[0]  # config_flags wraps a KeyError whose text is the message
        lines = str(cause).splitlines()
        message = " ".join(line.strip() for line in lines if line.strip())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
