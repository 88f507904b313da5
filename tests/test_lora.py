"""LoRA: a fresh adapter changes nothing, only adapters (and what train_pattern names) train,
and adapters travel to transformers merged and to PEFT (and back) with the same logits."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from hf_reference import make_inputs, reference_logits, tiny_hf_config, tiny_hf_model
from safetensors import safe_open
from safetensors.numpy import save_file
from train_fixtures import TINY, make_batch
from transformers import LlavaForConditionalGeneration

from llava_jax.convert import load_hf, save_hf
from llava_jax.convert.peft import export_peft_adapter, import_peft_adapter
from llava_jax.convert.safetensors_io import CheckpointError
from llava_jax.models.config import LoraConfig
from llava_jax.models.llava import Llava, init_params, to_unscanned_layout
from llava_jax.models.lora import LORA_FACTORS, merge_lora
from llava_jax.sharding import DEFAULT_RULES, make_mesh, param_shardings
from llava_jax.train.optimizer import OptimizerConfig, make_optimizer, trainable_mask
from llava_jax.train.state import init_train_state, make_setup

LORA = LoraConfig(rank=4, alpha=8.0)


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "images", "image_mask", "attention_mask")}


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(tree)).items()}


def _randomize_factors(params, seed: int = 1, scale: float = 0.2):
    """Non-zero B (and fresh A) so the adapter changes the logits."""
    rng = np.random.default_rng(seed)
    flat = flatten_dict(jax.tree.map(np.asarray, params))
    for path, value in flat.items():
        if path[-1] in LORA_FACTORS:
            flat[path] = (scale * rng.standard_normal(value.shape)).astype(value.dtype)
    return unflatten_dict(flat)


def test_fresh_lora_equals_the_base_bitwise():
    """(Unscanned LoRA models are checked against PEFT in the import test below.)"""
    base_config = TINY
    config = dataclasses.replace(base_config, lora=LORA)
    params = init_params(config, jax.random.key(0))
    flat = _flat(params)
    factors = [k for k in flat if k.rsplit("/", 1)[-1] in LORA_FACTORS]
    # every decoder dense layer, nothing else: 7 per layer, 2 factors each
    assert len(factors) == 2 * 7  # scanned: one stacked pair per dense layer
    assert all(k.startswith("llm/layers") for k in factors)
    assert all(not np.any(flat[k]) for k in factors if k.endswith("lora_b"))
    assert all(np.any(flat[k]) for k in factors if k.endswith("lora_a"))
    base = unflatten_dict(
        {
            tuple(k.split("/")): v
            for k, v in flat.items()
            if k.rsplit("/", 1)[-1] not in LORA_FACTORS
        }
    )
    inputs = _inputs(make_batch(0, batch_size=2))
    ours = Llava(config).apply({"params": params}, **inputs)
    theirs = Llava(base_config).apply({"params": base}, **inputs)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    # and a trained adapter does change them
    moved = Llava(config).apply({"params": _randomize_factors(params)}, **inputs)
    assert not np.allclose(np.asarray(moved), np.asarray(ours))


def test_lora_factors_carry_logical_axes():
    from llava_jax.models.llava import abstract_params

    boxed = flatten_dict(abstract_params(dataclasses.replace(TINY, lora=LORA)))
    query_a = boxed[("llm", "layers", "attn", "query", "lora_a")]
    query_b = boxed[("llm", "layers", "attn", "query", "lora_b")]
    out_a = boxed[("llm", "layers", "attn", "out", "lora_a")]
    assert tuple(query_a.names) == ("layers", "embed", "lora_rank")
    assert tuple(query_b.names) == ("layers", "lora_rank", "heads", "head_dim")
    assert tuple(out_a.names) == ("layers", "heads", "head_dim", "lora_rank")
    # on an FSDP mesh every factor is split: by its kernel-side axis or by its rank
    mesh = make_mesh((1, 2, 1), devices=jax.devices()[:2])
    shardings = flatten_dict(
        param_shardings(abstract_params(TINY.replace(lora=LORA)), mesh, DEFAULT_RULES)
    )
    for path, sharding in shardings.items():
        if path[-1] in LORA_FACTORS:
            assert "fsdp" in jax.tree.leaves(tuple(sharding.spec)), path


def test_only_adapters_and_the_projector_train():
    config = dataclasses.replace(TINY, lora=LORA)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer, _ = make_optimizer(OptimizerConfig(), 10)
    setup = make_setup(config, optimizer, "proj/.*", mesh, DEFAULT_RULES)
    mask = _flat(setup.mask)
    trained = {k for k, v in mask.items() if v}
    assert trained == {k for k in mask if k.startswith("proj/") or k.endswith(LORA_FACTORS)}
    state = init_train_state(setup, jax.random.key(0))
    # optimizer moments exist for exactly the trained leaves
    opt_leaves = {
        "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
    }
    moment_paths = {p.split("mu/", 1)[1] for p in opt_leaves if "mu/" in p}
    assert moment_paths == trained


def test_train_pattern_that_trains_the_frozen_base_is_refused():
    config = dataclasses.replace(TINY, lora=LORA)
    shapes = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
    with pytest.raises(ValueError, match="frozen base of a LoRA-adapted layer"):
        trainable_mask(shapes, "proj/.*|llm/.*")
    # only the adapters: an empty pattern is allowed with LoRA
    assert sum(jax.tree.leaves(trainable_mask(shapes, ""))) == 2 * 7


def test_lora_on_the_lm_head_is_refused():
    with pytest.raises(ValueError, match="LM head"):
        dataclasses.replace(TINY, lora=LoraConfig(rank=2, target="llm/.*"))


@pytest.mark.parametrize("base_dtype", ["bfloat16", "int8"])
def test_base_dtype_stores_the_frozen_kernels(base_dtype):
    config = dataclasses.replace(TINY, lora=dataclasses.replace(LORA, base_dtype=base_dtype))
    flat = _flat(init_params(config, jax.random.key(0)))
    query = "llm/layers/attn/query/"
    if base_dtype == "int8":
        assert flat[query + "kernel_int8"].dtype == np.int8
        assert flat[query + "scale"].shape == (2, 4, 8)  # [layers, heads, head_dim]
        assert query + "kernel" not in flat
    else:
        assert flat[query + "kernel"].dtype == jnp.bfloat16
    assert flat[query + "lora_a"].dtype == np.float32
    assert flat["proj/fc1/kernel"].dtype == np.float32  # not adapted: as it was


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny random transformers LLaVA saved locally, and llava_jax's reading of it."""
    directory = tmp_path_factory.mktemp("hf_base")
    model = tiny_hf_model(tiny_hf_config())
    model.save_pretrained(directory)
    config, params = load_hf(str(directory))
    return str(directory), model, config, params


