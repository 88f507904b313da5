"""Every attention implementation that runs on CPU equals the `xla` reference in float32,
forward and gradients, with GQA and padding; `cudnn` refuses a CPU cleanly."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import TINY, make_batch

from llava_jax.models.attention import attend, resolve
from llava_jax.models.llava import Llava, init_params
from llava_jax.sharding import DEFAULT_RULES, make_mesh, place
from llava_jax.sharding import batch_sharding as batch_layout

CPU_IMPLEMENTATIONS = ("chunked", "dot_product", "splash")
TOLERANCE = 1e-5


def _inputs(length: int, seed: int = 0):
    """GQA (6 query heads over 2 KV heads); row 0 right-padded, row 1 left-padded."""
    rng = np.random.default_rng(seed)
    batch, heads, kv_heads, head_dim = 3, 6, 2, 16
    q = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, length, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, length, kv_heads, head_dim)).astype(np.float32)
    segment_ids = np.ones((batch, length), np.int32)
    segment_ids[0, length - length // 3 :] = 0
    segment_ids[1, : length // 4] = 0
    weights = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)
    return [jnp.asarray(x) for x in (q, k, v)], jnp.asarray(segment_ids), jnp.asarray(weights)


def _loss_and_grads(implementation, causal, length):
    (q, k, v), segment_ids, weights = _inputs(length)
    real_queries = (segment_ids > 0)[..., None, None]

    def loss(q, k, v):
        out = attend(q, k, v, implementation=implementation, causal=causal, segment_ids=segment_ids)
        # Padded query rows are unspecified (nothing reads them): weigh real rows only.
        return jnp.sum(jnp.where(real_queries, out * weights, 0.0)), out

    (value, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return value, np.where(np.asarray(real_queries), np.asarray(out), 0.0), grads


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [200, 256])
def test_matches_reference_forward_and_gradients(implementation, causal, length):
    ref_value, ref_out, ref_grads = _loss_and_grads("xla", causal, length)
    value, out, grads = _loss_and_grads(implementation, causal, length)
    np.testing.assert_allclose(out, ref_out, atol=TOLERANCE, rtol=0)
    assert abs(float(value) - float(ref_value)) <= TOLERANCE * max(1.0, abs(float(ref_value)))
    for name, ours, ref in zip("qkv", grads, ref_grads, strict=True):
        error = float(jnp.max(jnp.abs(ours - ref)))
        assert error <= TOLERANCE, f"d{name}: {error}"


def test_without_padding_every_row_matches():
    (q, k, v), _, _ = _inputs(160)
    ref = attend(q, k, v, implementation="xla", causal=True)
    for implementation in CPU_IMPLEMENTATIONS:
        out = attend(q, k, v, implementation=implementation, causal=True)
        np.testing.assert_allclose(out, ref, atol=TOLERANCE, rtol=0, err_msg=implementation)


def test_auto_and_cudnn_choices():
    assert resolve("auto", "cpu", jnp.float32) == "chunked"
    assert resolve("auto", "tpu", jnp.bfloat16) == "splash"
    assert resolve("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert resolve("auto", "gpu", jnp.float32) == "chunked"
    with pytest.raises(ValueError, match="not one of"):
        resolve("flash", "cpu", jnp.float32)
    (q, k, v), segment_ids, _ = _inputs(128)
    with pytest.raises(ValueError, match="cudnn.*GPU.*'cpu'"):
        attend(q, k, v, implementation="cudnn", causal=True, segment_ids=segment_ids)


def _model_logits_and_grads(config, params, batch, mesh=None):
    model = Llava(config)
    inputs = {k: batch[k] for k in ("input_ids", "images", "image_mask", "attention_mask")}

    def loss(params):
        logits = model.apply({"params": params}, **inputs)
        real = batch["attention_mask"][..., None] > 0
        return jnp.sum(jnp.where(real, logits, 0.0) ** 2), logits

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if mesh is None:
        return fn(params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        return fn(params)


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
def test_whole_model_matches_reference(implementation):
    """The vision tower (not causal) and the decoder (causal, padded) with each one."""
    params = init_params(TINY, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in make_batch(0, batch_size=4).items()}
    reference = dataclasses.replace(TINY, attention="xla")
    (ref_loss, ref_logits), ref_grads = _model_logits_and_grads(reference, params, batch)
    config = dataclasses.replace(TINY, attention=implementation)
    (loss, logits), grads = _model_logits_and_grads(config, params, batch)
    real = np.asarray(batch["attention_mask"], bool)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real], atol=1e-5)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    # Relative to the gradients' scale: the loss (a sum of squared logits) is large, and
    # some leaves' true gradient is 0 (a key bias cannot change a softmax).
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
    errors = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, ref_grads)
    assert max(jax.tree.leaves(errors)) <= 1e-5 * scale


def test_splash_under_a_mesh_runs_per_shard():
    """On a (data 2, fsdp 2, tensor 2) mesh splash runs in shard_map; same logits."""
    params = init_params(TINY, jax.random.key(0))
    host_batch = make_batch(1, batch_size=4)
    mesh = make_mesh((2, 2, 2))
    batch = place(host_batch, {k: batch_layout(mesh) for k in host_batch})
    reference = dataclasses.replace(TINY, attention="xla")
    (_, ref_logits), _ = _model_logits_and_grads(reference, params, batch, mesh)
    config = dataclasses.replace(TINY, attention="splash")
    (_, logits), _ = _model_logits_and_grads(config, params, batch, mesh)
    real = host_batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real], atol=1e-5)


@pytest.mark.parametrize("implementation", ("xla", *CPU_IMPLEMENTATIONS))
def test_packed_segments_attend_only_within_themselves(implementation):
    """A row packing three sequences (then padding): each sequence's output equals
    attention over that sequence alone, causal from its own first token."""
    rng = np.random.default_rng(1)
    heads, kv_heads, head_dim = 4, 2, 8
    lengths = (70, 50, 81)  # 201 tokens of 256: crosses splash's and chunked's 128 blocks
    total = 256
    q, k, v = (
        rng.standard_normal((1, total, h, head_dim)).astype(np.float32)
        for h in (heads, kv_heads, kv_heads)
    )
    segment_ids = np.zeros((1, total), np.int32)
    start = 0
    for index, length in enumerate(lengths):
        segment_ids[0, start : start + length] = index + 1
        start += length
    packed = attend(
        *map(jnp.asarray, (q, k, v)),
        implementation=implementation,
        causal=True,
        segment_ids=jnp.asarray(segment_ids),
    )
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        alone = attend(
            *(jnp.asarray(x[:, part]) for x in (q, k, v)), implementation="xla", causal=True
        )
        np.testing.assert_allclose(packed[:, part], alone, atol=TOLERANCE, rtol=0)
        start += length
