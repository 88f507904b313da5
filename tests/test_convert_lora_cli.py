"""`python -m llava_jax.convert` on LoRA checkpoints, as subprocesses: params-to-hf refuses a
LoRA checkpoint without --merge-lora and writes the merged model with it, lora-to-peft and
peft-to-params round-trip the adapters, and merge-lora writes the plain model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict
from hf_reference import make_inputs, reference_logits, tiny_hf_config, tiny_hf_model
from trainer_fixtures import REPO, subprocess_env
from transformers import LlavaForConditionalGeneration

from llava_jax.checkpoint import load_params, save_params
from llava_jax.convert import load_hf
from llava_jax.models.config import LoraConfig
from llava_jax.models.llava import Llava, abstract_params
from llava_jax.models.lora import LORA_FACTORS

LORA = LoraConfig(rank=4, alpha=8.0)


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llava_jax.convert", *map(str, args)],
        cwd=REPO,
        env=subprocess_env(devices=1),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    """A tiny transformers LLaVA with random adapters on every decoder dense layer, saved as
    a LoRA params checkpoint (and its base as a plain one), with inputs and its logits."""
    root = tmp_path_factory.mktemp("lora_cli")
    model = tiny_hf_model(tiny_hf_config())
    model.save_pretrained(root / "hf")
    config, params = load_hf(str(root / "hf"))
    lora_config = dataclasses.replace(config, lora=LORA)
    rng = np.random.default_rng(1)
    flat = flatten_dict(jax.tree.map(np.asarray, params))
    shapes = flatten_dict(nn.meta.unbox(abstract_params(lora_config)))  # no compile: fast
    for path, value in shapes.items():
        if path[-1] in LORA_FACTORS:  # trained-looking: B is not zero
            flat[path] = (0.2 * rng.standard_normal(value.shape)).astype(value.dtype)
    lora_params = unflatten_dict(flat)
    save_params(str(root / "lora"), lora_config, lora_params)
    save_params(str(root / "base"), config, params)
    inputs = make_inputs(model.config, [1, 2], length=24, real_lengths=[20, 24])
    logits = np.asarray(Llava(lora_config).apply({"params": lora_params}, **inputs))
    valid = inputs["attention_mask"].astype(bool)
    # the adapters really move the logits, so the comparisons below test them
    assert np.abs(reference_logits(model, inputs) - logits)[valid].max() > 1e-2
    return root, lora_config, lora_params, inputs, logits, valid


def test_params_to_hf_needs_merge_lora_and_writes_the_merged_model(lora_ckpt):
    root, _, _, inputs, logits, valid = lora_ckpt
    refused = convert("params-to-hf", "--params", root / "lora", "--out", root / "refused")
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "--merge-lora" in lines[-1], refused.stderr
    assert "lora-to-peft" in lines[-1]
    assert not (root / "refused").exists()

    done = convert(
        "params-to-hf", "--params", root / "lora", "--out", root / "merged_hf", "--merge-lora"
    )
    assert done.returncode == 0, done.stderr
    merged = LlavaForConditionalGeneration.from_pretrained(str(root / "merged_hf")).eval()
    theirs = reference_logits(merged, inputs)
    assert np.abs(theirs - logits)[valid].max() <= 1e-4


def test_lora_to_peft_and_back_gives_the_same_adapters(lora_ckpt):
    root, lora_config, lora_params, _, _, _ = lora_ckpt
    done = convert(
        "lora-to-peft", "--params", root / "lora", "--out", root / "adapter",
        "--base-model", "llava-hf/tiny",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    settings = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == "llava-hf/tiny"
    assert (settings["r"], settings["lora_alpha"]) == (LORA.rank, LORA.alpha)

    done = convert(
        "peft-to-params", "--params", root / "base", "--adapter", root / "adapter",
        "--out", root / "again",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config, params = load_params(str(root / "again"))
    assert (config.lora.rank, config.lora.alpha) == (LORA.rank, LORA.alpha)
    ours, again = _flat(lora_params), _flat(params)
    assert ours.keys() == again.keys()
    factors = [k for k in ours if k.rsplit("/", 1)[-1] in LORA_FACTORS]
    assert len(factors) == 2 * 7
    for key in ours:
        np.testing.assert_allclose(again[key], ours[key], atol=1e-6, rtol=0, err_msg=key)
    # every layer the checkpoint adapts is adapted again, and nothing else
    for key in factors:
        assert config.lora.adapts(key.rsplit("/", 1)[0]), key

    # a LoRA checkpoint is no base for an adapter; a plain one has no adapter to export
    refused = convert(
        "peft-to-params", "--params", root / "lora", "--adapter", root / "adapter",
        "--out", root / "twice",
    )  # fmt: skip
    assert refused.returncode == 2 and "merge-lora" in refused.stderr, refused.stderr
    refused = convert("lora-to-peft", "--params", root / "base", "--out", root / "none")
    assert refused.returncode == 2 and "lora.rank=0" in refused.stderr, refused.stderr


def test_merge_lora_writes_the_plain_model(lora_ckpt):
    root, _, _, inputs, logits, valid = lora_ckpt
    done = convert("merge-lora", "--params", root / "lora", "--out", root / "merged")
    assert done.returncode == 0, done.stderr
    config, params = load_params(str(root / "merged"))
    assert config.lora.rank == 0
    assert not any(k.rsplit("/", 1)[-1] in LORA_FACTORS for k in _flat(params))
    ours = np.asarray(Llava(config).apply({"params": params}, **inputs))
    assert np.abs(ours - logits)[valid].max() <= 1e-4