def _lora_model(config, params, lora=LORA, seed=1):
    """The base plus trained-looking adapters (random A and B)."""
    lora_config = dataclasses.replace(config, lora=lora)
    fresh = init_params(lora_config, jax.random.key(seed))
    flat = flatten_dict(jax.tree.map(np.asarray, params))
    for path, value in flatten_dict(fresh).items():
        if path[-1] in LORA_FACTORS:
            flat[path] = np.asarray(value)
    return lora_config, _randomize_factors(unflatten_dict(flat), seed)


def _our_logits(config, params, inputs) -> np.ndarray:
    return np.asarray(Llava(config).apply({"params": params}, **inputs))


def test_merged_export_matches_the_lora_model(hf_base, tmp_path):
    directory, model, config, params = hf_base
    lora_config, lora_params = _lora_model(config, params)
    inputs = make_inputs(model.config, [1, 2], length=24, real_lengths=[20, 24])
    ours = _our_logits(lora_config, lora_params, inputs)
    with pytest.raises(ValueError, match="merge_lora=True"):
        save_hf(lora_config, lora_params, str(tmp_path / "refused"))
    save_hf(lora_config, lora_params, str(tmp_path / "merged"), merge_lora=True)
    merged = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
    theirs = reference_logits(merged, inputs)
    valid = inputs["attention_mask"].astype(bool)
    assert np.abs(ours - theirs)[valid].max() <= 1e-4
    # the adapters really moved the logits (so the comparison tests the merge)
    base = reference_logits(model, inputs)
    assert np.abs(base - theirs)[valid].max() > 1e-2


