"""LLaVA-1: the `linear` projector on CLIP ViT-L/14 (224 px, 256 image tokens).

    python -m llava_jax.main --config=configs/llava_v1.py:7b,pretrain \
        --workdir=gs://BUCKET/llava-v1-7b-pretrain \
        --config.init.vision_path=/path/to/clip-vit-large-patch14 \
        --config.init.text_path=/path/to/vicuna-7b \
        --config.data.json_path=/path/to/chat.json \
        --config.data.image_dir=/path/to/images \
        --config.data.tokenizer_path=/path/to/vicuna-7b

Stage 1 trains the linear projector (lr 2e-3, batch 128); stage 2 (`:7b,finetune`) the
projector and LLM (lr 2e-5, batch 32, 3 epochs), as in the LLaVA paper.
"""

from llava_jax.config import apply_recipe, base_config, parse_recipe_arg


def get_config(arg: str | None = None):
    size, stage = parse_recipe_arg(arg)
    config = base_config()
    apply_recipe(config, size, stage, projector="linear")
    config.model.vision.image_size = 224  # ViT-L/14 at 224 px
    config.data.image_aspect = "resize"  # LLaVA-1 did not pad to a square
    if stage == "pretrain":
        config.optimizer.learning_rate = 2e-3
        config.data.global_batch_size = 128
    else:
        config.data.global_batch_size = 32
        config.train.num_epochs = 3.0
    return config
