"""llava_jax logits equal transformers' LlavaForConditionalGeneration on tiny random models."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
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


def _load(tmp_path, hf_config, scan_layers=True, model=None):
    """(transformers model, our config, our params): `model`, or a tiny random one."""
    model = tiny_hf_model(hf_config) if model is None else model
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


# Padding a causal decoder's real tokens can see: before them (left padding) and between
# the conversations of a packed row. (Right padding comes after every real token, so it
# cannot tell a mask from none.) cudnn, which takes only row lengths, needs a GPU.
ATTENTION_ON_CPU = ("xla", "chunked", "dot_product", "splash")
LENGTH = 40
# Each packed row: (padding before, sample) for its conversations, in order.
PACKED_ROWS = [[(0, 0), (3, 1)], [(2, 2), (4, 3)]]


def _left_padded(inputs: dict, image_slots: int) -> dict:
    """Right-padded `inputs` with each row's padding moved before its tokens."""
    pads = [int((mask == 0).sum()) for mask in inputs["attention_mask"]]
    out = {
        key: np.stack([np.roll(row, pad) for row, pad in zip(inputs[key], pads, strict=True)])
        for key in ("input_ids", "attention_mask")
    }
    extra = image_slots - inputs["images"].shape[1]
    out["images"] = np.pad(inputs["images"], [(0, 0), (0, extra)] + [(0, 0)] * 4)
    out["image_mask"] = np.pad(inputs["image_mask"], [(0, 0), (0, extra)])
    # 0..T-1 from the row's start, as transformers' forward numbers them
    out["positions"] = np.broadcast_to(np.arange(LENGTH), out["input_ids"].shape)
    return out


def _packed_with_gaps(samples: dict, image_slots: int) -> tuple[dict, list[tuple]]:
    """`PACKED_ROWS` of the right-padded `samples`: each conversation its own segment,
    positions from 0, its images in the row's next slots. Returns the rows and each
    conversation's `(row, start, sample, length)`."""
    rows = len(PACKED_ROWS)
    out = {
        "input_ids": np.zeros((rows, LENGTH), np.int32),
        "attention_mask": np.zeros((rows, LENGTH), np.int32),
        "positions": np.zeros((rows, LENGTH), np.int32),
        "images": np.zeros((rows, image_slots, *samples["images"].shape[2:]), np.float32),
        "image_mask": np.zeros((rows, image_slots), bool),
    }
    spans = []
    for row, conversations in enumerate(PACKED_ROWS):
        start, slot = 0, 0
        for segment, (gap, sample) in enumerate(conversations, 1):
            start += gap
            length = int(samples["attention_mask"][sample].sum())
            where = slice(start, start + length)
            out["input_ids"][row, where] = samples["input_ids"][sample, :length]
            out["attention_mask"][row, where] = segment
            out["positions"][row, where] = np.arange(length)
            count = int(samples["image_mask"][sample].sum())
            out["images"][row, slot : slot + count] = samples["images"][sample, :count]
            out["image_mask"][row, slot : slot + count] = True
            spans.append((row, start, sample, length))
            start, slot = start + length, slot + count
    return out, spans


@pytest.fixture(scope="module")
def padded_batch(tmp_path_factory):
    """(config, params, batch, checks): two left-padded rows and two packed rows with
    padding between and around their conversations, in one batch; each check names the
    rows' real tokens and transformers' logits for them (left-padded under its attention
    mask; each packed conversation alone)."""
    hf_config = tiny_hf_config()
    model, config, params = _load(tmp_path_factory.mktemp("padded"), hf_config)
    slots = 3
    left = _left_padded(
        make_inputs(hf_config, [1, 2], LENGTH, seed=1, real_lengths=[25, 33]), slots
    )
    samples = make_inputs(hf_config, [1, 0, 2, 1], 20, seed=2, real_lengths=[14, 9, 18, 12])
    packed, spans = _packed_with_gaps(samples, slots)
    batch = {key: np.concatenate([left[key], packed[key]]) for key in left}
    left_ref, samples_ref = reference_logits(model, left), reference_logits(model, samples)
    checks = [
        (f"left-padded row {row}", (row, mask.astype(bool)), left_ref[row][mask.astype(bool)])
        for row, mask in enumerate(left["attention_mask"])
    ]
    for row, start, sample, length in spans:
        name = f"packed row {row}, conversation at {start}"
        checks.append((name, (2 + row, slice(start, start + length)), samples_ref[sample, :length]))
    return config, params, batch, checks


