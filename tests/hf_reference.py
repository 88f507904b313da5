"""Tiny random transformers models, built locally, to compare llava_jax against."""

from __future__ import annotations

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1


# A 3-layer CLIP (28px, 14px patches: 4 patches) and a 2-layer GQA LLaMA.
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
)
TINY_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def tiny_hf_config(
    *,
    vision: dict | None = None,
    text: dict | None = None,
    text_class: type = LlamaConfig,
    vision_class: type = CLIPVisionConfig,
    **llava: object,
) -> LlavaConfig:
    """A LLaVA of `TINY_VISION` and `TINY_TEXT` (updated by `vision`, `text`), its decoder
    a `text_class` (LLaMA's, or e.g. `Qwen2Config`), its vision tower a `vision_class`
    (CLIP's, or `SiglipVisionConfig`)."""
    llava_kwargs = dict(image_token_index=IMAGE_TOKEN)
    llava_kwargs.update(llava)
    return LlavaConfig(
        vision_config=vision_class(**{**TINY_VISION, **(vision or {})}),
        text_config=text_class(**{**TINY_TEXT, **(text or {})}),
        **llava_kwargs,
    )


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves norms at 1 and biases at 0; perturb them (from torch's current
    random state) so they are really tested. Returns the model in eval mode."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def tiny_hf_model(config: LlavaConfig, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return perturbed(LlavaForConditionalGeneration(config))


def image_tokens_per_image(config: LlavaConfig) -> int:
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    has_cls = config.vision_config.model_type == "clip_vision_model"  # SigLIP has none
    return patches + (config.vision_feature_select_strategy == "full" and has_cls)


def make_inputs(
    config: LlavaConfig,
    images_per_sample: list[int],
    length: int,
    seed: int = 0,
    real_lengths: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """A batch with `images_per_sample[b]` images in sample b (image tokens in two places
    when there are two), right-padded to `length` after `real_lengths[b]` tokens."""
    rng = np.random.default_rng(seed)
    batch = len(images_per_sample)
    max_images = max(max(images_per_sample), 1)
    per_image = image_tokens_per_image(config)
    vision = config.vision_config
    input_ids = rng.integers(0, IMAGE_TOKEN, (batch, length)).astype(np.int32)
    attention_mask = np.ones((batch, length), np.int32)
    for b, count in enumerate(images_per_sample):
        for k in range(count):
            start = 1 + k * (per_image + 3)
            input_ids[b, start : start + per_image] = config.image_token_id
        if real_lengths is not None:
            attention_mask[b, real_lengths[b] :] = 0
            input_ids[b, real_lengths[b] :] = 0
    images = rng.standard_normal(  # one tile an image (models/inputs.py)
        (batch, max_images, 1, vision.image_size, vision.image_size, vision.num_channels)
    ).astype(np.float32)
    image_mask = np.arange(max_images)[None, :] < np.asarray(images_per_sample)[:, None]
    return {
        "input_ids": input_ids,
        "images": images,
        "image_mask": image_mask,
        "attention_mask": attention_mask,
    }


def reference_logits(model: LlavaForConditionalGeneration, inputs: dict) -> np.ndarray:
    """transformers' logits for our batch: valid images flattened in batch order, NCHW."""
    valid = inputs["images"][inputs["image_mask"]][:, 0]  # each image's one tile
    pixel_values = torch.tensor(valid.transpose(0, 3, 1, 2)) if len(valid) else None
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(inputs["input_ids"], dtype=torch.long),
            pixel_values=pixel_values,
            attention_mask=torch.tensor(inputs["attention_mask"], dtype=torch.long),
        )
    return out.logits.float().numpy()
