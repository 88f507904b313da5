"""LLaVA-OneVision (0.5B or 7B): SigLIP-so400m, a two-layer GELU projector and
Qwen2-Instruct, trained in the published stages: `pretrain`, `mid`, `si`, then `ov`.

Stage 1 `pretrain` (the projector alone, on LCS-558K, one 384 px image each; SigLIP and
Qwen2 frozen), from separate towers:

    python -m llava_jax.main --config=configs/llava_onevision.py:0.5b,pretrain \
        --workdir=gs://BUCKET/llava-ov-0.5b-pretrain \
        --config.init.vision_path=/path/to/siglip-so400m-patch14-384 \
        --config.init.text_path=/path/to/Qwen2-0.5B-Instruct \
        --config.data.json_path=/path/to/blip_laion_cc_sbu_558k.json \
        --config.data.image_dir=/path/to/LLaVA-Pretrain/images \
        --config.data.tokenizer_path=/path/to/Qwen2-0.5B-Instruct

Stage 1.5 `mid` (the whole model, the vision tower at 2e-6, on the 4M high-quality
knowledge mixture: re-captioned images, OCR, ...; each image on up to 2x2 tiles beside its
overview), from stage 1's checkpoint; the model gains its `image_newline` here:

    python -m llava_jax.main --config=configs/llava_onevision.py:0.5b,mid \
        --workdir=gs://BUCKET/llava-ov-0.5b-mid \
        --config.init.checkpoint_path=gs://BUCKET/llava-ov-0.5b-pretrain \
        --config.data.json_path=/path/to/onevision_mid.json \
        --config.data.image_dir=/path/to/images \
        --config.data.tokenizer_path=/path/to/Qwen2-0.5B-Instruct

Stage 2 `si` (single-image instructions, 3.2M; each image on up to 6x6 tiles of 384 px,
`anyres_max_9`), from stage 1.5's checkpoint:

    python -m llava_jax.main --config=configs/llava_onevision.py:0.5b,si \
        --workdir=gs://BUCKET/llava-ov-0.5b-si \
        --config.init.checkpoint_path=gs://BUCKET/llava-ov-0.5b-mid \
        --config.data.json_path=/path/to/onevision_si.json \
        --config.data.image_dir=/path/to/images \
        --config.data.tokenizer_path=/path/to/Qwen2-0.5B-Instruct

Stage 2 `ov` (OneVision: 1.6M single-image, multi-image and video conversations; several
images are one tile each, a video 32 frames of 2x2-pooled features), from `si`:

    python -m llava_jax.main --config=configs/llava_onevision.py:0.5b,ov \
        --workdir=gs://BUCKET/llava-ov-0.5b-ov \
        --config.init.checkpoint_path=gs://BUCKET/llava-ov-0.5b-si \
        --config.data.json_path=/path/to/onevision_ov.json \
        --config.data.image_dir=/path/to/images \
        --config.data.tokenizer_path=/path/to/Qwen2-0.5B-Instruct

`7b,STAGE` is the same with Qwen2-7B-Instruct. Stages, data sizes, batch sizes and
learning rates are the paper's (Li et al. 2024, "LLaVA-OneVision", the training-stage
table) and LLaVA-NeXT's scripts (`scripts/train/pretrain_siglip.sh`, `finetune_si.sh`,
`finetune_ov.sh`); of the mixtures only LCS-558K is public as one file. The checkpoint
converts to transformers' `LlavaOnevisionForConditionalGeneration` with
`python -m llava_jax.convert params-to-hf`.

Before creating the pod, `python -m llava_jax.plan --config=configs/llava_onevision.py:7b,si
--topology=v5p-16` shows the memory per chip (59.6 GiB of 95 on each of its 8 chips).
"""

from llava_jax.models.presets import QWEN2_INSTRUCT, SIGLIP_SO400M_PATCH14_384
from llava_jax.train.config import base_config

SIZES = tuple(QWEN2_INSTRUCT)
STAGES = ("pretrain", "mid", "si", "ov")
# Stage 1.5's grids (height, width): 2x2, 1x2, 1x3, 2x1 and 3x1 tiles of 384 px (at most
# 729 x 5 image tokens, the paper's table).
MID_PINPOINTS = ((768, 768), (384, 768), (384, 1152), (768, 384), (1152, 384))
# Stage 2's grids: every h x w tiles of 384 px for h, w in 1..6, up to 2304 x 2304
# (`--image_grid_pinpoints "(1x1),...,(6x6)"`), in the order transformers'
# LlavaOnevisionConfig lists them.
ONEVISION_PINPOINTS = tuple((384 * h, 384 * w) for h in range(1, 7) for w in range(1, 7))
# OneVision's added tokens, right after Qwen2's own (<|endoftext|>, <|im_start|>,
# <|im_end|> end at 151645).
IMAGE_TOKEN_ID = 151646
VIDEO_TOKEN_ID = 151647


