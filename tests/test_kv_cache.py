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


@pytest.mark.parametrize("scan_layers", [True, False])
def test_prefill_then_single_steps_equal_full_forward(converted, scan_layers):
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

    cache = init_cache(config.text, batch_size=2, max_length=40, dtype=jnp.float32)
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