def test_merge_of_an_int8_base_dequantizes():
    config = dataclasses.replace(TINY, lora=dataclasses.replace(LORA, base_dtype="int8"))
    params = _randomize_factors(init_params(config, jax.random.key(0)))
    inputs = _inputs(make_batch(0, batch_size=2))
    ours = _our_logits(config, params, inputs)
    plain_config, merged = merge_lora(config, params)
    assert not plain_config.lora.enabled
    assert "kernel" in merged["llm"]["layers"]["attn"]["query"]
    np.testing.assert_allclose(_our_logits(plain_config, merged, inputs), ours, atol=1e-4)


def test_peft_adapter_export_loads_in_peft_with_the_same_logits(hf_base, tmp_path):
    directory, model, config, params = hf_base
    lora_config, lora_params = _lora_model(config, params, LoraConfig(rank=3, alpha=12.0))
    export_peft_adapter(lora_config, lora_params, str(tmp_path / "adapter"))
    base = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A.default")]
    assert len(adapted) == 7 * model.config.text_config.num_hidden_layers
    inputs = make_inputs(model.config, [2, 1], length=26, real_lengths=[26, 21])
    theirs = reference_logits(peft_model, inputs)
    ours = _our_logits(lora_config, lora_params, inputs)
    valid = inputs["attention_mask"].astype(bool)
    assert np.abs(ours - theirs)[valid].max() <= 1e-4
    assert np.abs(reference_logits(model, inputs) - theirs)[valid].max() > 1e-2


def _peft_adapter(directory: str, target_modules: str, out_dir: str, r: int = 4, alpha=16):
    """PEFT's own LoRA on the base in `directory` (random non-zero factors), saved to
    `out_dir`; returns the PEFT model (eval)."""
    base = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    peft_config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0
    )
    peft_model = peft.get_peft_model(base, peft_config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn_like(param))
    peft_model.save_pretrained(out_dir)
    return peft_model.eval()


def _peft_adapted(peft_model) -> list[str]:
    """The base-model module names PEFT adapted (the default adapter)."""
    suffix = ".lora_A.default"
    names = [n for n, _ in peft_model.named_modules() if n.endswith(suffix)]
    return [n.removeprefix("base_model.model.").removesuffix(suffix) for n in names]


def _without_tower_adapters(params, tower: str):
    """`params` with the `tower`'s lora_b zeroed: the same adapter minus that tower's part."""
    flat = flatten_dict(jax.tree.map(np.asarray, params))
    return unflatten_dict(
        {k: np.zeros_like(v) if k[0] == tower and k[-1] == "lora_b" else v for k, v in flat.items()}
    )


