"""Reliability of `python -m llava_jax.plan` on bad inputs: each gets one `error: …` line that
names the flag and says what to give instead, exit status 2, and no traceback; a model that no
slice of that size can hold is refused from its architecture, before any program of it is
built (in seconds and little memory, whatever its layer count).

The runs are in-process (`plan.main(argv)`, on the suite's 8 CPU devices), except the one
that measures the time and memory of a whole refusal, which runs as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from peak_memory import run_with_peak_memory

from llava_jax import plan, plan_checks
from llava_jax.models.config import ModelConfig
from llava_jax.models.llava import abstract_params
from llava_jax.train.optimizer import trainable_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
SEVEN_B = os.path.join(ROOT, "configs", "llava_v15.py") + ":7b,finetune"


def run_plan(capsys, *args: str) -> tuple[int, str, str]:
    """`plan.main` on the tiny config (no batch search): (exit status, stdout, stderr)."""
    status = plan.main([f"--config={TINY}", "--search_batch=false", *args])
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err: str) -> str:
    """stderr is exactly one `error: …` line, without a traceback."""
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "value, shown",
    [("-1", "-1"), ("0", "0"), ("inf", "inf"), ("nan", "nan"), ("-inf", "-inf"), ("1e-400", "0")],
)
def test_hbm_gib_that_is_no_positive_number_is_refused_naming_the_flag(capsys, value, shown):
    """-1 planned against "-1024.0 MiB each" (exit 0), 0 was dropped for the chip's memory,
    inf and nan were raw OverflowError / ValueError."""
    start = time.perf_counter()
    status, out, err = run_plan(capsys, "--topology=cpu:8", f"--hbm_gib={value}")
    line = one_error_line(err)
    assert status == 2 and out == ""
    assert line.startswith(f"error: --hbm_gib={shown}: give the memory of one device in GiB")
    assert "a number above 0 (e.g. --hbm_gib=16)" in line and "leave the flag out" in line
    assert time.perf_counter() - start < 10  # refused before any device or model is made


@pytest.mark.timeout(60)
def test_a_flag_that_is_no_number_is_one_line(capsys):
    """absl's `FATAL Flags parsing error` and its hint were two lines and exit status 1."""
    status, out, err = run_plan(capsys, "--topology=cpu:8", "--hbm_gib=abc")
    assert status == 2 and out == ""
    assert one_error_line(err) == (
        "error: flag --hbm_gib=abc: could not convert string to float: 'abc'"
    )


@pytest.mark.timeout(60)
def test_a_config_file_that_is_missing_or_fails_is_one_line(capsys):
    """A missing file was a traceback (config_flags raises it when the config is first
    read); a config's own error came as one line with its traceback flattened into it."""
    status = plan.main(["--config=/nonexistent/plan.py", "--topology=cpu:8"])
    assert status == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: --config=/nonexistent/plan.py: there is no file '/nonexistent/plan.py' (give a "
        "config file, e.g. --config=configs/tiny.py)"
    )
    status = plan.main([f"--config={TINY}:bad", "--topology=cpu:8"])
    assert status == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: flag --config={TINY}:bad: Error whilst parsing config file: ValueError: "
        "configs/tiny.py takes no argument, 'next' or 'onevision', got 'bad'"
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("topology", ["cpu:0", "cpu:abc", "cpu:", "cpu:-2", "cpu:1.5"])
def test_a_cpu_topology_without_a_device_count_names_the_accepted_form(capsys, topology):
    """cpu:0 was a raw IndexError, cpu:abc a raw ValueError, before or after JAX started."""
    status, out, err = run_plan(capsys, f"--topology={topology}")
    assert status == 2 and out == ""
    assert one_error_line(err) == (
        f"error: --topology={topology}: N in cpu:N is how many CPU devices to compile for, a "
        "whole number from 1 (e.g. --topology=cpu:8)"
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "topology, hint",
    [
        ("v7:4x4", "'v7' is not a TPU generation this plan knows (v4, v5p, v5e, v6e); "),
        ("v5litepod-16", "'v5litepod' is written v5e here (e.g. v5e-16); "),
        ("v5-8", "'v5' is written v5e or v5p here (e.g. v5e-16); "),
        ("v5e-x", "v5e is known, but 'v5e-x' is neither v5e-N nor v5e:AxB[xC]; "),
        ("tpu-v5", ""),
    ],
    ids=["v7", "v5litepod", "v5", "v5e-x", "tpu-v5"],
)
def test_an_unknown_topology_family_names_the_flag_and_the_known_ones(capsys, topology, hint):
    status, out, err = run_plan(capsys, f"--topology={topology}")
    assert status == 2 and out == ""
    assert one_error_line(err) == (
        f"error: --topology={topology}: topology {topology!r} is not known: {hint}give a TPU "
        "slice (v4-32, v5e-64, v5p-16, v6e-16), a TPU topology (v4:2x2x4, v5e:8x8, "
        "v5p:2x2x2, v6e:4x4), cpu:N or gpu"
    )


