"""LLaVA-1.5 (7B or 13B): stage 1 `pretrain` (feature alignment) or 2 `finetune`.

Stage 1 (the projector only; CLIP ViT-L/14-336 and Vicuna frozen), from separate towers:

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

Stage 2 with LoRA (LLaVA's `finetune_lora.sh`: rank 128, alpha 256, dropout 0.05 on every
dense layer of the decoder's blocks, learning rate 2e-4, projector 2e-5; the base frozen),
from stage 1's checkpoint (`lora_int8` also stores the frozen base in int8, QLoRA's idea):

    python -m llava_jax.main --config=configs/llava_v15.py:7b,lora \
        --workdir=gs://BUCKET/llava-v15-7b-lora \
        --config.init.checkpoint_path=gs://BUCKET/llava-v15-7b-pretrain \
        --config.data.json_path=/path/to/llava_v1_5_mix665k.json \
        --config.data.image_dir=/path/to/images \
        --config.data.tokenizer_path=/path/to/vicuna-7b-v1.5

Then `python -m llava_jax.convert params-to-hf --merge-lora` writes the merged model, and
`python -m llava_jax.convert lora-to-peft` the adapter alone, for transformers and PEFT.

Before creating the pod, `python -m llava_jax.plan --config=configs/llava_v15.py:7b,finetune
--topology=v4-32` shows the memory per chip.
"""

from llava_jax.models.presets import CLIP_VIT_L_14_336, VICUNA
from llava_jax.train.config import base_config

SIZES = tuple(VICUNA)
STAGES = ("pretrain", "finetune", "lora", "lora_int8")


def get_config(arg: str | None = None):
    size, _, stage = (arg or "7b,pretrain").partition(",")
    if size not in SIZES or stage not in STAGES:
        raise ValueError(
            f"config argument {arg!r}: expected SIZE,STAGE with SIZE in {SIZES} and STAGE in "
            f"{STAGES}, e.g. configs/llava_v15.py:7b,pretrain"
        )
    config = base_config()

    # The model: CLIP ViT-L/14-336 (576 image tokens from its second-to-last layer, CLS
    # dropped), a two-layer GELU MLP projector, Vicuna; bf16 compute, float32 parameters.
    model = config.model
    model.vision = CLIP_VIT_L_14_336.to_section()
    model.text = VICUNA[size].to_section()
    model.projector = "mlp2x_gelu"
    model.vision_feature_layer = -2
    model.vision_feature_select_strategy = "default"
    model.dtype = "bfloat16"
    model.param_dtype = "float32"
    model.scan_layers = True
    # Fits a 16 GiB v5e chip and a 32 GiB v4 chip at LLaVA's global batch, as
    # `python -m llava_jax.plan` shows, with 2 sequences per device per pass: 7B keeps
    # every projection for the backward pass, 13B recomputes each layer.
    model.remat_policy = "minimal" if size == "7b" else "full"
    config.train.per_device_batch_size = 2

    # The data: LLaVA JSON, images padded to a square with the CLIP mean, 2048 tokens.
    config.data.source = "llava_json"
    config.data.image_aspect = "pad"
    config.data.max_len = 2048
    config.data.num_workers = 8

    # AdamW, weight decay 0, cosine with 3% warm-up, one epoch; FSDP over every device.
    config.optimizer.warmup_ratio = 0.03
    config.optimizer.schedule = "cosine"
    config.optimizer.weight_decay = 0.0
    config.train.num_epochs = 1.0
    config.train.log_every = 10
    config.train.checkpoint_every = 500
    config.mesh.shape = (1, -1, 1)

    if stage == "pretrain":  # 558K image-caption pairs; trains the projector only
        config.init.mode = "towers"
        config.data.template = "plain"
        config.data.global_batch_size = 256
        config.optimizer.learning_rate = 1e-3
        config.train.train_pattern = "proj/.*"
    elif stage == "finetune":  # 665K conversations; trains the projector and the LLM
        config.init.mode = "checkpoint"
        config.data.template = "vicuna_v1"
        config.data.global_batch_size = 128
        config.optimizer.learning_rate = 2e-5
        config.train.train_pattern = "proj/.*|llm/.*"
    else:  # the same data; adapters on the frozen LLM, and the projector
        config.init.mode = "checkpoint"
        config.data.template = "vicuna_v1"
        config.data.global_batch_size = 128
        lora = model.lora
        lora.rank = 128
        lora.alpha = 256.0
        lora.dropout = 0.05
        lora.base_dtype = "int8" if stage == "lora_int8" else "param"
        config.optimizer.learning_rate = 2e-4
        config.optimizer.projector_learning_rate = 2e-5
        config.train.train_pattern = "proj/.*"
    return config
