"""The sharded train step: same numbers on every mesh, freezing, accumulation, masking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import PartitionSpec as P
from train_fixtures import (
    LENGTH,
    STAGE_2,
    TINY,
    WELL_CONDITIONED,
    build,
    flat_params,
    host_params,
    make_batch,
    max_relative,
    run_steps,
)

from llava_jax.models.config import ModelConfig
from llava_jax.models.inputs import Batch
from llava_jax.sharding import make_mesh
from llava_jax.train.loss import masked_cross_entropy_sums
from llava_jax.train.optimizer import learning_rate_schedule, trainable_mask


@pytest.fixture(scope="module")
def single_device_run():
    _, state, step = build((1, 1, 1), devices=jax.devices()[:1], **WELL_CONDITIONED)
    state, losses = run_steps(step, state)
    return flat_params(state.params), losses


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_every_mesh_gives_the_same_losses_and_parameters(single_device_run, mesh_shape):
    reference_params, reference_losses = single_device_run
    _, state, step = build(mesh_shape, **WELL_CONDITIONED)
    state, losses = run_steps(step, state)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    params = flat_params(state.params)
    assert max_relative(params, reference_params) <= 1e-5
    # and the parameters did move
    assert max_relative(params, flat_params(host_params())) > 1e-3


def test_parameter_shardings_follow_the_rules():
    setup, state, _ = build((2, 2, 2))
    specs = {k: v.spec for k, v in flatten_dict(setup.state_shardings.params).items()}
    expected = {
        ("llm", "embed", "embedding"): P("tensor", "fsdp"),  # vocab, embed
        ("llm", "layers", "attn", "query", "kernel"): P(None, "fsdp", "tensor", None),
        ("llm", "layers", "attn", "out", "kernel"): P(None, "tensor", None, "fsdp"),
        ("llm", "layers", "gate", "kernel"): P(None, "fsdp", "tensor"),
        ("llm", "layers", "down", "kernel"): P(None, "tensor", "fsdp"),
        ("llm", "lm_head", "kernel"): P("fsdp", "tensor"),
        ("img", "layers", "fc1", "kernel"): P(None, "fsdp", "tensor"),
        ("proj", "fc1", "kernel"): P("fsdp", "tensor"),
    }
    for path, spec in expected.items():
        assert specs[path] == spec, path
        assert state.params[path[0]] is not None
        leaf = state.params
        for key in path:
            leaf = leaf[key]
        assert leaf.sharding.spec == spec, path


def test_fsdp_8_gives_each_device_an_eighth():
    setup, state, _ = build((1, 8, 1))
    names = flatten_dict(setup.state_shardings.params)
    leaves = flatten_dict(state.params)
    sharded = 0
    for path, sharding in names.items():
        if "fsdp" not in jax.tree.leaves(tuple(sharding.spec)):
            continue
        sharded += 1
        leaf = leaves[path]
        for shard in leaf.addressable_shards:
            assert shard.data.size * 8 == leaf.size, path
    assert sharded >= 10


def test_stage_1_freezes_vision_and_language_towers():
    _, state, step = build((2, 2, 2), train_pattern="proj/.*")
    before = flat_params(state.params)
    state, losses = run_steps(step, state)
    after = flat_params(state.params)
    for key in before:
        if key.startswith(("img/", "llm/")):
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert all(np.abs(after[k] - before[k]).max() > 0 for k in before if k.startswith("proj/"))
    # The optimizer holds moments for the projector only: two Adam moments of its size.
    proj_bytes = sum(v.nbytes for k, v in before.items() if k.startswith("proj/"))
    moment_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    proj_shapes = sorted(v.shape for k, v in before.items() if k.startswith("proj/"))
    assert sorted(x.shape for x in moment_leaves) == sorted(proj_shapes * 2)
    assert sum(x.nbytes for x in moment_leaves) == 2 * proj_bytes
    assert np.isfinite(losses).all()


def test_gradient_accumulation_equals_one_large_batch():
    # Micro-batch r takes rows r, r+4: give them very different supervised token counts.
    supervised = [1, 6, 2, 9, 3, 1, 4, 2]
    # data x fsdp = 2, so each micro-batch of 2 rows still splits over the data axis.
    _, state_one, step_one = build((2, 1, 4), **WELL_CONDITIONED)
    _, state_acc, step_acc = build((2, 1, 4), micro_batches=4, **WELL_CONDITIONED)
    for i in range(3):
        batch = make_batch(200 + i, supervised=supervised)
        state_one, m_one = step_one(state_one, Batch.from_arrays(batch))
        state_acc, m_acc = step_acc(state_acc, Batch.from_arrays(batch))
        assert abs(float(m_one["loss"]) - float(m_acc["loss"])) <= 1e-6
        assert float(m_one["supervised_tokens"]) == float(m_acc["supervised_tokens"])
    assert max_relative(flat_params(state_acc.params), flat_params(state_one.params)) <= 1e-5


def test_targets_outside_the_mask_change_nothing():
    batch = make_batch(7)
    logits = jax.random.normal(jax.random.key(1), (8, LENGTH, 64))

    def loss(logits, ids):
        ce, _, tokens = masked_cross_entropy_sums(logits, ids, batch["loss_mask"])
        return ce / tokens

    changed = batch["input_ids"].copy()
    unsupervised = batch["loss_mask"] == 0
    unsupervised[:, 0] = False  # position 0 is never a target
    changed[unsupervised] = (changed[unsupervised] + 17) % 62
    assert (changed != batch["input_ids"]).sum() > 20
    value, grads = jax.value_and_grad(loss)(logits, batch["input_ids"])
    value2, grads2 = jax.value_and_grad(loss)(logits, changed)
    assert float(value) == float(value2)
    np.testing.assert_array_equal(grads, grads2)

    # Through the whole step: the last token of each row is only ever a target.
    last = batch["attention_mask"].sum(1) - 1
    batch["loss_mask"][np.arange(8), last] = 0.0
    other = {k: v.copy() for k, v in batch.items()}
    other["input_ids"][np.arange(8), last] = (other["input_ids"][np.arange(8), last] + 5) % 62
    _, state_a, step_a = build((2, 2, 2))
    _, state_b, step_b = build((2, 2, 2))
    state_a, m_a = step_a(state_a, Batch.from_arrays(batch))
    state_b, m_b = step_b(state_b, Batch.from_arrays(other))
    assert float(m_a["loss"]) == float(m_b["loss"])
    assert float(m_a["grad_norm"]) == float(m_b["grad_norm"])
    assert max_relative(flat_params(state_a.params), flat_params(state_b.params)) == 0


def test_batch_without_supervised_tokens_gives_zero_loss_and_no_nan():
    _, state, step = build((8, 1, 1))
    batch = make_batch(3)
    batch["loss_mask"][:] = 0
    before = flat_params(state.params)
    state, metrics = step(state, Batch.from_arrays(batch))
    assert float(metrics["loss"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0
    after = flat_params(state.params)
    assert all(np.isfinite(v).all() for v in after.values())
    assert max_relative(after, before) == 0


def test_projector_and_vision_learning_rates_are_separate():
    """Adam's first step moves each weight by about the learning rate: 10x on the projector,
    a tenth on the vision tower (LLaVA-NeXT's stage 2 trains it at 2e-6 beside 2e-5)."""
    _, state, step = build(
        (8, 1, 1),
        train_pattern=f"img/.*|{STAGE_2}",
        learning_rate=1e-4,
        projector_learning_rate=1e-3,
        vision_learning_rate=1e-5,
    )
    before = flat_params(state.params)
    state, _ = step(state, Batch.from_arrays(make_batch(1)))
    after = flat_params(state.params)

    def median_move(prefix):
        moves = np.concatenate(
            [
                np.abs(after[k] - before[k]).ravel()
                for k in before
                if k.startswith(prefix) and k.endswith("kernel")
            ]
        )
        return float(np.median(moves[moves > 0]))

    assert median_move("proj/") == pytest.approx(1e-3, rel=0.05)
    assert median_move("llm/") == pytest.approx(1e-4, rel=0.05)
    assert median_move("img/") == pytest.approx(1e-5, rel=0.05)


def test_schedule_warms_up_then_decays_to_zero():
    schedule = learning_rate_schedule(2e-5, total_steps=100, warmup_ratio=0.03)
    assert float(schedule(0)) == 0.0
    assert float(schedule(3)) == pytest.approx(2e-5)
    assert float(schedule(1)) == pytest.approx(2e-5 / 3)
    assert float(schedule(50)) < 2e-5
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)


