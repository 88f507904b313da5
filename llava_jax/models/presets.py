"""Published architectures the LLaVA recipes are built from (sizes as in their configs)."""

from __future__ import annotations

from llava_jax.models.config import RopeConfig, TextConfig, VisionConfig

# openai/clip-vit-large-patch14-336: 576 patches of 14 px (LLaVA-1.5's vision tower).
CLIP_VIT_L_14_336 = VisionConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_layers=24,
    num_heads=16,
    patch_size=14,
    image_size=336,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
)
# openai/clip-vit-large-patch14: the same tower at 224 px, 256 patches (LLaVA-1).
CLIP_VIT_L_14 = CLIP_VIT_L_14_336.replace(image_size=224)

# lmsys/vicuna-{7b,13b}-v1.5: LLaMA-2 shapes, 4096-token context.
VICUNA = {
    "7b": TextConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    "13b": TextConfig(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
}

# mistralai/Mistral-7B-Instruct-v0.2 (llava-v1.6-mistral-7b's decoder): grouped-query
# attention, no sliding window, rope theta 1e6, 32K context.
MISTRAL_7B_INSTRUCT = TextConfig(
    model_type="mistral",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    rms_norm_eps=1e-5,
    rope=RopeConfig(theta=1e6),
    max_position_embeddings=32768,
)
