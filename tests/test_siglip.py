"""The SigLIP vision tower (LLaVA-OneVision's): transformers' `SiglipVisionModel` and a
`LlavaForConditionalGeneration` with a SigLIP tower and the `full` feature strategy."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import (
    IMAGE_TOKEN,
    TINY_VISION,
    image_tokens_per_image,
    make_inputs,
    perturbed,
    reference_logits,
    tiny_hf_config,
    tiny_hf_model,
)
from PIL import Image
from safetensors.numpy import load_file
from test_convert import _assert_same_params
from test_generate import Generator, hf_greedy, make_prompts
from test_model_parity import TOLERANCE, _max_error, _ours, _sharpened
from transformers import (
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava_jax.convert import load_hf, load_towers, save_hf
from llava_jax.inference import SamplingConfig
from llava_jax.models.config import ModelConfig, VisionConfig
from llava_jax.models.inputs import ImageGeometry
from llava_jax.models.vit import VisionTransformer

# 42 px in 14 px patches: 9 patches, so the positions' order is seen; LLaVA-OneVision reads
# the last layer's hidden states, every patch.
SIGLIP = dict(vision=dict(image_size=42), vision_class=SiglipVisionConfig)
ONEVISION = dict(vision_feature_layer=-1, vision_feature_select_strategy="full")


def siglip_llava_config(**llava):
    return tiny_hf_config(**SIGLIP, **{**ONEVISION, **llava})


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """(directory, transformers model): a SigLIP LLaVA as `save_pretrained` writes it."""
    directory = tmp_path_factory.mktemp("siglip_llava")
    model = tiny_hf_model(siglip_llava_config())
    model.save_pretrained(directory)
    return directory, model


def _siglip_tower(seed: int = 0) -> SiglipVisionModel:
    """A random SigLIP vision model whose conv bias, positions and norms are not trivial."""
    torch.manual_seed(seed)
    tower = SiglipVisionModel(SiglipVisionConfig(**{**TINY_VISION, "image_size": 42}))
    with torch.no_grad():  # random init is N(0, 1/width): a missed position would show
        tower.embeddings.position_embedding.weight.mul_(3.0)
    return perturbed(tower)


@pytest.mark.parametrize("checkpoint", ["siglip_vision_model", "siglip"])
def test_tower_hidden_states_equal_transformers(tmp_path, checkpoint):
    """Every hidden state (0: the embeddings, L: the last layer's, which OneVision reads,
    without the post-norm) of a SigLIP vision checkpoint `load_towers` reads, alone or
    inside a whole `SiglipModel` (its text tower and pooling head skipped), equals
    transformers' `hidden_states`."""
    tower = _siglip_tower()
    if checkpoint == "siglip":
        whole = SiglipModel(
            SiglipConfig(
                vision_config=tower.config.to_dict(),
                text_config=dict(
                    vocab_size=40,
                    hidden_size=16,
                    intermediate_size=24,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    bos_token_id=1,
                    eos_token_id=2,
                    pad_token_id=0,
                ),
            )
        )
        whole.vision_model.load_state_dict(tower.state_dict())
        whole.save_pretrained(tmp_path / "vision")
    else:
        tower.save_pretrained(tmp_path / "vision")
    saved = json.loads((tmp_path / "vision" / "config.json").read_text())
    assert saved["model_type"] == checkpoint
    keys = load_file(str(tmp_path / "vision" / "model.safetensors"))
    assert any(key.startswith(("head.", "vision_model.head.")) for key in keys)  # skipped
    LlamaForCausalLM(tiny_hf_config().text_config).save_pretrained(tmp_path / "llama")
    config, params = load_towers(
        str(tmp_path / "vision"), str(tmp_path / "llama"), image_token_id=IMAGE_TOKEN, **ONEVISION
    )
    assert config.vision.model_type == "siglip" and not config.vision.has_class_token
    assert "cls" not in params["img"]["embedding"] and "pre_norm" not in params["img"]

    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 42, 42, 3)).astype(np.float32)
    num_layers = config.vision.num_layers
    states = tuple(range(num_layers + 1))
    ours = VisionTransformer(config.vision).apply(
        {"params": params["img"]}, jnp.asarray(images), states
    )
    with torch.no_grad():
        ref = tower(torch.tensor(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
    for state in states:
        assert ours[state].shape == (2, 9, config.vision.hidden_size)
        error = np.abs(np.asarray(ours[state]) - ref.hidden_states[state].numpy()).max()
        assert error <= TOLERANCE, (state, error)
    # the post-norm (transformers' last_hidden_state) is not what LLaVA reads
    assert np.abs(ref.last_hidden_state.numpy() - np.asarray(ours[num_layers])).max() > 0.1


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_logits_equal_transformers(siglip_dir, tmp_path, feature_layer):
    """A LLaVA with a SigLIP tower, `full` strategy: every patch an image token (9, no class
    token), logits transformers' (the last layer, and one before it: a slice of the stack)."""
    if feature_layer == -1:
        directory, model = siglip_dir
    else:
        directory = tmp_path / "hf"
        model = tiny_hf_model(siglip_llava_config(vision_feature_layer=feature_layer))
        model.save_pretrained(directory)
    assert any(".head." in key for key in load_file(str(directory / "model.safetensors")))
    config, params = load_hf(str(directory))  # its pooling head skipped
    assert config.vision.model_type == "siglip"
    assert config.num_image_tokens == (42 // 14) ** 2 == image_tokens_per_image(model.config)
    assert ImageGeometry.of(config).tokens_of_square == 9
    inputs = make_inputs(model.config, [2, 1], length=40)
    with torch.no_grad():  # transformers' own count of an image's features
        pixel_values = torch.tensor(inputs["images"][0, :1, 0].transpose(0, 3, 1, 2))
        features = model.model.get_image_features(pixel_values=pixel_values)
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    assert features[0].shape[0] == config.num_image_tokens
    ours = _ours(config, params, inputs)
    ref = reference_logits(model, inputs)
    assert _max_error(ours, ref, inputs["attention_mask"]) <= TOLERANCE


def test_greedy_generation_equals_transformers_generate(tmp_path):
    """`Engine.generate`'s greedy tokens are transformers' `generate`'s (a model sharpened so
    its image features steer the tokens: a wrong feature changes them)."""
    model = _sharpened(tiny_hf_model(siglip_llava_config()))
    model.save_pretrained(tmp_path / "hf")
    config, params = load_hf(str(tmp_path / "hf"))
    prompts, images, image_mask = make_prompts(model.config, [17, 30], [1, 2], seed=1)
    steps = 8
    result = Generator(config, params).generate(
        prompts, images, image_mask, SamplingConfig(max_new_tokens=steps)
    )
    expected = hf_greedy(model, prompts, images, image_mask, steps)
    np.testing.assert_array_equal(np.stack(result.tokens), expected)


def test_save_hf_round_trip(siglip_dir, tmp_path):
    """`save_hf` writes a SigLIP vision config without the pooling head (which LLaVA never
    reads); transformers loads it to the same logits, and we read it back bit for bit."""
    directory, model = siglip_dir
    config, params = load_hf(str(directory))
    save_hf(config, params, str(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["vision_config"]["model_type"] == "siglip_vision_model"
    assert written["vision_feature_select_strategy"] == "full"
    assert written["vision_config"]["vision_use_head"] is False  # no head: none written
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any(".head." in key for key in tensors)
    assert "vision_tower.vision_model.embeddings.patch_embedding.bias" in tensors
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    inputs = make_inputs(model.config, [2, 1], length=40)
    again = reference_logits(reloaded, inputs)
    assert np.abs(reference_logits(model, inputs) - again).max() <= 1e-5
    _assert_same_params(load_hf(str(tmp_path / "out"))[1], params)


def test_default_strategy_is_refused_for_siglip():
    """`default` drops a class token, which SigLIP has none of."""
    with pytest.raises(ValueError, match="class token"):
        ModelConfig(vision=VisionConfig(model_type="siglip", hidden_act="gelu_pytorch_tanh"))
    with pytest.raises(ValueError, match="vision.model_type='vit'"):
        VisionConfig(model_type="vit")


def test_loaded_model_preprocesses_as_siglips_image_processor(siglip_dir, tmp_path):
    """A SigLIP checkpoint loaded for inference resizes (bicubic, no crop or pad) and
    normalises with mean = std = 0.5, as transformers' SigLIP image processor does."""
    from test_inference_cli import save_word_tokenizer
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from llava_jax.inference.load import load_model

    directory, _ = siglip_dir
    save_word_tokenizer(directory)
    model = load_model(str(directory))
    data = model.data
    siglip = ("resize", (0.5,) * 3, (0.5,) * 3)
    assert (data.image_aspect, data.image_mean, data.image_std) == siglip
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (30, 70, 3), np.uint8))  # wide: no crop
    pixels = model.preprocess_image(image).pixels
    processor = SiglipImageProcessorPil(size={"height": 42, "width": 42})
    expected = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert pixels.shape == (1, 42, 42, 3)
    np.testing.assert_allclose(pixels[0], expected, atol=1e-5)


def test_siglip_parameter_tree_has_logical_axes():
    """SigLIP's tower: the conv bias sharded as CLIP's embeddings are, no class token or
    pre-norm."""
    config = VisionConfig(
        model_type="siglip",
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        patch_size=14,
        image_size=28,
    )
    variables = jax.eval_shape(
        lambda: VisionTransformer(config).init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)), (2,))
    )
    embedding = variables["params"]["embedding"]
    assert embedding["patch"]["bias"].names == ("embed",)
    assert embedding["pos"].names == (None, "embed") and embedding["pos"].value.shape == (4, 32)
    assert "cls" not in embedding and "pre_norm" not in variables["params"]