def test_peft_adapter_imports_with_the_same_logits(hf_base, tmp_path):
    directory, model, config, params = hf_base
    peft_model = _peft_adapter(
        directory,
        r".*language_model.*\.(q_proj|v_proj|o_proj|down_proj)",
        str(tmp_path / "adapter"),
    )
    inputs = make_inputs(model.config, [1, 1], length=22, real_lengths=[22, 18])
    theirs = reference_logits(peft_model, inputs)

    for scan in (True, False):
        base_config = dataclasses.replace(config, scan_layers=scan)
        base_params = params if scan else to_unscanned_layout(params, config)
        lora_config, lora_params = import_peft_adapter(
            base_config, base_params, str(tmp_path / "adapter")
        )
        assert lora_config.lora.rank == 4 and lora_config.lora.scale == 4.0
        assert lora_config.lora.adapts("llm/layers/attn/out")
        assert lora_config.lora.adapts("llm/layers_1/down")
        assert not lora_config.lora.adapts("llm/layers/attn/key")
        ours = _our_logits(lora_config, lora_params, inputs)
        valid = inputs["attention_mask"].astype(bool)
        assert np.abs(ours - theirs)[valid].max() <= 1e-4
    # and our export of it is the same adapter again
    export_peft_adapter(lora_config, lora_params, str(tmp_path / "again"))
    again = peft.PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(directory).eval(), str(tmp_path / "again")
    ).eval()
    np.testing.assert_allclose(reference_logits(again, inputs), theirs, atol=1e-5)


