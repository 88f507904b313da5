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

# google/siglip-so400m-patch14-384: SigLIP's shape-optimised ViT (400M), 729 patches of 14 px,
# 27 layers as published. LLaVA-OneVision reads the output of its 26th layer: its own code
# drops the last layer, transformers' LlavaOnevisionConfig keeps 26 layers and takes the
# last (-1); loaded whole, the same features are layer -2, and the 27th layer never runs.
SIGLIP_SO400M_PATCH14_384 = VisionConfig(
    model_type="siglip",
    hidden_size=1152,
    intermediate_size=4304,
    num_layers=27,
    num_heads=16,
    patch_size=14,
    image_size=384,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)

# Qwen/Qwen2-{0.5B,7B}-Instruct (LLaVA-OneVision's decoders): grouped-query attention with
# q/k/v biases, rope theta 1e6, 32K context; the 0.5B ties its embeddings. Ids:
# <|endoftext|> 151643 (bos), <|im_end|> 151645 (the chat models' eos). The base models
# differ in max_position_embeddings (131072) and eos (151643) only. OneVision adds
# `<image>` (151646) and `<video>` (151647) inside this vocabulary (its rows are padding
# up to a multiple of 64 or 128); transformers' converted OneVision checkpoints grow it to
# the next multiple of 64 above vocab + 2 (152000 and 152128).
QWEN2_INSTRUCT = {
    "0.5b": TextConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1e6),
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        qkv_bias=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "7b": TextConfig(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1e6),
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        qkv_bias=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
}