# --- errors -----------------------------------------------------------------------------------


def test_mesh_device_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"needs 12 devices, but there are 8"):
        make_mesh((3, 4, 1))
    with pytest.raises(ValueError, match=r"cannot fill 8 devices"):
        make_mesh((3, -1, 1))


def test_indivisible_batch_names_both_numbers():
    with pytest.raises(
        ValueError,
        match=r"batch_size=6 is not divisible by the data-parallel size 4",
    ):
        build((2, 2, 2), batch_size=6)


def test_unknown_remat_policy_is_an_error():
    with pytest.raises(ValueError, match="remat_policy='everything'"):
        ModelConfig(remat_policy="everything")


def test_freeze_regex_that_matches_nothing_is_an_error():
    params = host_params()
    with pytest.raises(ValueError, match=r"'projector/\.\*' matches no parameter"):
        trainable_mask(params, "proj/.*|projector/.*")
    mask = trainable_mask(params, "proj/.*")
    assert set(map(bool, jax.tree.leaves(mask))) == {True, False}


def test_bf16_compute_trains_with_float32_parameters_and_loss():
    import dataclasses

    config = dataclasses.replace(TINY, dtype="bfloat16")
    _, state, step = build((2, 2, 2), config=config)
    state, losses = run_steps(step, state)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert np.isfinite(losses).all()


def test_fresh_init_on_a_mesh_runs_a_slice_of_the_scanned_vision_stack():
    """Regression: with the feature layer short of the last (LLaVA's -2), the vision tower
    runs a slice of its scanned stack; at init under a mesh its boxed parameters carried
    the `layers` axis name into the per-layer body and the sharding constraint failed."""
    from llava_jax.models.llava import init_params
    from llava_jax.sharding import DEFAULT_RULES
    from llava_jax.train.optimizer import OptimizerConfig, make_optimizer
    from llava_jax.train.state import init_train_state, make_setup

    assert TINY.vision_feature_layer == -2 and TINY.scan_layers
    optimizer, _ = make_optimizer(OptimizerConfig(), 10)
    setup = make_setup(TINY, optimizer, "proj/.*", make_mesh((2, 2, 2)), DEFAULT_RULES)
    state = init_train_state(setup, jax.random.key(0))
    expected = flat_params(init_params(TINY, jax.random.key(0)))
    got = flat_params(state.params)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)
