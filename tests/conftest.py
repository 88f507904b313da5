"""Test setup, before JAX is imported anywhere: 8 fake CPU devices, no hub access, and one
compilation cache for the session (subprocesses and xdist workers inherit it), so the many
runs of the same tiny programs compile once."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
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
