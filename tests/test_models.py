"""Model properties beyond parity: axis names, dtypes, static shapes, remat, config errors."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models.config import REMAT_POLICIES, ModelConfig, TextConfig, VisionConfig
from llava_jax.models.llava import Llava, abstract_params, dummy_inputs, init_params

TINY = ModelConfig(
    vision=VisionConfig(
        hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, patch_size=7, image_size=14
    ),
    text=TextConfig(
        vocab_size=40,
        hidden_size=24,
        intermediate_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    ),
    image_token_id=39,
)
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers", None}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_parameter_carries_logical_axis_names(scan_layers):
    config = dataclasses.replace(TINY, scan_layers=scan_layers)
    boxed = abstract_params(config)
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    assert leaves
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
        assert set(leaf.names) <= LOGICAL_NAMES, leaf.names
        is_layer = "layers" in jax.tree_util.keystr(path)
        assert (leaf.names[0] == "layers") == (scan_layers and is_layer)


def test_param_dtype_and_compute_dtype_are_separate():
    config = dataclasses.replace(TINY, dtype="bfloat16", param_dtype="bfloat16")
    params = init_params(config, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
    f32_params = init_params(dataclasses.replace(TINY, dtype="bfloat16"), jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(f32_params)} == {jnp.dtype("float32")}
    inputs = dummy_inputs(config, batch_size=2)
    logits = jax.jit(Llava(config).apply)({"params": params}, **inputs)
    assert logits.dtype == jnp.float32


def test_one_compilation_serves_batches_with_images_in_different_places():
    params = init_params(TINY, jax.random.key(0))
    per_image = TINY.num_image_tokens
    traces = []

    @jax.jit
    def forward(params, ids, images, image_mask):
        traces.append(1)
        return Llava(TINY).apply({"params": params}, ids, images, image_mask)

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((2, 2, 1, 14, 14, 3)), jnp.float32)
    for start, mask in ((0, [[True, False], [True, True]]), (5, [[False, False], [True, False]])):
        ids = np.full((2, 20), 3, np.int32)
        for b, row in enumerate(mask):
            for k, valid in enumerate([m for m in row if m]):
                ids[b, start + k * per_image : start + (k + 1) * per_image] = TINY.image_token_id
                assert valid
        forward(params, jnp.asarray(ids), images, jnp.asarray(mask))
    assert len(traces) == 1


def test_masked_out_image_slots_are_skipped_in_order():
    """With image_mask [False, True], the image tokens take image 1, as [True] on image 1."""
    params = init_params(TINY, jax.random.key(0))
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((1, 2, 1, 14, 14, 3)), jnp.float32)
    ids = np.full((1, 12), 5, np.int32)
    ids[0, 2 : 2 + TINY.num_image_tokens] = TINY.image_token_id
    model = Llava(TINY)
    apply = jax.jit(model.apply)
    skipped = apply({"params": params}, ids, images, jnp.asarray([[False, True]]))
    alone = apply({"params": params}, ids, images[:, 1:], jnp.asarray([[True]]))
    np.testing.assert_allclose(skipped, alone, atol=1e-6)
    other = apply({"params": params}, ids, images[:, :1], jnp.asarray([[True]]))
    assert np.abs(np.asarray(other) - np.asarray(alone)).max() > 1e-3


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policies_keep_loss_and_gradients(policy):
    params = init_params(TINY, jax.random.key(0))
    inputs = dummy_inputs(TINY, batch_size=2)

    def loss(params, config):
        logits = Llava(config).apply({"params": params}, **inputs)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    reference = value_and_grad(params, TINY)
    rematted = value_and_grad(params, dataclasses.replace(TINY, remat_policy=policy))
    np.testing.assert_allclose(reference[0], rematted[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(reference[1]), jax.tree.leaves(rematted[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scan_layers, remat_policy", [(True, "none"), (False, "full")])
def test_vision_tower_stops_at_the_deepest_selected_layer(scan_layers, remat_policy):
    """With LLaVA's -2 the last vision layer never runs: changing its weights changes
    nothing, bit for bit (and it gets no gradient); with -1 it does."""
    config = ModelConfig(
        vision=dataclasses.replace(TINY.vision, num_layers=3),
        text=TINY.text,
        image_token_id=TINY.image_token_id,
        vision_feature_layer=-2,
        scan_layers=scan_layers,
        remat_policy=remat_policy,
    )
    params = init_params(config, jax.random.key(0))
    inputs = dummy_inputs(config, batch_size=2)
    inputs["images"] = jax.random.normal(jax.random.key(1), inputs["images"].shape)
    layers = params["img"]
    if scan_layers:
        changed = jax.tree.map(lambda p: p.at[-1].add(1.0), layers["layers"])
        other = {**params, "img": {**layers, "layers": changed}}
    else:
        changed = jax.tree.map(lambda p: p + 1.0, layers["layers_2"])
        other = {**params, "img": {**layers, "layers_2": changed}}

    def logits(params, config):
        return Llava(config).apply({"params": params}, **inputs)

    run = jax.jit(logits, static_argnums=1)
    np.testing.assert_array_equal(run(params, config), run(other, config))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(logits(p, config) ** 2)))(params)
    last = grads["img"]["layers"] if scan_layers else grads["img"]["layers_2"]
    for leaf in jax.tree.leaves(last):
        assert not np.asarray(leaf[-1] if scan_layers else leaf).any()
    deepest = dataclasses.replace(config, vision_feature_layer=-1)
    assert np.abs(np.asarray(run(params, deepest) - run(other, deepest))).max() > 1e-3


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(remat_policy="sometimes"), "remat_policy='sometimes'"),
        (dict(projector="mlp2x_relu"), "projector='mlp2x_relu'"),
        (dict(vision_feature_layer=5), "vision_feature_layer=5"),
        (dict(vision_feature_select_strategy="cls"), "vision_feature_select_strategy='cls'"),
        (dict(projector="identity"), "projector='identity'"),
        (dict(attention="flash"), "attention='flash'"),
    ],
)
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        dataclasses.replace(TINY, **change)


def test_config_dict_round_trip_and_unknown_keys():
    config = dataclasses.replace(TINY, vision_feature_layer=(0, -1))
    assert ModelConfig.from_section(config.to_dict(), "model") == config
    bad = config.to_dict()
    bad["text"]["num_layer"] = 3
    with pytest.raises(ValueError, match=r"model\.text: unknown key\(s\) \['num_layer'\]"):
        ModelConfig.from_section(bad, "model")