FIXES = (
    "give 3 sizes over (data, fsdp, tensor) whose product is 8, e.g. (8, 1, 1) or (1, 8, 1), "
    "or -1 for the one that takes the devices the others leave, e.g. (-1, 1, 1)"
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "shape, problem",
    [
        ("(3,1,1)", "(3, 1, 1) needs 3 devices, but --topology=cpu:8 has 8 devices: "),
        ("(2,2,1)", "(2, 2, 1) needs 4 devices, but --topology=cpu:8 has 8 devices: "),
        (
            "(-1,3,1)",
            "(-1, 3, 1) cannot be filled (--topology=cpu:8 has 8 devices): the sizes besides -1 "
            "multiply to 3, which does not divide 8; ",
        ),
        ("(0,1,1)", "(0, 1, 1) is no mesh (--topology=cpu:8 has 8 devices): "),
        ("(-2,-1,1)", "(-2, -1, 1) is no mesh (--topology=cpu:8 has 8 devices): "),
        ("(-1,-1,1)", "(-1, -1, 1) is no mesh (--topology=cpu:8 has 8 devices): "),
    ],
    ids=["3-of-8", "4-of-8", "-1-with-3", "zero", "negative", "two-minus-ones"],
)
def test_a_mesh_that_does_not_fit_the_devices_says_which_would(capsys, shape, problem):
    """It said "mesh shape {'data': 3, …} needs 3 devices, but there are 8": no flag, no
    sizes that would do."""
    status, out, err = run_plan(capsys, "--topology=cpu:8", f"--config.mesh.shape={shape}")
    assert status == 2 and out == ""
    assert one_error_line(err) == f"error: --config.mesh.shape={problem}{FIXES}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "batch, mesh, parallel, example",
    [
        (0, "(-1,1,1)", "data=8 x fsdp=1 = 8", 8),
        (-4, "(-1,1,1)", "data=8 x fsdp=1 = 8", 8),
        (12, "(-1,1,1)", "data=8 x fsdp=1 = 8", 16),
        (6, "(1,4,2)", "data=1 x fsdp=4 = 4", 8),
    ],
    ids=["0", "-4", "12-over-8", "6-over-fsdp-4"],
)
def test_a_batch_the_mesh_cannot_split_says_which_sizes_would(
    capsys, batch, mesh, parallel, example
):
    """0 said "config.data.global_batch_size=0 must be >= 1", without what would do."""
    status, out, err = run_plan(
        capsys,
        "--topology=cpu:8",
        f"--config.mesh.shape={mesh}",
        f"--config.data.global_batch_size={batch}",
    )
    assert status == 2 and out == ""
    size = parallel.rsplit(" ", 1)[1]
    assert one_error_line(err) == (
        f"error: --config.data.global_batch_size={batch}: the sequences of one step are split "
        f"over mesh {parallel} data-parallel devices, so give a multiple of {size} (e.g. "
        f"--config.data.global_batch_size={example})"
    )


def _exact_state_bytes(model_config: ModelConfig, train_pattern: str) -> tuple[int, int]:
    """(parameter bytes, Adam bytes) from the whole model's parameter tree."""
    shapes = nn.meta.unbox(abstract_params(model_config))
    leaves = jax.tree.leaves(shapes)
    sizes = [int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves]
    mask = jax.tree.leaves(trainable_mask(shapes, train_pattern))
    return sum(sizes), sum(2 * size for size, m in zip(sizes, mask, strict=True) if m)


