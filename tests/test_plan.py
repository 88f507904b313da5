"""The ahead-of-time plan: a TPU slice compiled on this CPU machine, per-device bytes, the
batch search, and clear errors for unknown topologies and meshes that do not divide."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from llava_jax.hardware import tpu_topology_name
from llava_jax.models.config import ModelConfig
from llava_jax.models.llava import abstract_params
from llava_jax.plan import largest_device_batch, plan_devices, plan_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(mesh=(-1, 1, 1), **overrides):
    sys.path.insert(0, ROOT)
    from configs.tiny import get_config

    config = get_config()
    config.mesh.shape = mesh
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def _decoder_dense_shapes(text) -> list[tuple[int, int]]:
    """(inputs, outputs) of one LLaMA decoder layer's dense layers: q, k, v, o, gate, up,
    down (no biases)."""
    hidden, inter = text.hidden_size, text.intermediate_size
    head_dim = text.head_dim or hidden // text.num_heads
    queries, keys = text.num_heads * head_dim, text.num_kv_heads * head_dim
    return [(hidden, queries), (hidden, keys), (hidden, keys), (queries, hidden)] + [
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]


def _llava_param_count(model) -> int:
    """LLaVA's parameters counted by hand from the config's sizes, as transformers'
    `LlavaForConditionalGeneration(...).num_parameters()` counts them (435,072 for
    configs/tiny.py): a CLIP vision tower (patch embedding without bias, class and position
    embeddings, pre- and post-LayerNorm, per layer q/k/v/o and fc1/fc2 with biases and two
    LayerNorms), an `mlp{N}x_gelu` projector with biases, a LLaMA decoder (embedding, per
    layer the dense layers without biases and two RMSNorm scales, a final norm, an untied
    LM head). Independent of the model code, unlike its abstract parameter tree."""
    vision, text = model.vision, model.text
    width, inter = vision.hidden_size, vision.intermediate_size
    patches = (vision.image_size // vision.patch_size) ** 2
    vision_count = (
        vision.patch_size**2 * vision.num_channels * width  # patch embedding
        + width  # class embedding
        + (patches + 1) * width  # position embedding
        + 2 * 2 * width  # pre- and post-LayerNorm
        + vision.num_layers
        * (4 * (width * width + width) + 2 * 2 * width + 2 * width * inter + inter + width)
    )
    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", model.projector).group(1))
    hidden = text.hidden_size
    projector_count = (width * hidden + hidden) + (depth - 1) * (hidden * hidden + hidden)
    layer_count = sum(i * o for i, o in _decoder_dense_shapes(text)) + 2 * hidden
    decoder_count = (
        2 * text.vocab_size * hidden + text.num_layers * layer_count + hidden  # final norm
    )
    return vision_count + projector_count + decoder_count


def test_plans_the_tiny_config_for_a_tpu_slice():
    """Compiled by libtpu for 4 v5e chips, without a TPU: the per-device bytes follow the
    mesh (replicated under data parallelism, about a quarter under FSDP)."""
    devices = plan_devices("v5e:2x2")
    assert [d.platform for d in devices] == ["tpu"] * 4
    data = plan_train_step(tiny((-1, 1, 1)), devices, "v5e:2x2")
    assert data.chip == "TPU v5e" and data.hbm_bytes == 16 * 1024**3
    assert data.fits and data.temp_bytes > 0 and data.compile_seconds > 0
    assert data.param_bytes == 4 * _llava_param_count(tiny().model)  # float32
    # Adam's two moments of every (trainable) parameter, and its step counters.
    assert 2 * data.param_bytes <= data.optimizer_bytes <= 2 * data.param_bytes + 64
    assert data.device_batch == 32 // 4
    fsdp = plan_train_step(tiny((1, -1, 1)), devices, "v5e:2x2")
    assert fsdp.param_bytes < data.param_bytes / 3


def test_cli_prints_the_plan(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_jax.plan",
            "--config=configs/tiny.py",
            "--topology=v5e-4",
            "--search_batch=false",
            "--config.model.remat_policy=full",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "on v5e-4: 4 x TPU v5e (16.0 GiB each)" in out
    for row in ("parameters", "optimizer state", "temporaries", "total per device", "compile"):
        assert row in out
    assert ": fits" in out


@pytest.mark.parametrize(
    "topology, message",
    [
        ("v7:4x4", "topology 'v7:4x4' is not known"),
        ("v4-31", "TPU slice 'v4-31' is not one this plan knows"),
        ("v5e:2x2x2", "v5e slices are 2-dimensional"),
    ],
)
def test_unknown_topologies_are_refused(topology, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        tpu_topology_name(topology)


def test_cli_error_is_one_line_and_exit_2():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_jax.plan",
            "--config=configs/tiny.py",
            "--topology=v9-8",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "error: --topology=v9-8: topology 'v9-8' is not known" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_mesh_that_does_not_divide_the_model_is_refused():
    # 4 query heads and 2 KV heads cannot be split 8 ways over `tensor`.
    with pytest.raises(ValueError, match=r"does not divide the model.*heads=4 over tensor=8"):
        plan_train_step(tiny((1, 1, 8)), jax.devices()[:8], "cpu:8")


def test_batch_search_finds_the_largest_batch_that_fits():
    """Against a made-up memory size: the answer fits, one more sequence does not."""
    config = tiny((-1, 1, 1))
    devices = jax.devices()[:8]
    one = plan_train_step(config, devices, "cpu:8", device_batch=1)
    two = plan_train_step(config, devices, "cpu:8", device_batch=2)
    per_sequence = two.total_bytes - one.total_bytes
    assert per_sequence > 0
    budget = int(one.total_bytes + 2.5 * per_sequence)
    first = dataclasses.replace(one, hbm_bytes=budget)  # the same program, a smaller chip
    largest, plans = largest_device_batch(config, devices, "cpu:8", first, known=[two])
    by_size = {plan.device_batch: plan for plan in plans}
    assert largest >= 1 and by_size[largest].fits
    assert largest + 1 in by_size and not by_size[largest + 1].fits


def test_lora_plan_counts_the_int8_base_and_only_trainable_optimizer_state():
    """A LoRA run with an int8 base: parameters count each int8 kernel at one byte (plus its
    float32 scales), the optimizer holds Adam's moments of the adapters and projector only,
    and the frozen base passes through the donated step without a second copy."""
    from llava_jax.train.optimizer import trainable_mask

    config = tiny((-1, 1, 1), train__train_pattern="proj/.*")
    rank = config.model.lora.rank = 4
    config.model.lora.dropout = 0.05
    config.model.lora.base_dtype = "int8"
    shapes = nn.meta.unbox(abstract_params(ModelConfig.from_section(config.model, "config.model")))
    dtypes = {x.dtype for x in jax.tree.leaves(shapes)}
    assert np.dtype(np.int8) in dtypes
    # By hand: the default LoRA target adapts every dense layer of every decoder layer; each
    # such kernel is stored in int8 (3 bytes less per weight than float32) with a float32
    # scale per output, and gains float32 factors `lora_a [inputs, rank]`, `lora_b [rank,
    # outputs]`. The projector (`proj/.*`) and the factors are what trains.
    dense = _decoder_dense_shapes(config.model.text) * config.model.text.num_layers
    float_bytes = 4 * _llava_param_count(config.model)
    int8_saving = sum(3 * i * o - 4 * o for i, o in dense)
    factor_bytes = sum(4 * rank * (i + o) for i, o in dense)
    vision, hidden = config.model.vision.hidden_size, config.model.text.hidden_size
    projector_bytes = 4 * (vision * hidden + hidden + hidden * hidden + hidden)  # mlp2x_gelu
    trainable = projector_bytes + factor_bytes
    mask = trainable_mask(shapes, "proj/.*")
    assert trainable == sum(  # the mask the optimizer is built with agrees
        int(np.prod(x.shape)) * x.dtype.itemsize
        for x, m in zip(jax.tree.leaves(shapes), jax.tree.leaves(mask), strict=True)
        if m
    )
    devices = plan_devices("v5e:2x2")
    plan = plan_train_step(config, devices, "v5e:2x2")
    assert plan.fits and plan.temp_bytes > 0
    assert plan.param_bytes == float_bytes - int8_saving + factor_bytes
    assert plan.param_bytes < float_bytes  # int8 kernels, though adapters were added
    assert 2 * trainable <= plan.optimizer_bytes <= 2 * trainable + 64
    assert plan.optimizer_bytes < plan.param_bytes
    # The new state is written over the donated one: frozen leaves are not counted twice.
    assert plan.output_bytes - plan.alias_bytes < plan.param_bytes // 10
