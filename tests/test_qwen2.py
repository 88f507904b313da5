"""The Qwen2 decoder (LLaVA-OneVision's): LLaMA's block with biases on q/k/v only, its own
RoPE base and RMSNorm eps, tied embeddings in the 0.5B size. Logits equal transformers'
`Qwen2ForCausalLM` alone and inside a `LlavaForConditionalGeneration`, greedy generation
equals its `generate`, `save_hf` round-trips, and a sliding window is refused by name."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import (
    IMAGE_TOKEN,
    TINY_TEXT,
    TINY_VISION,
    make_inputs,
    perturbed,
    reference_logits,
    tiny_hf_config,
)
from test_generate import hf_greedy, make_prompts
from test_quantize import dequantized
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llava_jax.convert import CheckpointError, load_hf, load_towers, save_hf
from llava_jax.inference import Engine, SamplingConfig
from llava_jax.models.config import LoraConfig
from llava_jax.models.llava import Llava, abstract_params
from llava_jax.models.quantize import quantize_params

TOLERANCE = 1e-4
# As Qwen2-0.5B: RoPE base 1e6, RMSNorm eps 1e-6 (and GQA: TINY_TEXT's 6 heads, 2 kv heads).
QWEN2 = dict(rope_parameters=dict(rope_type="default", rope_theta=1e6), rms_norm_eps=1e-6)
# Transformers starts q/k/v biases at zero, where a decoder that drops one would still
# match: they are drawn at std 1 (v's, added to every token, at 0.05), and q/k kernels scaled
# so attention is sharp, so that dropping the k bias changes greedy tokens, not only logits.
QK_BIAS_STD, V_BIAS_STD, SHARP_QK = 1.0, 0.05, 10.0
DECODER_ATTENTION = re.compile(r"^(?!.*vision_tower).*self_attn\.([qkv])_proj\.(weight|bias)$")


def with_qkv_biases(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`model` (a Qwen2ForCausalLM or a LLaVA around one), `perturbed` (norms off 1), with
    random q/k/v biases and sharpened q/k kernels in its decoder."""
    torch.manual_seed(seed)
    perturbed(model)
    biases = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            match = DECODER_ATTENTION.search(name)
            if match is None:
                continue
            projection, kind = match.groups()
            if kind == "bias":
                param.normal_(0.0, V_BIAS_STD if projection == "v" else QK_BIAS_STD)
                biases += 1
            elif projection in "qk":
                param.mul_(SHARP_QK)
    assert biases, "no q/k/v biases: not a Qwen2 decoder"
    return model.eval()


def _ours(config, params, input_ids, attention_mask, **images):
    return np.asarray(
        jax.jit(Llava(config).apply)(
            {"params": params},
            jnp.asarray(input_ids, jnp.int32),
            attention_mask=jnp.asarray(attention_mask, jnp.int32),
            **{k: jnp.asarray(v) for k, v in images.items()},
        )
    )