def _model(config_file: str, *, scan: bool, **fields) -> tuple[ModelConfig, str]:
    """The model and train pattern of a config file (`path[:arg]`), with `section__field`
    changed (`text`, `lora`: of the model; `model`, `train`)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from configs import llava_v15, tiny

    name, _, arg = config_file.partition(":")
    config = (tiny if name == TINY else llava_v15).get_config(arg or None)
    config.model.scan_layers = scan
    for key, value in fields.items():
        section, field = key.split("__")
        target = {"model": config.model, "train": config.train}.get(section)
        (config.model[section] if target is None else target)[field] = value
    return ModelConfig.from_section(config.model, "config.model"), config.train.train_pattern


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "config_file, scan, fields",
    [
        (TINY, True, {}),
        (TINY, False, {}),
        # Unscanned, only layer 1's `up` and `query` train: the pattern names it by index.
        (TINY, True, {"train__train_pattern": "proj/.*|llm/layers(_1)?/(up|attn/query)/kernel"}),
        (TINY, False, {"train__train_pattern": "proj/.*|llm/layers(_1)?/(up|attn/query)/kernel"}),
        (TINY, False, {"text__tie_word_embeddings": True, "model__param_dtype": "bfloat16"}),
        (TINY + ":next", True, {"text__attention_bias": True, "text__mlp_bias": True}),
        (SEVEN_B, True, {}),  # unscanned, its 32 layers take seconds to shape
    ],
    ids=["tiny", "tiny-unscanned", "by-index", "by-index-unscanned", "tied-bf16", "next", "7b"],
)
def test_the_state_is_counted_from_a_one_layer_model_exactly(config_file, fields, scan):
    """Parameters and Adam's moments, as the whole model's tree and train mask have them,
    from a model with one layer per tower (either layout, an index in the train pattern)."""
    model_config, pattern = _model(config_file, scan=scan, **fields)
    counted = plan_checks.minimum_state_bytes(model_config, pattern)
    assert (counted.param_bytes, counted.optimizer_bytes) == _exact_state_bytes(
        model_config, pattern
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scan", [True, False])
def test_a_lora_model_is_counted_exactly_scanned_and_at_most_its_size_unscanned(scan):
    """Unscanned, a LoRA target may name layers by index: each layer counts as the smaller
    of adapted and not, so the count never exceeds the model (a lower bound)."""
    fields = {"lora__rank": 4, "lora__base_dtype": "int8", "train__train_pattern": "proj/.*"}
    model_config, pattern = _model(TINY, scan=scan, **fields)
    counted = plan_checks.minimum_state_bytes(model_config, pattern)
    params, moments = _exact_state_bytes(model_config, pattern)
    assert counted.param_bytes == params
    if scan:
        assert counted.optimizer_bytes == moments
    else:
        assert 0 < counted.optimizer_bytes <= moments


@pytest.mark.timeout(60)
def test_the_state_refusal_is_at_the_whole_slices_memory():
    """Refused only past num_devices x memory: one byte over, not at it."""
    state = plan_checks.StateBytes(
        param_bytes=3000, optimizer_bytes=1000, layers={"text": (2, 1000)}
    )
    plan_checks.check_state_fits(state, 4, 1000, "on cpu:4", memory_flag=True)
    with pytest.raises(ValueError, match=r"but 4 x 999 B is 3.9 KiB in all \(at least 5 such"):
        plan_checks.check_state_fits(state, 4, 999, "on cpu:4", memory_flag=True)


@pytest.mark.timeout(60)
def test_a_scanned_model_no_slice_of_that_size_holds_is_refused_before_compiling(capsys):
    """A million scanned layers: it compiled the step (14.5 s on a TPU slice) to say "does
    NOT fit"; now one line from the architecture, before any program is built."""
    start = time.perf_counter()
    status, out, err = run_plan(
        capsys, "--topology=cpu:8", "--hbm_gib=16", "--config.model.text.num_layers=1000000"
    )
    assert status == 2 and out == ""
    line = one_error_line(err)
    assert line.startswith(
        "error: the model cannot fit on cpu:8 (8 x cpu, 16.0 GiB each) even with every array "
        "sharded over all 8 devices: its parameters alone take 550.3 GiB (1000000 decoder "
        "layers of 577.0 KiB each) and Adam's moments of the trainable ones at least 1.1 TiB "
        "more, but 8 x 16.0 GiB is 128.0 GiB in all (at least 104 such devices would be needed)"
    )
    assert line.endswith(
        "Plan for a larger slice (--topology), more memory per device (--hbm_gib), a smaller "
        "model (e.g. --config.model.text.num_layers) or fewer trainable parameters "
        "(--config.train.train_pattern)"
    )
    assert time.perf_counter() - start < 10


@pytest.mark.timeout(60)
def test_a_million_unscanned_layers_are_refused_in_seconds_and_little_memory(tmp_path):
    """It grew past 4.5 GB for 150 s without an answer (building the unscanned model).
    Now refused from the architecture: under 20 s and 1.5 GiB peak resident memory for
    the whole `python -m llava_jax.plan` process (libtpu included: a TPU slice's memory)."""
    args = [
        "--config=configs/tiny.py",
        "--topology=v5e:2x2",
        "--config.model.text.num_layers=1000000",
        "--config.model.scan_layers=false",
    ]
    env = dict(os.environ, TPU_WORKER_HOSTNAMES="localhost")
    start = time.perf_counter()
    try:
        done, peak_mib = run_with_peak_memory(
            "llava_jax.plan", args, tmp_path / "peak", cwd=ROOT, env=env, timeout=20
        )
    except subprocess.TimeoutExpired:
        pytest.fail("no answer in 20 s")
    seconds = time.perf_counter() - start
    peak_bytes = peak_mib * 2**20
    err = done.stderr
    # libtpu may print its own start-up warning; the program's answer is one error line.
    lines = [line for line in err.splitlines() if not line.startswith("Failed to find host")]
    assert done.returncode == 2, err
    assert one_error_line("\n".join(lines)).startswith(
        "error: the model cannot fit on v5e:2x2 (4 x TPU v5e, 16.0 GiB each) even with every "
        "array sharded over all 4 devices: its parameters alone take 550.3 GiB (1000000 "
        "decoder layers of 577.0 KiB each)"
    )
    assert seconds < 20 and peak_bytes < 1.5 * 1024**3, (seconds, peak_bytes)
