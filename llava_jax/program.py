"""What every command-line program shares: a quiet terminal and a log, the persistent
compilation cache, and one way to report the user's mistakes.

Every program (`python -m llava_jax.main`, `.generate`, `.chat`, `.evaluate`, `.serve`,
`.convert`) has the same layout: a docstring that says how to run it, a `main(argv) -> int`,
and its work inside `run(body)`, which turns an `InputError` (a path, an image, a prompt the
user can fix) into one line, `error: …`, on stderr and exit status 2 (`--debug`: the
traceback instead). Imports nothing of the model, so any room may use it.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from llava_jax.errors import InputError

EXIT_INPUT_ERROR = 2  # as argparse uses for a bad command line
DEFAULT_CACHE = "~/.cache/llava_jax/xla"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# --- the terminal and the log --------------------------------------------------------------------


# Warnings that say nothing the user can act on; they still reach the log file.
_ROUTINE_WARNINGS = ("Using custom data configuration",)


BACKGROUND_LOGGER = "llava_jax.background"


def _not_routine(record: logging.LogRecord) -> bool:
    if str(record.msg).startswith(_ROUTINE_WARNINGS):
        return False
    # A failed background save: Orbax's threads and asyncio log it many times over, with
    # stacks; the program reports it itself in one line (the details stay in the log file).
    if record.name in (
        "asyncio",
        "concurrent.futures",
        BACKGROUND_LOGGER,
    ) or f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
        return record.levelno >= logging.CRITICAL
    # Orbax, when the parameters are read from a training checkpoint's `state` item alone:
    # that item never has the step's metadata file, so the warning comes every time.
    message = record.getMessage()
    state_metadata = os.path.join("state", "_CHECKPOINT_METADATA")
    return not (
        message.startswith("Metadata file does not exist") and message.endswith(state_metadata)
    )


def setup_logging(verbose: bool = False, log_file: str | None = None) -> None:
    """Warnings (and the program's own prints) on the terminal; with `verbose`, every
    library's INFO lines too. `log_file` receives the INFO lines either way."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setLevel(logging.INFO if verbose else logging.WARNING)
    terminal.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    if not verbose:
        terminal.addFilter(_not_routine)
    root.addHandler(terminal)
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setLevel(logging.INFO)
        to_file.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(to_file)
    # Orbax, TFDS and grain log through absl's logger: let its INFO lines reach the file.
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """A background thread's uncaught exception goes to the log, not the terminal: the
    main thread reports what it means for the run (e.g. a failed save) in one line."""
    logging.getLogger(BACKGROUND_LOGGER).error(
        "Exception in thread %s",
        getattr(args.thread, "name", "?"),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def _log_unraisable(unraisable: Any) -> None:
    """Errors Python cannot raise anywhere (a callback of tensorstore's writer threads
    after a failed save, a `__del__`) go to the log; they change nothing in the run."""
    logging.getLogger(BACKGROUND_LOGGER).error(
        "%s %s",
        unraisable.err_msg or "Exception ignored in",
        "" if unraisable.object is None else repr(unraisable.object),
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
    )


def skip_absent_accelerators() -> None:
    """On a machine with neither a TPU nor a GPU, run on the CPU without probing for them:
    an installed libtpu (the test extra brings it, to compile for TPU slices) would
    otherwise fill the terminal with start-up errors. A `JAX_PLATFORMS` the user set wins.
    Call it before JAX touches a device."""
    import glob

    if os.environ.get("JAX_PLATFORMS"):
        return
    devices = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")
    if not any(glob.glob(pattern) for pattern in devices):
        import jax

        jax.config.update("jax_platforms", "cpu")


# --- the persistent compilation cache ------------------------------------------------------------

_cache_events: collections.Counter[str] = collections.Counter()


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Keep compiled programs on disk, so a second run does not compile them again.

    `directory`: the flag's value; "" or "none" turns the cache off. Default: the
    environment's `JAX_COMPILATION_CACHE_DIR`, else `~/.cache/llava_jax/xla`. Returns the
    directory in use. The hits and misses are logged (INFO) when the program ends.
    """
    import jax

    if directory is not None and directory.lower() in ("", "none"):
        return None
    directory = directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE
    directory = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if not _cache_events:
        jax.monitoring.register_event_listener(_count_cache_event)
        atexit.register(_report_cache, directory)
    _cache_events["enabled"] = 1
    return directory


def _count_cache_event(event: str, **_: Any) -> None:
    if event.startswith("/jax/compilation_cache/cache_"):
        _cache_events[event.rsplit("_", 1)[-1]] += 1  # hits | misses


def _report_cache(directory: str) -> None:
    logging.info(
        "compilation cache %s: %d hits, %d misses",
        directory,
        _cache_events["hits"],
        _cache_events["misses"],
    )


def cache_stats() -> dict[str, int]:
    """Persistent-cache hits and misses of this process so far."""
    return {"hits": _cache_events["hits"], "misses": _cache_events["misses"]}


# --- arguments every program has ------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compilation-cache",
        help=f"directory for compiled programs (default: $JAX_COMPILATION_CACHE_DIR or "
        f"{DEFAULT_CACHE}; 'none' turns it off)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the libraries' INFO logs too"
    )
    add_debug_argument(parser)


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an input error, show the traceback instead of one line",
    )


# --- running -------------------------------------------------------------------------------------


def run(body: Callable[[], int], args: argparse.Namespace | None = None) -> int:
    """Run a program's body: the terminal set up (quiet unless `--verbose`), the compilation
    cache on; an `InputError` becomes `error: <message>` on stderr and exit status 2 (with
    `--debug`, it propagates with its traceback)."""
    verbose = bool(getattr(args, "verbose", False))
    setup_logging(verbose)
    skip_absent_accelerators()
    try:
        enable_compilation_cache(getattr(args, "compilation_cache", None))
        return body()
    except InputError as err:
        if getattr(args, "debug", False):
            raise
        report_error(err)
        return EXIT_INPUT_ERROR


def report_error(err: BaseException) -> None:
    """`error: <message>` on stderr, on one line (a message that is not valid Unicode or
    spans lines is escaped rather than breaking the terminal or the line)."""
    message = " ".join(str(err).split("\n"))
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    print(f"error: {message}", file=sys.stderr, flush=True)
