"""LLaVA-1.5 (7B or 13B), stage 1 `pretrain` (feature alignment) or 2 `finetune`.

Stage 1 (projector only; CLIP ViT-L/14-336 and Vicuna frozen), from separate towers:

    python -m llava_jax.main --config=configs/llava_v15.py:7b,pretrain \
        --workdir=gs://BUCKET/llava-v15-7b-pretrain \
        --config.init.vision_path=/path/to/clip-vit-large-patch14-336 \
        --config.init.text_path=/path/to/vicuna-7b-v1.5 \
        --config.data.json_path=/path/to/blip_laion_cc_sbu_558k.json \
        --config.data.image_dir=/path/to/LLaVA-Pretrain/images \
        --config.data.tokenizer_path=/path/to/vicuna-7b-v1.5

Stage 2 (projector + LLM), from stage 1's checkpoint:

    python -m llava_jax.main --config=configs/llava_v15.py:7b,finetune \
        --workdir=gs://BUCKET/llava-v15-7b-finetune \
        --config.init.checkpoint_path=gs://BUCKET/llava-v15-7b-pretrain \
        --config.data.json_path=/path/to/llava_v1_5_mix665k.json \
        --config.data.image_dir=/path/to/images \
        --config.data.tokenizer_path=/path/to/vicuna-7b-v1.5

The recipe (DESIGN.md): AdamW, weight decay 0, cosine with 3% warm-up, 1 epoch, bf16
compute, max length 2048; stage 1: batch 256, lr 1e-3, template `plain`; stage 2:
batch 128, lr 2e-5, template `vicuna_v1`.
"""

from llava_jax.config import apply_recipe, base_config, parse_recipe_arg


def get_config(arg: str | None = None):
    size, stage = parse_recipe_arg(arg)
    config = base_config()
    apply_recipe(config, size, stage, projector="mlp2x_gelu")
    return config
