"""The `mlp3x_gelu` projector computes what LLaVA's does: its output equals that of the torch
module LLaVA's own `build_vision_projector` (`llava/model/multimodal_projector/builder.py`
of the `llava-torch` package: Linear, GELU, Linear, GELU, Linear, with torch's exact erf
GELU) holding the same weights. transformers' LLaVA has only the two-layer projector."""

from __future__ import annotations

import dataclasses
import importlib.util
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from llava_reference import package_root
from test_quantize import tiny_config

from llava_jax.models.llava import Llava, abstract_params


def llava_build_vision_projector():
    """LLaVA's `build_vision_projector`, loaded from its file: `llava/model/__init__.py`
    imports LLaVA's whole model zoo (for the transformers of 2024), which it does not need."""
    path = package_root() / "model" / "multimodal_projector" / "builder.py"
    spec = importlib.util.spec_from_file_location("llava_projector_builder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_vision_projector


@pytest.mark.timeout(120)
def test_mlp3x_gelu_projector_equals_llavas():
    config = dataclasses.replace(tiny_config(), projector="mlp3x_gelu")  # test_quantize's
    rng = np.random.default_rng(0)

    # Weights of 1/sqrt(inputs) and biases of 0.5: every GELU's inputs spread over about
    # [-3, 3], where exact GELU and its tanh approximation differ by up to ~5e-4.
    def draw(path, leaf):
        scale = 0.5 if path[-1].key == "bias" else 1 / np.sqrt(leaf.shape[0])
        return (scale * rng.standard_normal(leaf.shape)).astype(np.float32)

    proj = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract_params(config))["proj"])
    assert sorted(proj) == ["fc1", "fc2", "fc3"]
    features = rng.standard_normal((2, 4, config.vision.hidden_size)).astype(np.float32)
    ours = np.asarray(
        Llava(config).apply({"params": {"proj": proj}}, features, method=lambda m, x: m.proj(x))
    )

    llava_config = types.SimpleNamespace(
        mm_projector_type="mlp3x_gelu",
        mm_hidden_size=config.vision.hidden_size,
        hidden_size=config.text.hidden_size,
    )
    theirs = llava_build_vision_projector()(llava_config).double()
    assert [type(m).__name__ for m in theirs] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert theirs[1].approximate == "none"  # nn.GELU(): the exact, erf GELU
    with torch.no_grad():
        for index, name in zip((0, 2, 4), ("fc1", "fc2", "fc3"), strict=True):
            # torch's Linear keeps weight [out, in]; ours, kernel [in, out]
            theirs[index].weight.copy_(torch.from_numpy(proj[name]["kernel"].T.copy()))
            theirs[index].bias.copy_(torch.from_numpy(proj[name]["bias"]))
        reference = theirs(torch.from_numpy(features).double()).numpy()

    assert ours.shape == reference.shape == (2, 4, config.text.hidden_size)
    assert np.abs(reference).max() > 1  # outputs of order 1: the tolerance is relative too
    # float32 against float64: three matmuls of 48-64 inputs round at about 1e-6.
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_the_llava_reference_loads_again_in_one_process():
    """`llava_reference.load` registers `llava` without a spec; a second load (another
    test file in the same xdist worker) finds the package from the registered module."""
    import llava_reference

    first, second = llava_reference.load(), llava_reference.load()
    assert first.conversation is second.conversation
    assert (package_root() / "train" / "train.py").is_file()