def test_peft_vision_adapter_imports_with_the_same_logits(hf_base, tmp_path):
    """PEFT's own adapter on vision-tower and decoder layers imports (transformers 5.x names
    the vision modules `model.vision_tower.encoder.…`, 4.52–4.57 `model.vision_tower.
    vision_model.encoder.…`: both are read) and gives PEFT's logits in both layouts."""
    directory, model, config, params = hf_base
    folder = tmp_path / "adapter"
    peft_model = _peft_adapter(
        directory,
        r".*vision_tower.*\.(q_proj|out_proj|fc1)|.*language_model.*\.(v_proj|up_proj)",
        str(folder),
        r=2,
        alpha=6,
    )
    vision_layers = model.config.vision_config.num_hidden_layers
    assert sum("vision_tower" in n for n in _peft_adapted(peft_model)) == 3 * vision_layers
    inputs = make_inputs(model.config, [1, 1], length=22, real_lengths=[22, 17])
    theirs = reference_logits(peft_model, inputs)
    valid = inputs["attention_mask"].astype(bool)
    for scan in (True, False):
        base_config = dataclasses.replace(config, scan_layers=scan)
        base_params = params if scan else to_unscanned_layout(params, config)
        lora_config, lora_params = import_peft_adapter(base_config, base_params, str(folder))
        lora = lora_config.lora
        assert lora.adapts("img/layers/fc1") and lora.adapts("img/layers_2/attn/out")
        assert not lora.adapts("img/layers/fc2") and not lora.adapts("proj/fc1")
        ours = _our_logits(lora_config, lora_params, inputs)
        assert np.abs(ours - theirs)[valid].max() <= 1e-4, f"scan_layers={scan}"
        # the vision part is in that agreement: without it the logits are another model's
        text_only = _our_logits(lora_config, _without_tower_adapters(lora_params, "img"), inputs)
        assert np.abs(text_only - theirs)[valid].max() > 1e-2
    # the same adapter under transformers 4.52-4.57's vision names imports the same
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), framework="numpy") as f:
        tensors = {
            key.replace(".vision_tower.", ".vision_tower.vision_model."): f.get_tensor(key)
            for key in f.keys()  # noqa: SIM118
        }
    assert any(".vision_tower.vision_model.encoder." in key for key in tensors)
    save_file(tensors, str(legacy / "adapter_model.safetensors"), metadata={"format": "pt"})
    legacy_config, legacy_params = import_peft_adapter(base_config, base_params, str(legacy))
    assert legacy_config == lora_config
    jax.tree.map(np.testing.assert_array_equal, legacy_params, lora_params)
    # one layer under both layouts' names is ambiguous: refused
    with safe_open(str(folder / "adapter_model.safetensors"), framework="numpy") as f:
        tensors.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
    save_file(tensors, str(legacy / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="two lora_A tensors"):
        import_peft_adapter(base_config, base_params, str(legacy))


def test_peft_vision_adapter_export_loads_in_peft_with_every_module_adapted(hf_base, tmp_path):
    """Our vision-tower and decoder adapters, exported under the installed transformers'
    module names: PEFT adapts every one of them and gives our logits."""
    directory, model, config, params = hf_base
    lora = LoraConfig(
        rank=3,
        alpha=6.0,
        target=r"img/layers(_\d+)?/(attn/(query|out)|fc2)|llm/layers(_\d+)?/(attn/key|down)",
    )
    lora_config, lora_params = _lora_model(config, params, lora)
    modules = export_peft_adapter(lora_config, lora_params, str(tmp_path / "adapter"))
    vision = [m for m in modules if m.startswith("model.vision_tower.")]
    assert len(vision) == 3 * model.config.vision_config.num_hidden_layers
    assert len(modules) == len(vision) + 2 * model.config.text_config.num_hidden_layers
    base = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert sorted(_peft_adapted(peft_model)) == sorted(modules)  # none skipped
    inputs = make_inputs(model.config, [1, 2], length=26, real_lengths=[21, 26])
    theirs = reference_logits(peft_model, inputs)
    valid = inputs["attention_mask"].astype(bool)
    assert np.abs(_our_logits(lora_config, lora_params, inputs) - theirs)[valid].max() <= 1e-4
    text_only = _our_logits(lora_config, _without_tower_adapters(lora_params, "img"), inputs)
    assert np.abs(text_only - theirs)[valid].max() > 1e-2


def test_peft_export_names_each_transformers_layout_and_the_next_class(tmp_path):
    """4.x and 5.x module names for the vision tower; a LLaVA-NeXT adapter names
    `LlavaNextForConditionalGeneration`, which `AutoPeftModel` builds from the base's
    folder, adapting every exported module."""
    from transformers import LlavaNextForConditionalGeneration

    config = dataclasses.replace(TINY, image_grid_pinpoints=((14, 28), (28, 14), (28, 28)))
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
    save_hf(config, params, str(tmp_path / "base"))
    lora = LoraConfig(rank=2, alpha=4.0, target=r"(img|llm)/layers(_\d+)?/attn/query")
    lora_config, lora_params = _lora_model(config, params, lora)
    folder = str(tmp_path / "adapter")
    modules = export_peft_adapter(
        lora_config, lora_params, folder, base_model_name_or_path=str(tmp_path / "base")
    )
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["auto_mapping"]["base_model_class"] == "LlavaNextForConditionalGeneration"
    peft_model = peft.AutoPeftModel.from_pretrained(folder)
    assert isinstance(peft_model.get_base_model(), LlavaNextForConditionalGeneration)
    assert sorted(_peft_adapted(peft_model)) == sorted(modules) and len(modules) == 4
    # (written in the installed transformers' layout; an older one gets its own names)
    from llava_jax.convert.peft import module_prefixes

    assert module_prefixes("4.57.1")["img"] == "model.vision_tower.vision_model."
    assert module_prefixes("5.0.0")["img"] == "model.vision_tower."
    assert module_prefixes("4.57.1")["llm"] == module_prefixes("5.0.0")["llm"]


def test_bad_adapters_are_refused_by_name(hf_base, tmp_path):
    directory, model, config, params = hf_base
    lora_config, lora_params = _lora_model(config, params)
    folder = tmp_path / "adapter"
    export_peft_adapter(lora_config, lora_params, str(folder))
    settings = json.loads((folder / "adapter_config.json").read_text())

    def rewrite(**changes):
        (folder / "adapter_config.json").write_text(json.dumps({**settings, **changes}))

    rewrite(use_dora=True)
    with pytest.raises(CheckpointError, match="use_dora"):
        import_peft_adapter(config, params, str(folder))
    rewrite(peft_type="IA3")
    with pytest.raises(CheckpointError, match="peft_type"):
        import_peft_adapter(config, params, str(folder))
    rewrite()
    # an adapter for a bigger model: shapes do not fit
    bigger = dataclasses.replace(
        config, text=dataclasses.replace(config.text, intermediate_size=96)
    )
    bigger_params = init_params(bigger, jax.random.key(0))
    with pytest.raises(CheckpointError, match="shape"):
        import_peft_adapter(bigger, bigger_params, str(folder))
    with pytest.raises(CheckpointError, match="not a PEFT adapter"):
        import_peft_adapter(config, params, str(tmp_path))


def test_lora_training_is_the_same_on_every_mesh():
    """LoRA from a base model's host parameters (the adapters are born on the mesh, the base
    stored in int8 there), with dropout, on (1,1,1) and (2,2,2): the same losses and
    parameters; the base never moves."""
    from train_fixtures import WELL_CONDITIONED, build, host_params, max_relative, run_steps

    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.1, base_dtype="int8")
    config = dataclasses.replace(TINY, lora=lora)
    runs = {}
    for mesh_shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), None)):
        _, state, step = build(
            mesh_shape,
            devices=devices,
            config=config,
            params=host_params(),
            train_pattern="proj/.*",
            **WELL_CONDITIONED,
        )
        before = _flat(state.params)
        state, losses = run_steps(step, state)
        runs[mesh_shape] = (before, _flat(state.params), losses)
    (before, after, losses), (before_8, after_8, losses_8) = runs[(1, 1, 1)], runs[(2, 2, 2)]
    np.testing.assert_allclose(losses_8, losses, rtol=1e-5)
    assert max_relative(after_8, after) <= 1e-5
    # the adapters were born the same on both meshes, and trained
    for key in after:
        if key.endswith("lora_a"):
            np.testing.assert_array_equal(before_8[key], before[key])
        if key.endswith("lora_b"):
            assert not np.any(before[key]) and np.any(after[key])
        elif key.startswith(("llm/", "img/")) and not key.endswith(LORA_FACTORS):
            np.testing.assert_array_equal(after[key], before[key])  # frozen: bitwise
    assert after["llm/layers/up/kernel_int8"].dtype == np.int8