@pytest.mark.parametrize("attention", ATTENTION_ON_CPU)
def test_left_padding_and_gaps_in_packed_rows_are_masked(padded_batch, attention):
    """Each implementation CPUs run (splash interpreted): real tokens after padding, and
    each conversation of a packed row between gaps, get transformers' logits."""
    config, params, batch, checks = padded_batch
    model = Llava(dataclasses.replace(config, attention=attention))
    logits = np.asarray(
        jax.jit(model.apply)({"params": params}, **{k: jnp.asarray(v) for k, v in batch.items()})
    )
    errors = {name: float(np.abs(logits[where] - ref).max()) for name, where, ref in checks}
    assert max(errors.values()) <= TOLERANCE, {k: v for k, v in errors.items() if v > TOLERANCE}


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


# transformers' random init (std 0.02) barely uses its parts: attention is almost uniform
# and the image features are small beside the residual stream, so removing RoPE moved its
# logits by 0.0033, less than their bf16 error (0.0039). Scaled as below (sharp attention,
# image features and MLPs that count), each part moves the logits by 0.33 or more.
SHARPENED = {
    r"language_model\.layers\.\d+\.self_attn\.[qk]_proj\.weight": 10.0,
    r"language_model\.layers\.\d+\.mlp\..*\.weight": 2.0,
    r"multi_modal_projector\..*\.weight": 10.0,
}
# Twice the bf16 error measured on the sharpened model's inputs below (0.0064, largest
# |logit| 0.57; transformers' float32 logits the reference).
BF16_TOLERANCE = 0.013


def _sharpened(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with the weights `SHARPENED` names scaled."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            for pattern, factor in SHARPENED.items():
                if re.search(pattern, name):
                    param.mul_(factor)
    return model


def _rotation_by_zero(module, args, out):
    cos, sin = out
    return torch.ones_like(cos), torch.zeros_like(sin)


def _features_one_token_on(module, args, out):
    return torch.roll(out, -1, dims=1)  # each image token takes the next one's feature


def _skipped(module, args, out):
    return args[0]


def _reference_without(model, inputs: dict, part: str) -> np.ndarray:
    """transformers' logits with one part of the model taken out by forward hooks: RoPE,
    the merge's order, or RMSNorms (their inputs passed on as they are)."""
    decoder = model.model.language_model
    hooks = {
        "rope": ([decoder.rotary_emb], _rotation_by_zero),
        "merge": ([model.model.multi_modal_projector], _features_one_token_on),
        "attention_norms": ([layer.input_layernorm for layer in decoder.layers], _skipped),
        "mlp_norms": ([layer.post_attention_layernorm for layer in decoder.layers], _skipped),
        "final_norm": ([decoder.norm], _skipped),
    }
    modules, hook = hooks[part]
    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        return reference_logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()


def test_bfloat16_compute_stays_close(tmp_path):
    """bf16 compute with f32 parameters: logits within twice their measured bf16 error of
    the f32 reference, on a model whose RoPE, RMSNorms and image merge each move the
    logits by far more than that (so a bf16 path that loses one fails)."""
    hf_config = tiny_hf_config()
    model, config, params = _load(tmp_path, hf_config, model=_sharpened(tiny_hf_model(hf_config)))
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    inputs = make_inputs(hf_config, [1, 1], length=32)
    ours = _ours(bf16, params, inputs)
    ref = reference_logits(model, inputs)
    assert ours.dtype == np.float32
    assert _max_error(ours, ref, inputs["attention_mask"]) <= BF16_TOLERANCE
    for part in ("rope", "attention_norms", "mlp_norms", "final_norm", "merge"):
        moved = _max_error(_reference_without(model, inputs, part), ref, inputs["attention_mask"])
        assert moved > 20 * BF16_TOLERANCE, part