def get_config(arg: str | None = None):
    size, _, stage = (arg or "0.5b,pretrain").partition(",")
    if size not in SIZES or stage not in STAGES:
        raise ValueError(
            f"config argument {arg!r}: expected SIZE,STAGE with SIZE in {SIZES} and STAGE in "
            f"{STAGES}, e.g. configs/llava_onevision.py:0.5b,pretrain"
        )
    config = base_config()

    # The model: SigLIP-so400m (all 729 patch features of its 26th layer, "full": it has no
    # class token; loaded whole from its 27-layer checkpoint that is layer -2, and the 27th
    # never runs), a two-layer GELU projector, Qwen2-Instruct; bf16 compute, float32
    # parameters.
    model = config.model
    model.vision = SIGLIP_SO400M_PATCH14_384.to_section()
    model.text = QWEN2_INSTRUCT[size].to_section()
    model.projector = "mlp2x_gelu"
    model.vision_feature_layer = -2
    model.vision_feature_select_strategy = "full"
    model.image_token_id = IMAGE_TOKEN_ID
    model.dtype = "bfloat16"
    model.param_dtype = "float32"
    model.scan_layers = True

    # The data: LLaVA JSON in OneVision's ChatML template, images resized to 384 px squares
    # and normalised as SigLIP's processor does (mean = std = 0.5), not padded as LLaVA-1.5.
    config.data.source = "llava_json"
    config.data.template = "qwen_1_5"
    config.data.image_aspect = "resize"
    config.data.image_mean = (0.5, 0.5, 0.5)
    config.data.image_std = (0.5, 0.5, 0.5)
    config.data.num_workers = 8

    # AdamW, weight decay 0, cosine with 3% warm-up, one epoch a stage; FSDP over every device.
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
        # One 729-token image and a short caption a record: 2048 tokens hold every one
        # (the script's 8192 is a truncation limit; rows here are padded to max_len).
        config.data.max_len = 2048
        config.data.global_batch_size = 512
        config.optimizer.learning_rate = 1e-3
        config.train.train_pattern = "proj/.*"
        # 8.3 GiB per chip for the 0.5B on v5p-8 (up to 61 sequences a device fit), 30.4
        # GiB for the 7B on v5p-16.
        model.remat_policy = "minimal"
        config.train.per_device_batch_size = 4
        return config

    # Stages 1.5 and 2: everything trains, the vision tower at 2e-6 and the rest at 1e-5,
    # batch 256 (the scripts' 1 per GPU, 2 accumulated, 128 GPUs), conversations of up to
    # 32768 tokens; every layer is recomputed in the backward pass, one sequence per device
    # per pass. `python -m llava_jax.plan` (2026-12-06) puts `si` at 59.6 GiB per chip for
    # the 7B on v5p-16 and 27.6 GiB for the 0.5B on v5p-8; 16 GiB v5e chips hold neither
    # (7B on v5e-64: 18.6 GiB, 18.8 with 4-way tensor parallelism; 0.5B on v5e-8: 16.7).
    config.init.mode = "checkpoint"
    config.train.train_pattern = "img/.*|proj/.*|llm/.*"
    config.optimizer.learning_rate = 1e-5
    config.optimizer.vision_learning_rate = 2e-6
    config.data.global_batch_size = 256
    config.data.max_len = 32768
    model.remat_policy = "full"
    config.train.per_device_batch_size = 1
    model.vision_aspect_ratio = "anyres_max_9"
    if stage == "mid":
        model.image_grid_pinpoints = MID_PINPOINTS
        return config
    model.image_grid_pinpoints = ONEVISION_PINPOINTS
    config.data.group_by_modality_length = True
    if stage == "ov":  # several images, and videos of 32 frames (`--frames_upbound 32`)
        model.video_token_id = VIDEO_TOKEN_ID
        # Up to 4 images a conversation, each slot 37 tiles through the vision tower: the
        # 7B at 76.5 GiB per chip on v5p-16 (`python -m llava_jax.plan`, 2026-12-06).
        config.data.max_images_per_sample = 4
        # A video record's frames, sampled when the data is prepared: 32 fill one slot of
        # 37 tiles (LLaVA-Video's 64 would take two).
        config.data.video_frames = 32
    return config
