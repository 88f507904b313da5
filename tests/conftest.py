"""Test setup, before JAX is imported anywhere: 8 fake CPU devices, no hub access, XLA:CPU
compiling fast, and one compilation cache for the session (subprocesses and xdist workers
inherit it), so the many runs of the same tiny programs compile once."""

import os
import shutil
import tempfile

# The suite's time is mostly XLA:CPU compiling tiny programs, which these flags halve (LLVM
# without its optimisation passes, and the loop emitters instead of the fusion emitters);
# what runs is the same program, and the tests' models are too small for the slower code
# to matter. Subprocesses inherit them (trainer_fixtures.xla_flags changes only the count).
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)
DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE_FLAGS, DEVICES_FLAG]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_CREATED_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CREATED_CACHE = tempfile.mkdtemp(prefix="llava_jax_jit_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CREATED_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_sessionfinish(session, exitstatus):
    """The process that made the cache removes it (xdist workers only inherit it)."""
    if _CREATED_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_CREATED_CACHE, ignore_errors=True)
