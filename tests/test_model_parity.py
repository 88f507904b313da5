"""llava_jax logits equal transformers' LlavaForConditionalGeneration on tiny random models."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import make_inputs, reference_logits, tiny_hf_config, tiny_hf_model

from llava_jax.convert import load_hf
from llava_jax.models.llava import Llava, to_scan_layout, to_unscanned_layout

TOLERANCE = 1e-4

# name -> (config overrides, images per sample, right-padded real lengths or None)
CASES = {
    "gqa_scan": (dict(), [1, 1], None),
    "mha": (dict(text=dict(num_key_value_heads=6)), [1, 1], None),
    "feature_layer_-1": (dict(vision_feature_layer=-1), [1, 1], None),
    "feature_layer_list": (dict(vision_feature_layer=[0, -2]), [1, 1], None),
    "select_full": (dict(vision_feature_select_strategy="full"), [1, 1], None),
    "full_and_list": (
        dict(vision_feature_select_strategy="full", vision_feature_layer=[-1, -3]),
        [1, 1],
        None,
    ),
    "two_images_one_sample": (dict(), [2, 1], None),
    "sample_without_image": (dict(), [1, 0], None),
    "right_padded": (dict(), [1, 1], [30, 19]),
    "tied_embeddings": (dict(text=dict(tie_word_embeddings=True)), [1, 1], None),
    "llama3_rope": (
        dict(
            text=dict(
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=50000.0,
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=16,
                )
            )
        ),
        [1, 1],
        None,
    ),
    "linear_rope": (
        dict(text=dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
        [1, 1],
        None,
    ),
    "head_dim_biases_and_gelu": (
        dict(
            text=dict(head_dim=12, attention_bias=True, mlp_bias=True),
            vision=dict(hidden_act="gelu"),
            multimodal_projector_bias=False,
        ),
        [1, 1],
        None,
    ),
}


def _load(tmp_path, hf_config, scan_layers=True):
    model = tiny_hf_model(hf_config)
    model.save_pretrained(tmp_path / "hf")
    config, params = load_hf(str(tmp_path / "hf"), scan_layers=scan_layers)
    return model, config, params


def _ours(config, params, inputs):
    logits = Llava(config).apply(
        {"params": params},
        input_ids=jnp.asarray(inputs["input_ids"]),
        images=jnp.asarray(inputs["images"]),
        image_mask=jnp.asarray(inputs["image_mask"]),
        attention_mask=jnp.asarray(inputs["attention_mask"]),
    )
    return np.asarray(logits)


def _max_error(ours, ref, attention_mask):
    real = attention_mask.astype(bool)
    return float(np.abs(ours - ref)[real].max())


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path, name):
    overrides, images_per_sample, real_lengths = CASES[name]
    hf_config = tiny_hf_config(**overrides)
    model, config, params = _load(tmp_path, hf_config)
    inputs = make_inputs(hf_config, images_per_sample, length=32, real_lengths=real_lengths)
    ours = _ours(config, params, inputs)
    ref = reference_logits(model, inputs)
    assert ours.shape == ref.shape
    assert _max_error(ours, ref, inputs["attention_mask"]) <= TOLERANCE


@pytest.mark.parametrize("scan_layers", [True, False])
def test_scan_and_unscanned_layouts_agree(tmp_path, scan_layers):
    hf_config = tiny_hf_config()
    model, config, params = _load(tmp_path, hf_config, scan_layers=scan_layers)
    inputs = make_inputs(hf_config, [2, 0], length=32)
    ref = reference_logits(model, inputs)
    assert _max_error(_ours(config, params, inputs), ref, inputs["attention_mask"]) <= TOLERANCE
    # The same weights in the other layout run the other code path to the same logits.
    other = dataclasses.replace(config, scan_layers=not scan_layers)
    convert = to_unscanned_layout if scan_layers else to_scan_layout
    other_params = convert(params, config)
    assert ("layers" in other_params["llm"]) == (not scan_layers)
    ours_other = _ours(other, other_params, inputs)
    assert _max_error(ours_other, ref, inputs["attention_mask"]) <= TOLERANCE


def test_linear_projector_matches_transformers_with_one_layer(tmp_path):
    """LLaVA-1's `linear` projector: transformers with its projector cut to `linear_1`."""
    hf_config = tiny_hf_config()
    model, config, params = _load(tmp_path, hf_config)
    model.model.multi_modal_projector = model.model.multi_modal_projector.linear_1
    linear_config = dataclasses.replace(config, projector="linear")
    linear_params = {**params, "proj": {"fc": params["proj"]["fc1"]}}
    inputs = make_inputs(hf_config, [1, 1], length=32)
    ours = _ours(linear_config, linear_params, inputs)
    ref = reference_logits(model, inputs)
    assert _max_error(ours, ref, inputs["attention_mask"]) <= TOLERANCE


def test_mlp3x_projector_runs_three_layers(tmp_path):
    config, params = _load(tmp_path, tiny_hf_config())[1:]
    deep = dataclasses.replace(config, projector="mlp3x_gelu")
    variables = Llava(deep).init(
        jax.random.key(0),
        jnp.asarray(make_inputs(tiny_hf_config(), [1], 32)["input_ids"]),
        jnp.zeros((1, 1, 1, 28, 28, 3)),
    )
    assert sorted(variables["params"]["proj"]) == ["fc1", "fc2", "fc3"]


def test_bfloat16_compute_stays_close(tmp_path):
    """bf16 compute with f32 parameters: logits near the f32 reference, parameters f32."""
    hf_config = tiny_hf_config()
    model, config, params = _load(tmp_path, hf_config)
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    inputs = make_inputs(hf_config, [1, 1], length=32)
    ours = _ours(bf16, params, inputs)
    ref = reference_logits(model, inputs)
    assert ours.dtype == np.float32
    scale = np.abs(ref).max()
    assert _max_error(ours, ref, inputs["attention_mask"]) <= 0.05 * scale