def test_the_recipes_docstring_commands_build_valid_configs():
    """Every `--config=configs/llava_v15.py:ARG` the recipe's docstring shows builds a run
    config that validates; the LoRA ones carry LLaVA's finetune_lora.sh numbers."""
    import os
    import re
    import sys

    from llava_jax.train.config import RunConfig

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(repo, "configs"))
    import llava_v15

    args = re.findall(r"--config=configs/llava_v15\.py:(\S+)", llava_v15.__doc__)
    assert {"7b,pretrain", "7b,finetune", "7b,lora"} <= set(args)
    for arg in args:
        RunConfig.from_config(llava_v15.get_config(arg))
    for size in ("7b", "13b"):
        run = RunConfig.from_config(llava_v15.get_config(f"{size},lora"))
        assert (run.model.lora.rank, run.model.lora.alpha, run.model.lora.dropout) == (
            128,
            256,
            0.05,
        )
        assert run.optimizer.learning_rate == 2e-4
        assert run.optimizer.projector_learning_rate == 2e-5
        assert run.train.train_pattern == "proj/.*"
        assert run.init.mode == "checkpoint"
        assert run.model.lora.adapts("llm/layers/attn/query")
        assert not run.model.lora.adapts("proj/fc1") and not run.model.lora.adapts("img/layers/fc1")
        int8 = RunConfig.from_config(llava_v15.get_config(f"{size},lora_int8"))
        assert int8.model.lora.base_dtype == "int8"


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_a_lora_scale_that_is_not_finite_is_refused(alpha):
    """alpha/rank scales every adapter's output: a NaN alpha made every merged kernel NaN."""
    with pytest.raises(ValueError, match=r"lora\.alpha=.* is not a finite number"):
        LoraConfig(rank=4, alpha=alpha)
