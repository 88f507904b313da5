"""LoRA on the vision tower: the adapters act (and learn) in the scanned layout as in the
unscanned one, whichever hidden state LLaVA takes (−2 runs a slice of the scanned stack), and
their dropout draws from the caller's rng there too."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from test_lora import _inputs, _our_logits, _randomize_factors, _without_tower_adapters
from train_fixtures import TINY, make_batch

from llava_jax.models.config import LoraConfig
from llava_jax.models.llava import Llava, init_params, to_unscanned_layout

VISION_LORA = LoraConfig(rank=2, alpha=4.0, target=r"img/layers(_\d+)?/(attn/query|fc2)")
# -2: one layer of TINY's two (a slice of the scanned stack); -1: the whole stack;
# (-2, -1): two slices, each run on its own.
FEATURE_LAYERS = [-2, -1, (-2, -1)]


def _vision_lora(feature_layer, lora: LoraConfig = VISION_LORA):
    """A scanned TINY with vision adapters (random non-zero factors) and the same model
    unscanned: (scanned config, params), (unscanned config, params)."""
    config = dataclasses.replace(TINY, vision_feature_layer=feature_layer, lora=lora)
    params = _randomize_factors(init_params(config, jax.random.key(0)), seed=2, scale=0.5)
    unscanned = dataclasses.replace(config, scan_layers=False)
    return (config, params), (unscanned, to_unscanned_layout(params, config))


@pytest.mark.parametrize("feature_layer", FEATURE_LAYERS, ids=str)
def test_vision_lora_moves_the_logits_the_same_in_both_layouts(feature_layer):
    (config, params), (unscanned, unscanned_params) = _vision_lora(feature_layer)
    assert {k[:2] for k in flatten_dict(params) if k[-1] == "lora_a"} == {("img", "layers")}
    inputs = _inputs(make_batch(0, batch_size=2))
    scanned_logits = _our_logits(config, params, inputs)
    unscanned_logits = _our_logits(unscanned, unscanned_params, inputs)
    base = _our_logits(config, _without_tower_adapters(params, "img"), inputs)
    assert np.abs(scanned_logits - base).max() > 1e-3, "the vision adapters changed nothing"
    assert np.abs(unscanned_logits - base).max() > 1e-3
    np.testing.assert_allclose(scanned_logits, unscanned_logits, atol=1e-5, rtol=0)


def test_vision_adapters_get_the_same_gradients_in_both_layouts():
    """LLaVA's −2 on a two-layer tower: layer 0's adapters learn; layer 1 never runs."""
    (config, params), (unscanned, unscanned_params) = _vision_lora(-2)
    inputs = _inputs(make_batch(1, batch_size=2))
    weights = np.random.default_rng(0).standard_normal((2, 16, TINY.text.vocab_size))

    def gradients(model_config, model_params):
        def loss(p):
            logits = Llava(model_config).apply({"params": p}, **inputs)
            return (logits * weights).sum()

        return flatten_dict(jax.jit(jax.grad(loss))(model_params))

    scanned = gradients(config, params)
    per_layer = gradients(unscanned, unscanned_params)
    adapters = [k for k in scanned if k[0] == "img" and k[-1] in ("lora_a", "lora_b")]
    assert len(adapters) == 4  # query and fc2, a and b, stacked over the layers
    for key in adapters:
        first, second = (per_layer[(key[0], f"layers_{i}", *key[2:])] for i in (0, 1))
        # layer 0 runs: its adapters learn, in both layouts; layer 1 is skipped by -2
        assert np.abs(scanned[key][0]).max() > 1e-4, f"{key}: no gradient (scanned)"
        assert np.abs(first).max() > 1e-4, f"{key}: no gradient (unscanned)"
        assert not np.any(second), key
        np.testing.assert_allclose(scanned[key][0], first, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(scanned[key][1], second, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_vision_lora_dropout_draws_from_the_dropout_rng(scan):
    lora = dataclasses.replace(VISION_LORA, dropout=0.5)
    layouts = _vision_lora(-2, lora)
    config, params = layouts[0 if scan else 1]
    inputs = _inputs(make_batch(2, batch_size=2))
    model = Llava(config)

    def logits(seed: int | None) -> np.ndarray:
        rngs = {} if seed is None else {"rngs": {"dropout": jax.random.key(seed)}}
        return np.asarray(model.apply({"params": params}, **inputs, **rngs))

    deterministic, first, again, second = logits(None), logits(0), logits(0), logits(1)
    np.testing.assert_array_equal(first, again)  # the masks come from the rng alone
    assert np.abs(first - deterministic).max() > 1e-4, "no dropout ran on the vision adapters"
    assert np.abs(first - second).max() > 1e-4, "the dropout masks ignore the rng"
    # only the adapters' inputs are dropped: without adapters the rng changes nothing
    plain = _without_tower_adapters(params, "img")
    np.testing.assert_allclose(
        np.asarray(model.apply({"params": plain}, **inputs, rngs={"dropout": jax.random.key(0)})),
        np.asarray(model.apply({"params": plain}, **inputs)),
        atol=1e-6,
    )
