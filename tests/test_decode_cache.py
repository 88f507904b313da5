"""Decoding over the heads-major KV cache: `cache_attention` equals the reference, unscanned
layers (one cache buffer per layer) generate what transformers and the scanned layers do,
quantized parameters go onto a mesh, and `load_model(scan_layers=...)` relayouts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import Generator, hf_greedy, make_prompts, models  # noqa: F401 - fixture

from llava_jax.inference import Engine, SamplingConfig
from llava_jax.models.attention import cache_attention, reference_attention
from llava_jax.models.llava import to_unscanned_layout
from llava_jax.models.quantize import quantize_params
from llava_jax.sharding import make_mesh


@pytest.mark.parametrize("length, heads, kv_heads", [(1, 6, 2), (1, 4, 4), (5, 6, 3)])
def test_cache_attention_equals_reference_attention(length, heads, kv_heads):
    batch, slots, dim = 2, 11, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, dim))
    k = jax.random.normal(keys[1], (batch, slots, kv_heads, dim))
    v = jax.random.normal(keys[2], (batch, slots, kv_heads, dim))
    # Each query sees a random nonempty set of slots (its own slot always).
    mask = jax.random.bernoulli(keys[3], 0.6, (batch, length, slots))
    mask = mask.at[:, jnp.arange(length), slots - length + jnp.arange(length)].set(True)
    expected = reference_attention(q, k, v, mask)
    # The cache's layouts: keys [B, K, D, S], values [B, K, S, D].
    got = cache_attention(q, jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3)), mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)
    unmasked = cache_attention(
        q, jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3)), None
    )
    np.testing.assert_allclose(
        np.asarray(unmasked), np.asarray(reference_attention(q, k, v, None)), atol=1e-5
    )


def _unscanned(config, params):
    return dataclasses.replace(config, scan_layers=False), to_unscanned_layout(params, config)


@pytest.mark.parametrize("name", ["gqa_default_select", "llama3_rope_layer_list_biases"])
def test_unscanned_greedy_equals_transformers_and_scanned(models, name):  # noqa: F811
    hf_config, model, config, params = models(name)
    prompts, images, image_mask = make_prompts(hf_config, [19, 11, 30], [1, 0, 2], seed=4)
    sampling = SamplingConfig(max_new_tokens=12)
    unscanned = Generator(*_unscanned(config, params))
    result = unscanned.generate(prompts, images, image_mask, sampling, return_logits=True)
    assert unscanned.engine.trace_counts["decode"] == 1
    expected = hf_greedy(model, prompts, images, image_mask, 12)
    np.testing.assert_array_equal(np.stack(result.tokens), expected)
    scanned = Generator(config, params).generate(
        prompts, images, image_mask, sampling, return_logits=True
    )
    np.testing.assert_array_equal(np.stack(result.tokens), np.stack(scanned.tokens))
    for ours, theirs in zip(result.logits, scanned.logits, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scan_layers", [True, False])
def test_engine_places_quantized_params_on_a_mesh(models, scan_layers):  # noqa: F811
    hf_config, _, config, params = models("gqa_default_select")
    if not scan_layers:
        config, params = _unscanned(config, params)
    quantized = quantize_params(config, params)
    mesh = make_mesh((2, 2, 2))
    engine = Engine(config, mesh=mesh)
    placed = engine.place(quantized)
    layers = placed["llm"]["layers" if scan_layers else "layers_0"]
    gate = layers["gate"]
    assert gate["kernel_int8"].dtype == jnp.int8
    leading = (None,) if scan_layers else ()
    assert gate["kernel_int8"].sharding.spec == jax.sharding.PartitionSpec(
        *leading, "fsdp", "tensor"
    )
    assert gate["scale"].sharding.spec == jax.sharding.PartitionSpec(*leading, "tensor")
    prompts, images, image_mask = make_prompts(hf_config, [12, 7], [1, 0], seed=6)
    sampling = SamplingConfig(max_new_tokens=6)
    result = engine.generate(placed, prompts, images, image_mask, sampling)
    expected = Generator(config, quantized).generate(prompts, images, image_mask, sampling)
    for ours, reference in zip(result.tokens, expected.tokens, strict=True):
        np.testing.assert_array_equal(ours, reference)


@pytest.mark.timeout(300)
def test_load_model_in_the_unscanned_layout(tmp_path):
    from hf_reference import tiny_hf_config, tiny_hf_model
    from test_inference_cli import save_word_tokenizer

    from llava_jax.inference.load import load_model

    tiny_hf_model(tiny_hf_config(), seed=3).save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path)
    saved = load_model(str(tmp_path))
    assert saved.config.scan_layers and "layers" in saved.params["llm"]
    per_layer = load_model(str(tmp_path), scan_layers=False)
    assert not per_layer.config.scan_layers and "layers_0" in per_layer.params["llm"]
    on_mesh = load_model(
        str(tmp_path), scan_layers=False, quantize="int8", mesh=make_mesh((2, 2, 2))
    )
    kernel = on_mesh.params["llm"]["layers_1"]["up"]["kernel_int8"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    quantized = load_model(str(tmp_path), quantize="int8")
    ids = saved.prompt_ids([saved.user_turn("What color are the objects?", with_image=False)])
    tokens = [
        m.generate([ids], None, None, m.sampling(8)).tokens[0]
        for m in (saved, per_layer, quantized, on_mesh)
    ]
    np.testing.assert_array_equal(tokens[0], tokens[1])
    np.testing.assert_array_equal(tokens[2], tokens[3])