@pytest.mark.parametrize(
    ("tied", "scan_layers"), [(False, True), (True, True), (False, False), (True, False)]
)
def test_qwen2_causal_lm_logits_equal_transformers(tmp_path, tied, scan_layers):
    """A Qwen2ForCausalLM directory as `load_towers`' LLM (beside a CLIP tower): our decoder's
    logits on text alone equal transformers' (float32, one row right-padded)."""
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "clip")
    qwen = Qwen2ForCausalLM(Qwen2Config(**{**TINY_TEXT, **QWEN2}, tie_word_embeddings=tied))
    with_qkv_biases(qwen, seed=1).save_pretrained(tmp_path / "qwen2")
    config, params = load_towers(
        str(tmp_path / "clip"),
        str(tmp_path / "qwen2"),
        image_token_id=IMAGE_TOKEN,
        scan_layers=scan_layers,
    )
    text = config.text
    assert (text.model_type, text.qkv_bias, text.attention_bias) == ("qwen2", True, False)
    assert (text.rope.theta, text.rms_norm_eps, text.tie_word_embeddings) == (1e6, 1e-6, tied)
    assert ("lm_head" in params["llm"]) == (not tied)
    layers = params["llm"]["layers" if scan_layers else "layers_0"]["attn"]
    assert {"bias"} <= set(layers["key"]) and "bias" not in layers["out"]

    rng = np.random.default_rng(2)
    input_ids = rng.integers(0, IMAGE_TOKEN, (2, 24))
    mask = np.ones_like(input_ids)
    mask[1, 17:] = 0
    with torch.no_grad():
        ref = qwen(
            input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask)
        ).logits.numpy()
    ours = _ours(config, params, input_ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= TOLERANCE


@pytest.fixture(scope="module")
def llava_qwen2(tmp_path_factory):
    """(hf config, transformers model, its directory, our config, our params): a tiny
    LLaVA whose decoder is a Qwen2 with random q/k/v biases, loaded by `load_hf`."""
    hf_config = tiny_hf_config(text_class=Qwen2Config, text=QWEN2)
    torch.manual_seed(3)
    model = with_qkv_biases(LlavaForConditionalGeneration(hf_config), seed=4)
    directory = tmp_path_factory.mktemp("llava_qwen2")
    model.save_pretrained(directory)
    config, params = load_hf(str(directory))
    return hf_config, model, directory, config, params


def test_llava_with_a_qwen2_decoder_equals_transformers(llava_qwen2):
    hf_config, model, _, config, params = llava_qwen2
    assert config.text.model_type == "qwen2" and config.text.qkv_bias
    inputs = make_inputs(hf_config, [1, 2], length=32, real_lengths=[30, 32])
    images = {k: inputs[k] for k in ("images", "image_mask")}
    ours = _ours(config, params, inputs["input_ids"], inputs["attention_mask"], **images)
    ref = reference_logits(model, inputs)
    real = inputs["attention_mask"].astype(bool)
    assert np.abs(ours - ref)[real].max() <= TOLERANCE


def test_greedy_generation_equals_transformers_generate(llava_qwen2):
    hf_config, model, _, config, params = llava_qwen2
    prompts, images, image_mask = make_prompts(hf_config, [19, 11, 30], [1, 0, 2], seed=5)
    steps = 10
    engine = Engine(config)
    result = engine.generate(
        engine.place(params), prompts, images, image_mask, SamplingConfig(max_new_tokens=steps)
    )
    expected = hf_greedy(model, prompts, images, image_mask, steps)
    np.testing.assert_array_equal(np.stack(result.tokens), expected)


def test_save_hf_round_trips_a_qwen2_llava(llava_qwen2, tmp_path):
    """`save_hf` writes a Qwen2 text config (no sliding window) and the q/k/v biases;
    transformers reads it back to the same logits, and so do we, to the same parameters."""
    hf_config, model, _, config, params = llava_qwen2
    save_hf(config, params, str(tmp_path / "ours"))
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    text = again.config.text_config
    assert text.model_type == "qwen2" and not text.use_sliding_window
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rms_norm_eps == 1e-6
    inputs = make_inputs(hf_config, [1, 1], length=32, seed=6)
    real = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(
        reference_logits(again, inputs)[real],
        reference_logits(model, inputs)[real],
        atol=1e-5,
        rtol=0,
    )
    config_again, params_again = load_hf(str(tmp_path / "ours"))
    # Qwen2Config has no head_dim unless given one; save_hf writes the resolved one.
    text = dataclasses.replace(config.text, head_dim=config.text.resolved_head_dim)
    assert config_again == dataclasses.replace(config, text=text)
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_int8_and_lora_keep_the_qkv_biases(llava_qwen2):
    """int8 weights keep q/k/v's float biases (the logits are the float model's on the
    dequantized kernels); LoRA adapts the biased projections, the biases sharded as their
    output axes."""
    _, _, _, config, params = llava_qwen2
    quantized = quantize_params(config, params)
    attn = quantized["llm"]["layers"]["attn"]
    assert all({"kernel_int8", "bias"} <= set(attn[name]) for name in ("query", "key", "value"))
    assert "bias" not in attn["out"]
    ids = jnp.asarray(make_inputs(tiny_hf_config(), [0], length=16)["input_ids"])
    forward = jax.jit(lambda params: Llava(config).apply({"params": params}, ids))
    reference = np.asarray(forward(dequantized(quantized)))
    scale = np.abs(reference).max()
    np.testing.assert_allclose(np.asarray(forward(quantized)), reference, atol=1e-5 * scale)

    lora = dataclasses.replace(config, lora=LoraConfig(rank=2))
    attn = abstract_params(lora)["llm"]["layers"]["attn"]
    assert {"kernel", "bias", "lora_a", "lora_b"} <= set(attn["key"])
    assert attn["key"]["bias"].names == ("layers", "kv_heads", "head_dim")
    assert attn["query"]["bias"].names == ("layers", "heads", "head_dim")
    assert "bias" not in attn["out"]


def test_a_sliding_window_is_refused_by_name(tmp_path):
    """OneVision's Qwen2 checkpoints say use_sliding_window false; true is refused, as a
    LLaVA's text config and as `load_towers`' LLM (the configs alone are read first)."""
    window = dict(QWEN2, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    tiny_hf_config(text_class=Qwen2Config, text=window).save_pretrained(tmp_path / "llava")
    with pytest.raises(CheckpointError, match=r"text_config\.use_sliding_window=True"):
        load_hf(str(tmp_path / "llava"))
    CLIPVisionConfig(**TINY_VISION).save_pretrained(tmp_path / "clip")
    Qwen2Config(**{**TINY_TEXT, **window}).save_pretrained(tmp_path / "qwen2")
    with pytest.raises(CheckpointError, match=r"use_sliding_window=True"):
        load_towers(str(tmp_path / "clip"), str(tmp_path / "qwen2"), image_token_id=IMAGE_TOKEN)
