"""One process of a multi-process run on localhost (gloo collectives on CPU).

Run by tests/test_multiprocess.py as: python multiprocess_train_worker.py PORT NUM_PROCESSES
PROCESS_ID DEVICES_PER_PROCESS. Prints one JSON line: this process's view of the losses.
"""

from __future__ import annotations

import json
import os
import sys

port, num_processes, process_id, local_devices = map(int, sys.argv[1:5])
# the parent's flags (conftest.py), with this process's device count
COUNT = "--xla_force_host_platform_device_count="
kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(COUNT)]
os.environ["XLA_FLAGS"] = " ".join([*kept, f"{COUNT}{local_devices}"])
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)

import numpy as np  # noqa: E402
from train_fixtures import WELL_CONDITIONED, build, make_batch  # noqa: E402

from llava_jax.models.inputs import Batch  # noqa: E402
from llava_jax.sharding import batch_sharding  # noqa: E402
from llava_jax.train.step import metrics_to_host  # noqa: E402

setup, state, step = build((8, 1, 1), **WELL_CONDITIONED)
sharding = batch_sharding(setup.mesh)
losses = []
for i in range(3):
    global_batch = make_batch(100 + i)
    # This process supplies only the rows its own devices hold.
    rows = sharding.addressable_devices_indices_map(global_batch["input_ids"].shape)
    starts = sorted({index[0].start for index in rows.values()})
    size = global_batch["input_ids"].shape[0] // jax.device_count()
    local = {k: np.concatenate([v[s : s + size] for s in starts]) for k, v in global_batch.items()}
    batch = {
        k: jax.make_array_from_process_local_data(sharding, v, global_batch[k].shape)
        for k, v in local.items()
    }
    state, metrics = step(state, Batch.from_arrays(batch))
    losses.append(metrics_to_host(metrics)["loss"])
print(json.dumps({"process": process_id, "local_rows": starts, "losses": losses}), flush=True)
jax.distributed.shutdown()
