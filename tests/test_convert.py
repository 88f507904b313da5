"""Weight exchange with transformers: layouts, dtypes, shards, round trip, towers, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from hf_reference import VOCAB, make_inputs, reference_logits, tiny_hf_config, tiny_hf_model
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as torch_save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from llava_jax.convert import CheckpointError, load_hf, load_towers, save_hf
from llava_jax.convert.__main__ import main as convert_cli
from llava_jax.convert.hf import to_hf_tensors
from llava_jax.models.llava import Llava, to_unscanned_layout


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava")
    model = tiny_hf_model(tiny_hf_config())
    model.save_pretrained(directory)
    return directory, model


def _flat(params):
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def test_round_trip_through_transformers(hf_dir, tmp_path):
    directory, model = hf_dir
    config, params = load_hf(str(directory))
    save_hf(config, params, str(tmp_path / "out"))
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    inputs = make_inputs(model.config, [2, 1], length=30)
    original = reference_logits(model, inputs)
    again = reference_logits(reloaded, inputs)
    assert np.abs(original - again).max() <= 1e-5
    # and llava_jax reads its own output back to the same parameters
    _assert_same_params(load_hf(str(tmp_path / "out"))[1], params)


def test_in_memory_key_layout_loads_the_same(hf_dir, tmp_path):
    directory, model = hf_dir
    out = tmp_path / "in_memory"
    out.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    torch_save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((directory / "config.json").read_text())
    _assert_same_params(load_hf(str(out))[1], load_hf(str(directory))[1])


@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load_exactly(hf_dir, tmp_path, torch_dtype):
    _, model = hf_dir
    half = tiny_hf_model(model.config).to(torch_dtype)
    half.save_pretrained(tmp_path / "half")
    config, params = load_hf(str(tmp_path / "half"))
    flat = _flat(params)
    expected = half.state_dict()["model.language_model.embed_tokens.weight"].float().numpy()
    assert flat["llm/embed/embedding"].dtype == np.float32
    np.testing.assert_array_equal(flat["llm/embed/embedding"], expected)
    # the converted half model computes what the half model computes, in float32
    inputs = make_inputs(model.config, [1, 1], length=30)
    ours = Llava(config).apply(
        {"params": params}, inputs["input_ids"], inputs["images"], inputs["image_mask"]
    )
    ref = reference_logits(half.float(), inputs)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def test_sharded_checkpoints_both_ways(hf_dir, tmp_path):
    directory, model = hf_dir
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    config, params = load_hf(str(tmp_path / "sharded"))
    _assert_same_params(params, load_hf(str(directory))[1])
    save_hf(config, params, str(tmp_path / "ours_sharded"), max_shard_bytes=30_000)
    index = json.loads((tmp_path / "ours_sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "ours_sharded"))
    _assert_same_params(load_hf(str(tmp_path / "ours_sharded"))[1], params)


def test_separate_towers_compose_bit_for_bit(hf_dir, tmp_path):
    _, model = hf_dir
    vision_config = model.config.vision_config
    text_config = model.config.text_config
    torch.manual_seed(1)
    clip = CLIPVisionModel(vision_config)
    clip.save_pretrained(tmp_path / "clip_vision")
    llama = LlamaForCausalLM(text_config)
    llama.save_pretrained(tmp_path / "llama")
    config, params = load_towers(
        str(tmp_path / "clip_vision"),
        str(tmp_path / "llama"),
        image_token_id=VOCAB - 1,
        rng=jax.random.key(3),
    )
    ours = to_hf_tensors(config, params)
    vision_src = load_file(str(tmp_path / "clip_vision" / "model.safetensors"))
    text_src = load_file(str(tmp_path / "llama" / "model.safetensors"))
    for key, value in vision_src.items():
        np.testing.assert_array_equal(ours["vision_tower.vision_model." + key], value, key)
    for key, value in text_src.items():
        np.testing.assert_array_equal(ours["language_model." + key], value, key)
    # a fresh projector, not zeros
    assert np.abs(ours["multi_modal_projector.linear_1.weight"]).sum() > 0
    assert config.text.vocab_size == text_config.vocab_size

    # A full CLIP checkpoint (vision_model.* keys beside a text tower) gives the same tower.
    full = CLIPModel(
        CLIPConfig(
            vision_config=vision_config.to_dict(),
            text_config=dict(
                hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
            ),
        )
    )
    full.vision_model.load_state_dict(clip.state_dict())
    full.save_pretrained(tmp_path / "clip_full")
    _, params_full = load_towers(
        str(tmp_path / "clip_full"),
        str(tmp_path / "llama"),
        image_token_id=VOCAB - 1,
        rng=jax.random.key(3),
    )
    _assert_same_params(params_full["img"], params["img"])


def test_cli_round_trip(hf_dir, tmp_path):
    directory, model = hf_dir
    assert convert_cli(["hf-to-params", "--hf", str(directory), "--out", str(tmp_path / "p")]) == 0
    assert (
        convert_cli(
            ["params-to-hf", "--params", str(tmp_path / "p"), "--out", str(tmp_path / "hf")]
        )
        == 0
    )
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    inputs = make_inputs(model.config, [1, 1], length=30)
    assert np.abs(reference_logits(reloaded, inputs) - reference_logits(model, inputs)).max() == 0


# --- errors that name what is wrong ----------------------------------------------------------


def _copy_with(directory, out, edit_tensors=None, edit_config=None):
    out.mkdir()
    tensors = load_file(str(directory / "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def test_missing_key_is_named(hf_dir, tmp_path):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    path = _copy_with(hf_dir[0], tmp_path / "m", edit_tensors=lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing key '{key}'"):
        load_hf(path)


def test_unexpected_key_is_named(hf_dir, tmp_path):
    def add(tensors):
        tensors["language_model.model.layers.7.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)

    path = _copy_with(hf_dir[0], tmp_path / "u", edit_tensors=add)
    with pytest.raises(CheckpointError, match="unexpected key.*layers.7.mlp.up_proj"):
        load_hf(path)


def test_shape_mismatch_names_key_and_both_shapes(hf_dir, tmp_path):
    def widen(config):
        config["text_config"]["intermediate_size"] = 96

    path = _copy_with(hf_dir[0], tmp_path / "s", edit_config=widen)
    with pytest.raises(
        CheckpointError, match=r"gate_proj.weight' has shape \(80, 48\).*\(96, 48\)"
    ):
        load_hf(path)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c["text_config"].update(model_type="gemma"), "text_config.model_type='gemma'"),
        (
            lambda c: c["vision_config"].update(model_type="dinov2"),
            "vision_config.model_type='dinov2'",
        ),
        (  # SigLIP has no class token for "default" to drop
            lambda c: c["vision_config"].update(model_type="siglip_vision_model"),
            "vision_feature_select_strategy='default' with a siglip vision tower",
        ),
        (
            lambda c: c["text_config"].update(
                rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}
            ),
            "rope_parameters.rope_type='yarn'",
        ),
        (lambda c: c.update(model_type="qwen2_vl"), "model_type='qwen2_vl'"),
        (lambda c: c["text_config"].update(hidden_act="mish"), "text_config.hidden_act='mish'"),
    ],
)
def test_unsupported_architecture_names_field(hf_dir, tmp_path, edit, field):
    path = _copy_with(hf_dir[0], tmp_path / "a", edit_config=edit)
    with pytest.raises(CheckpointError, match=f"unsupported architecture.*{re.escape(field)}"):
        load_hf(path)


def test_pickle_checkpoint_is_refused_with_a_way_out(hf_dir, tmp_path):
    out = tmp_path / "bin"
    out.mkdir()
    (out / "config.json").write_text((hf_dir[0] / "config.json").read_text())
    (out / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickle.*pytorch_model.bin.*safetensors"):
        load_hf(str(out))


def test_linear_projector_cannot_be_written_for_transformers(hf_dir, tmp_path):
    config, params = load_hf(str(hf_dir[0]))
    linear = dataclasses.replace(config, projector="linear")
    with pytest.raises(CheckpointError, match="projector='linear'"):
        save_hf(linear, {**params, "proj": {"fc": params["proj"]["fc1"]}}, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x" / "model.safetensors")


def test_unscanned_params_write_the_same_files(hf_dir):
    config, params = load_hf(str(hf_dir[0]))
    scanned = to_hf_tensors(config, params)
    unscanned = to_hf_tensors(config, to_unscanned_layout(params, config))
    assert scanned.keys() == unscanned.keys()
    for key in scanned:
        np.testing.assert_array_equal(scanned[key], unscanned[key])
