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

from llava_jax.models.presets import CLIP_VIT_L_14, VICUNA
from llava_jax.train.config import base_config

SIZES = tuple(VICUNA)
STAGES = ("pretrain", "finetune")


def get_config(arg: str | None = None):
    size, _, stage = (arg or "7b,pretrain").partition(",")
    if size not in SIZES or stage not in STAGES:
        raise ValueError(
            f"config argument {arg!r}: expected SIZE,STAGE with SIZE in {SIZES} and STAGE in "
            f"{STAGES}, e.g. configs/llava_v1.py:7b,pretrain"
        )
    config = base_config()

    # The model: CLIP ViT-L/14 at 224 px (its second-to-last layer), one linear projector,
    # Vicuna; bf16 compute, float32 parameters.
    model = config.model
    model.vision = CLIP_VIT_L_14.to_section()
    model.text = VICUNA[size].to_section()
    model.projector = "linear"
    model.vision_feature_layer = -2
    model.dtype = "bfloat16"
    model.param_dtype = "float32"
    model.remat_policy = "minimal" if size == "7b" else "full"
    config.train.per_device_batch_size = 2

    # The data: LLaVA JSON, images resized (LLaVA-1 did not pad to a square), 2048 tokens.
    config.data.source = "llava_json"
    config.data.image_aspect = "resize"
    config.data.max_len = 2048
    config.data.num_workers = 8
    config.optimizer.warmup_ratio = 0.03
    config.mesh.shape = (1, -1, 1)

    if stage == "pretrain":  # CC3M-595K captions; the projector only
        config.init.mode = "towers"
        config.data.template = "plain"
        config.data.global_batch_size = 128
        config.optimizer.learning_rate = 2e-3
        config.train.train_pattern = "proj/.*"
    else:  # LLaVA-Instruct-158K; projector and language model, 3 epochs
        config.init.mode = "checkpoint"
        config.data.template = "vicuna_v1"
        config.data.global_batch_size = 32
        config.optimizer.learning_rate = 2e-5
        config.train.num_epochs = 3.0
        config.train.train_pattern = "proj/.*|llm/.*"
    return config
