"""KV-cache decoding (prefill, then one token at a time) equals the full forward pass."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import make_inputs, tiny_hf_config, tiny_hf_model

from llava_jax.convert import load_hf
from llava_jax.models.llama import init_cache
from llava_jax.models.llava import Llava

STEPS = 8


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    hf_config = tiny_hf_config()
    tiny_hf_model(hf_config).save_pretrained(directory)
    config, params = load_hf(str(directory))
    return hf_config, config, params


@pytest.mark.parametrize("scan_layers, per_layer", [(True, False), (False, False), (False, True)])
def test_prefill_then_single_steps_equal_full_forward(converted, scan_layers, per_layer):
    hf_config, config, params = converted
    if not scan_layers:
        from llava_jax.models.llava import to_unscanned_layout

        params = to_unscanned_layout(params, config)
    config = dataclasses.replace(config, scan_layers=scan_layers)
    prompt_length = 20
    inputs = make_inputs(hf_config, [1, 2], length=prompt_length + STEPS, seed=3)
    model = Llava(config)
    full = model.apply(
        {"params": params},
        jnp.asarray(inputs["input_ids"]),
        jnp.asarray(inputs["images"]),
        jnp.asarray(inputs["image_mask"]),
    )

    cache = init_cache(
        config.text, batch_size=2, max_length=40, dtype=jnp.float32, per_layer=per_layer
    )
    decode = jax.jit(
        lambda p, ids, c, *imgs: model.apply({"params": p}, ids, c, *imgs, method=Llava.decode)
    )
    logits, cache = decode(
        params,
        jnp.asarray(inputs["input_ids"][:, :prompt_length]),
        cache,
        jnp.asarray(inputs["images"]),
        jnp.asarray(inputs["image_mask"]),
    )
    stepped = [logits[:, -1]]
    for t in range(prompt_length, prompt_length + STEPS - 1):
        logits, cache = decode(params, jnp.asarray(inputs["input_ids"][:, t : t + 1]), cache)
        stepped.append(logits[:, 0])
    stepped = np.stack(stepped, axis=1)
    expected = np.asarray(full)[:, prompt_length - 1 : prompt_length + STEPS - 1]
    assert int(cache["index"]) == prompt_length + STEPS - 1
    assert np.abs(stepped - expected).max() <= 1e-4


def test_left_padded_prompts_decode_like_their_unpadded_selves(converted):
    """A left-padded row, decoded with the cache, gives the logits of the same prompt alone."""
    hf_config, config, params = converted
    model = Llava(config)
    inputs = make_inputs(hf_config, [0, 0], length=16, seed=5)
    pad = 5
    ids = inputs["input_ids"].copy()
    ids[1, :pad] = 0
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    cache = init_cache(config.text, batch_size=2, max_length=24, dtype=jnp.float32)
    logits, cache = model.apply(
        {"params": params},
        jnp.asarray(ids),
        cache,
        None,
        None,
        jnp.asarray(mask),
        method=Llava.decode,
    )
    next_token = jnp.asarray([[7], [7]], jnp.int32)
    step_logits, _ = model.apply({"params": params}, next_token, cache, method=Llava.decode)

    alone_ids = np.concatenate([ids[1:, pad:], [[7]]], axis=1)
    alone = np.asarray(model.apply({"params": params}, jnp.asarray(alone_ids)))
    np.testing.assert_allclose(np.asarray(logits)[1, pad:], alone[0, :-1], atol=1e-4)
    np.testing.assert_allclose(np.asarray(step_logits)[1, 0], alone[0, -1], atol=1e-4)


# --- the cache is updated in place --------------------------------------------------------


def _long_cache_model(scan_layers: bool):
    """A tiny 4-layer decoder whose KV cache (k, v: 4 MiB each at 4 x 4096) dominates."""
    from llava_jax.models.config import ModelConfig, TextConfig, VisionConfig
    from llava_jax.models.llava import init_params, to_unscanned_layout

    config = ModelConfig(
        vision=VisionConfig(
            hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, image_size=28
        ),
        text=TextConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=8192,
        ),
        image_token_id=63,
        scan_layers=scan_layers,
    )
    params = init_params(config, jax.random.key(0))
    if not scan_layers:
        params = to_unscanned_layout(params, config)
    return config, params


def _assert_cache_in_place(compiled, cache_bytes: int):
    """The cache's buffers are the outputs' (aliased), and no second cache lives meanwhile:
    the compiler's temporaries stay under half the cache (one layer's slice is a quarter)."""
    assert "input_output_alias" in compiled.as_text()
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes >= cache_bytes
    assert memory.temp_size_in_bytes < cache_bytes / 2, (memory.temp_size_in_bytes, cache_bytes)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_decode_step_updates_the_donated_cache_in_place(scan_layers):
    config, params = _long_cache_model(scan_layers)
    model = Llava(config)
    cache = init_cache(config.text, batch_size=4, max_length=4096, dtype=jnp.float32)
    cache_bytes = cache["k"].nbytes + cache["v"].nbytes  # 8 MiB
    step = jax.jit(
        lambda p, ids, c: model.apply({"params": p}, ids, c, method=Llava.decode),
        donate_argnums=2,
    )
    ids = jnp.ones((4, 1), jnp.int32)
    _assert_cache_in_place(step.lower(params, ids, cache).compile(), cache_bytes)
    _, new_cache = step(params, ids, cache)
    assert cache["k"].is_deleted() and new_cache["k"].shape == (4, 4, 2, 8, 4096)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_the_engine_decode_loop_donates_and_updates_the_cache_in_place(scan_layers):
    from llava_jax.inference import Engine, SamplingConfig
    from llava_jax.inference.programs import PromptBatch

    config, params = _long_cache_model(scan_layers)
    engine = Engine(config)
    sampling = engine.sampling_params(SamplingConfig(max_new_tokens=16))
    rows, length = 4, 4096 - 16
    batch = PromptBatch(
        input_ids=jnp.ones((rows, length), jnp.int32),
        attention_mask=jnp.ones((rows, length), jnp.int32),
        images=None,
        image_mask=None,
        filler=jnp.zeros((rows,), bool),
    )
    static = dict(capacity=16, greedy=True, return_logits=False, cache_dtype=jnp.float32)
    state = jax.eval_shape(lambda: engine._prefill(params, batch, sampling, **static))
    buffers = jax.tree.leaves((state.cache["k"], state.cache["v"]))
    cache_bytes = sum(x.size * 4 for x in buffers)
    compiled = engine._decode.lower(params, state, sampling, np.int32(4), greedy=True).compile()
    _assert_cache_in_place(compiled, cache_bytes)
    if not scan_layers:  # one buffer per layer: each layer reads its own, none is copied
        assert isinstance(state.cache["k"], tuple) and len(state.cache["k"]) == 4
        # (one layer's keys alone are cache / 8; the temporaries are the attention scores)
        assert compiled.memory_analysis().temp_size_in_bytes < cache_bytes / 8

    short = PromptBatch(
        input_ids=jnp.ones((rows, 8), jnp.int32),
        attention_mask=jnp.ones((rows, 8), jnp.int32),
        images=None,
        image_mask=None,
        filler=jnp.zeros((rows,), bool),
    )
    state = engine._prefill(params, short, sampling, **static)
    new_state = engine._decode(params, state, sampling, np.int32(4), greedy=True)
    # donated: the loop wrote into its buffers
    assert all(x.is_deleted() for x in jax.tree.leaves(state.cache["k"]))
    assert int(new_state.step) == 5
