"""Run `python -m MODULE` in a child process and read the child's own peak resident memory.

`os.wait4`'s `ru_maxrss` will not do: Linux folds the peak of the address space a process
had before `exec` into it, so a child forked from a large test process (an xdist worker that
ran many tests) reports that process's memory. The child writes its own `VmHWM` (the peak
of its address space since `exec`) as it exits.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_RUN = (
    "import atexit, resource, runpy, sys; "
    "peak, limit = sys.argv.pop(1), int(sys.argv.pop(1)); "
    "limit and resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); "
    "atexit.register(lambda: open(peak, 'w').write(next(line for line in "
    "open('/proc/self/status') if line.startswith('VmHWM')))); "
    "module = sys.argv.pop(1); "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)


def run_with_peak_memory(
    module: str,
    args: list[str],
    peak_file: Path,
    *,
    cwd: str,
    env: dict[str, str],
    timeout: float,
    address_limit: int = 0,
) -> tuple[subprocess.CompletedProcess, float]:
    """(the finished process, its stderr as text; its peak resident memory in MiB).
    `address_limit`: bytes of address space the child may take (0: no limit), so a
    regression fails the child instead of the machine. Raises `subprocess.TimeoutExpired`
    past `timeout` seconds (the child is killed)."""
    command = [sys.executable, "-c", _RUN, str(peak_file), str(address_limit), module, *args]
    done = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        timeout=timeout,
    )
    peak_mib = int(Path(peak_file).read_text().split()[1]) / 1024  # "VmHWM:  123456 kB"
    return done, peak_mib
