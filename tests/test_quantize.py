"""Weight-only int8 for inference (models/quantize.py, `Dense` reading int8 kernels,
`load_model(quantize="int8")`, `--quantize int8`): the rounding bound, logits close to
float32's, the bytes, placement on a mesh, and the command line."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import tiny_hf_config, tiny_hf_model

from llava_jax import generate
from llava_jax.inference.load import InputError, load_model
from llava_jax.models.config import ModelConfig, TextConfig, VisionConfig
from llava_jax.models.llava import Llava, abstract_params, to_unscanned_layout
from llava_jax.models.quantize import (
    DECODER_DENSE,
    decoder_dense_bytes,
    is_quantized,
    quantize_abstract,
    quantize_kernel,
    quantize_params,
)
from llava_jax.sharding import make_mesh

QUESTION = "What color are the objects?"


def tiny_config(**numerics) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, image_size=28,
            patch_size=14,
        ),
        text=TextConfig(
            vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=128,
        ),
        image_token_id=95,
        attention="xla",
        **numerics,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    """(config, float32 params) of a tiny random LLaVA: Gaussian weights, norm scales
    around 1 (drawn with numpy on the abstract tree: no init program to compile)."""
    config = tiny_config()
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "norm" in jax.tree_util.keystr(path) and path[-1].key == "scale":
            return 1 + 0.2 * noise
        return 0.05 * noise

    return config, jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract_params(config)))


@pytest.mark.timeout(60)
def test_per_channel_rounding_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    # Channels of very different sizes: per-channel scales keep each one's relative error.
    kernel = rng.standard_normal((96, 40)) * np.geomspace(1e-3, 10.0, 40)
    kernel[:, 7] = 0.0  # an all-zero channel stays exactly zero
    q, scale = quantize_kernel(kernel.astype(np.float32), num_contract=1)
    q, scale = np.asarray(q), np.asarray(scale)
    assert q.dtype == np.int8 and scale.shape == (40,) and scale.dtype == np.float32
    assert np.abs(q).max() <= 127
    absmax = np.abs(kernel).max(axis=0)
    np.testing.assert_allclose(scale[absmax > 0], absmax[absmax > 0] / 127, rtol=1e-6)
    assert np.all(np.abs(q[:, 7]) == 0)
    error = np.abs(kernel - q * scale)
    # Round to nearest: within half a step of its channel (and float32 slack).
    assert np.all(error <= scale / 2 * (1 + 1e-5) + 1e-12)
    # Every channel's largest weight is exact up to float32 (it is +-127 steps).
    assert np.all(np.abs(q)[:, absmax > 0].max(axis=0) == 127)

    # Several contracted axes and a leading layer axis: a scale per (layer, output).
    stacked = rng.standard_normal((3, 4, 8, 16)).astype(np.float32)  # [L, heads, dim, out]
    q, scale = quantize_kernel(stacked, num_contract=2, num_leading=1)
    q, scale = np.asarray(q), np.asarray(scale)
    assert q.shape == stacked.shape and scale.shape == (3, 16)
    np.testing.assert_allclose(scale, np.abs(stacked).max(axis=(1, 2)) / 127, rtol=1e-6)
    step = scale[:, None, None]
    assert np.all(np.abs(stacked - q * step) <= step / 2 * (1 + 1e-5))


def _inputs(config: ModelConfig):
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 90, (2, 16)).astype(np.int32)
    ids[:, 1 : 1 + config.num_image_tokens] = config.image_token_id
    images = rng.standard_normal((2, 1, 1, 28, 28, 3)).astype(np.float32)
    return ids, images


@pytest.mark.timeout(240)
def test_quantized_logits_are_close_to_float32(tiny):
    config, params = tiny
    quantized = quantize_params(config, params)
    ids, images = _inputs(config)
    forward = jax.jit(lambda params: Llava(config).apply({"params": params}, ids, images))
    reference, logits = np.asarray(forward(params)), np.asarray(forward(quantized))
    # The tolerance: each weight moves by at most half a step, uniformly, an rms error of
    # absmax/(127*sqrt(12)); for Gaussian weights (absmax ~3 sigma over 64-96 inputs) that
    # is ~0.7% of their spread, and each projection's output is off by the same ~0.7% of its
    # rms (independent errors over the inputs). The 14 quantized projections (7 per layer,
    # 2 layers) add in quadrature at most: sqrt(14) * 0.7% ~ 2.6% (residuals and the
    # unquantized LM head only dilute it). Measured 1.2%; asserted < 3% of the logits' rms,
    # and the greedy token the same at >= 90% of the positions.
    relative = np.sqrt(np.mean((logits - reference) ** 2) / np.mean(reference**2))
    assert 0 < relative < 0.03, relative
    agree = np.mean(logits.argmax(-1) == reference.argmax(-1))
    assert agree >= 0.9, agree

    # The unscanned layout quantizes to the same numbers.
    unscanned = config.replace(scan_layers=False)
    per_layer = quantize_params(unscanned, to_unscanned_layout(params, config))
    forward = jax.jit(lambda params: Llava(unscanned).apply({"params": params}, ids, images))
    np.testing.assert_allclose(forward(per_layer), logits, rtol=1e-5, atol=1e-6)
    # bfloat16 compute on the int8 weights (int8 values are exact in bfloat16): its 8-bit
    # mantissa adds ~0.4% per rounding on top; measured 1.5% from float32, asserted 5%.
    bf16 = config.replace(dtype="bfloat16")
    low = np.asarray(jax.jit(Llava(bf16).apply)({"params": quantized}, ids, images))
    assert np.sqrt(np.mean((low - reference) ** 2) / np.mean(reference**2)) < 0.05


def dequantized(params: dict) -> dict:
    """A float32 tree of `params` with each int8 kernel replaced by its value, worked out
    here from the stored arrays: `kernel = kernel_int8 * scale`, the scale broadcast over
    the contracted axes (`scale` is `[*leading, *features]`, `kernel_int8` is `[*leading,
    *contracted, *features]`, the leading axis being the scanned layers)."""
    if not isinstance(params, dict):
        return params
    if "kernel_int8" not in params:
        return {key: dequantized(value) for key, value in params.items()}
    node = dict(params)
    q = np.asarray(node.pop("kernel_int8"))
    scale = np.asarray(node.pop("scale"))
    assert q.dtype == np.int8 and scale.dtype == np.float32
    leading = 1  # the scanned layers
    num_contract = q.ndim - scale.ndim
    assert q.shape[:leading] + q.shape[leading + num_contract :] == scale.shape
    shape = scale.shape[:leading] + (1,) * num_contract + scale.shape[leading:]
    return {"kernel": q.astype(np.float32) * scale.reshape(shape), **node}


@pytest.mark.timeout(240)
def test_quantized_logits_equal_float32_on_the_dequantized_weights(tiny):
    """The int8 forward pass is the float forward pass of the weights it stands for: its
    logits equal, within float32 rounding, those of the ordinary float32 model given each
    int8 kernel times its per-channel scale (worked out here from the stored arrays)."""
    config, params = tiny
    quantized = quantize_params(config, params)
    ids, images = _inputs(config)
    forward = jax.jit(lambda params: Llava(config).apply({"params": params}, ids, images))
    logits = np.asarray(forward(quantized))
    reference = np.asarray(forward(dequantized(quantized)))
    assert not is_quantized(dequantized(quantized))
    # Only where the scale multiplies (the output of x @ q, or q itself) differs: a float32
    # rounding or two per projection, ~1e-7 relative, through 2 layers. Measured 5e-7 of
    # the logits' scale; asserted 1e-5 (the int8 rounding itself is ~1e-2: test above).
    scale = np.abs(reference).max()
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5 * scale)


@pytest.mark.timeout(60)
def test_quantized_decoder_dense_layers_take_a_quarter_of_float32(tiny):
    config, params = tiny
    quantized = quantize_params(config, params)
    layers, float_layers = quantized["llm"]["layers"], params["llm"]["layers"]
    kernels = scales = 0
    for path, num_contract in DECODER_DENSE.items():
        node, float_node = layers, float_layers
        for name in path:
            node, float_node = node[name], float_node[name]
        assert set(node) == {"kernel_int8", "scale"}, path
        assert node["kernel_int8"].dtype == jnp.int8 and node["scale"].dtype == jnp.float32
        assert node["kernel_int8"].shape == float_node["kernel"].shape
        # One scale per layer and output channel.
        assert node["scale"].shape == (2, *node["kernel_int8"].shape[1 + num_contract :])
        kernels += node["kernel_int8"].nbytes
        scales += node["scale"].nbytes
    float_bytes = decoder_dense_bytes(params)
    int8_bytes = decoder_dense_bytes(quantized)
    assert kernels * 4 == float_bytes and int8_bytes == kernels + scales
    # 1 byte per weight plus 4 per output channel: 1/4 of float32, plus 1/(inputs) at most
    # (64 or 96 here: the scales are a visible share only in a model this small).
    ratio = int8_bytes / float_bytes
    assert 0.25 < ratio <= 0.25 + 1 / 64, ratio
    # Everything else is untouched: embedding, LM head, norms, vision tower, projector.
    for tower in ("img", "proj"):
        assert jax.tree.all(jax.tree.map(lambda a, b: a is b, params[tower], quantized[tower]))
    for name in ("embed", "final_norm", "lm_head"):
        assert quantized["llm"][name] is params["llm"][name]
    assert is_quantized(quantized) and not is_quantized(params)
    assert decoder_dense_bytes(quantize_params(config, quantized)) == int8_bytes  # idempotent

    # The abstract tree says the same shapes, with logical axes for every new leaf.
    boxed = quantize_abstract(config, abstract_params(config))
    assert decoder_dense_bytes(boxed) == int8_bytes
    gate = boxed["llm"]["layers"]["gate"]
    assert gate["kernel_int8"].names == ("layers", "embed", "mlp")
    assert gate["scale"].names == ("layers", "mlp")
    assert boxed["llm"]["layers"]["attn"]["out"]["scale"].names == ("layers", "embed")


# --- loading, a mesh, and the command line ----------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from test_inference_cli import save_word_tokenizer

    directory = tmp_path_factory.mktemp("hf_llava_q")
    tiny_hf_model(tiny_hf_config(), seed=3).save_pretrained(directory)
    save_word_tokenizer(directory)
    return directory


@pytest.mark.timeout(300)
def test_quantized_model_loads_onto_a_mesh_and_decodes_as_on_one_device(hf_dir):
    single = load_model(str(hf_dir), quantize="int8")
    assert single.quantize == "int8"
    on_mesh = load_model(str(hf_dir), quantize="int8", mesh=make_mesh((2, 2, 2)))
    gate = on_mesh.params["llm"]["layers"]["gate"]
    assert gate["kernel_int8"].dtype == jnp.int8
    # The logical axes hold: [layers, embed -> fsdp, mlp -> tensor]; scales [layers, mlp].
    assert gate["kernel_int8"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert gate["scale"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    assert len(gate["kernel_int8"].sharding.device_set) == 8
    for loaded in (single, on_mesh):
        assert loaded.params["llm"]["layers"]["attn"]["query"]["kernel_int8"].dtype == jnp.int8
    ids = single.prompt_ids([single.user_turn(QUESTION, with_image=False)])
    tokens = [m.generate([ids], None, None, m.sampling(8)).tokens[0] for m in (single, on_mesh)]
    np.testing.assert_array_equal(tokens[0], tokens[1])
    assert len(tokens[0]) > 2

    with pytest.raises(InputError, match="int4.*int8"):
        load_model(str(hf_dir), quantize="int4")


@pytest.mark.timeout(300)
def test_generate_cli_greedy_with_quantize_int8(hf_dir, capsys):
    argv = ["--checkpoint", str(hf_dir), "--prompt", QUESTION, "--max-new-tokens", "6"]
    assert generate.main([*argv, "--quantize", "int8"]) == 0
    out = capsys.readouterr().out.strip()
    model = load_model(str(hf_dir), quantize="int8")
    expected = generate.answer(model, QUESTION, None, max_new_tokens=6)
    assert out == expected and out


@pytest.mark.timeout(60)
def test_an_unknown_quantize_value_is_one_line_and_exit_2(hf_dir, capsys):
    code = generate.main(["--checkpoint", str(hf_dir), "--prompt", "q", "--quantize", "int4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: --quantize") and "int8" in err, err
