"""The embedded default: a tiny LLaVA trained on the synthetic shapes dataset, on a laptop.

    python -m llava_jax.main --config=configs/tiny.py --workdir=workdir/tiny
    python -m llava_jax.main --config=configs/tiny.py:next --workdir=workdir/tiny-next
    python -m llava_jax.main --config=configs/tiny.py:onevision --workdir=workdir/tiny-ov

`:next` is the same with LLaVA-NeXT's any-resolution images (small pinpoints).
`:onevision` is LLaVA-OneVision's layout (a SigLIP-style tower without a class token, a
Qwen2 decoder with q/k/v biases, `anyres_max` grids, the `qwen_1_5` template) on the
`several` synthetic data: two images a conversation, each behind its name with a question
about it ("Second image: <image>"), so each image is one padded tile and a newline.

Everything trains from scratch (there is no pretrained tower to keep frozen), with the
LLaVA-1.5 model layout (CLIP-style ViT, mlp2x_gelu projector, LLaMA decoder) and the
`vicuna_v1` template. Prepares the synthetic data on first use.
"""

from llava_jax.train.config import base_config


def get_config(arg: str | None = None):
    config = base_config()

    model = config.model
    model.vision.hidden_size = 64
    model.vision.intermediate_size = 128
    model.vision.num_layers = 2
    model.vision.num_heads = 4
    model.vision.image_size = 48
    model.vision.patch_size = 8  # 36 patches: 36 image tokens (shapes need the detail)
    model.text.vocab_size = 128  # grows to the tokenizer's vocabulary
    model.text.hidden_size = 128
    model.text.intermediate_size = 256
    model.text.num_layers = 2
    model.text.num_heads = 4
    model.text.num_kv_heads = 2
    model.text.max_position_embeddings = 256
    model.vision_feature_layer = -1  # a ViT trained from scratch: use its last layer
    model.projector = "mlp2x_gelu"

    config.data.source = "synthetic"
    config.data.data_dir = "~/tensorflow_datasets"
    config.data.template = "vicuna_v1"
    config.data.synthetic_image_size = 48
    config.data.max_len = 112  # the longest synthetic conversation is ~105 tokens
    config.data.global_batch_size = 32

    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_ratio = 0.03

    config.train.num_steps = 1000
    config.train.train_pattern = ".*"
    config.train.log_every = 20
    config.train.checkpoint_every = 200
    config.train.eval_every = 0

    config.eval.num_records = 200
    config.eval.batch_size = 64

    if arg == "next":  # LLaVA-NeXT style: each image as a grid of 48 px tiles + an overview
        model.image_grid_pinpoints = ((48, 96), (96, 48), (96, 96))
        config.data.max_len = 160  # a square image: 36 overview + 6 x (6 + 1) grid tokens
    elif arg == "onevision":
        model.vision.model_type = "siglip"  # patches only: every feature is kept ("full")
        model.vision_feature_select_strategy = "full"
        model.text.model_type = "qwen2"
        model.text.qkv_bias = True
        model.image_grid_pinpoints = ((48, 48), (48, 96), (96, 48))
        model.vision_aspect_ratio = "anyres_max_2"
        config.data.template = "qwen_1_5"
        config.data.synthetic_style = "several"
        config.data.max_images_per_sample = 2
        config.data.max_len = 192  # two images of 36 + 1 tokens and their questions
        # Two images a question and qwen_1_5's targets (every control token: an answer is
        # about 1 target in 10) learn slower than the main job: twice the steps (at 1000,
        # held-out accuracy 0.935 on 2026-12-06).
        config.train.num_steps = 2000
    elif arg:
        raise ValueError(f"configs/tiny.py takes no argument, 'next' or 'onevision', got {arg!r}")
    return config
