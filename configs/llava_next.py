"""LLaVA-NeXT (1.6) with Vicuna-7B/13B or Mistral-7B: stage 2 at any resolution, from
LLaVA-1.5's stage 1.

LLaVA-NeXT's stage 1 is LLaVA-1.5's (the projector alone, on 558K captions, one 336 px image
each), so it is `configs/llava_v15.py:7b,pretrain` (see that file). Stage 2 trains the whole
model, the vision tower included at a tenth of the learning rate, on conversations whose
images are seen as up to four 336 px tiles beside a 336 px overview (the grid that keeps
the most of each image, `model.image_grid_pinpoints`), from stage 1's checkpoint. The
model gains LLaVA-NeXT's `image_newline` there, freshly initialised:

    python -m llava_jax.main --config=configs/llava_next.py:7b \
        --workdir=gs://BUCKET/llava-next-7b \
        --config.init.checkpoint_path=gs://BUCKET/llava-v15-7b-pretrain \
        --config.data.json_path=/path/to/llava_next_data.json \
        --config.data.image_dir=/path/to/images \
        --config.data.tokenizer_path=/path/to/vicuna-7b-v1.5

`configs/llava_next.py:mistral_7b` is llava-v1.6-mistral-7b: Mistral-7B-Instruct-v0.2 and
its `[INST] … [/INST]` template (`mistral_instruct`); its stage 1 is the same LLaVA-1.5
command with `--config.init.text_path` and `--config.data.tokenizer_path` naming Mistral.

LLaVA-NeXT's 760K stage-2 mixture is not public as one file: `llava_v1_5_mix665k.json`
with its images is the nearest published one. The checkpoint converts to transformers'
`LlavaNextForConditionalGeneration` with `python -m llava_jax.convert params-to-hf`, and
`generate`, `chat`, `evaluate` and `serve` take the workdir directly.

Before creating the pod, `python -m llava_jax.plan --config=configs/llava_next.py:7b
--topology=v5p-32` shows the memory per chip.
"""

from llava_jax.models.presets import CLIP_VIT_L_14_336, MISTRAL_7B_INSTRUCT, VICUNA
from llava_jax.train.config import base_config

# The decoders (and their templates) LLaVA-NeXT was published with, by config argument.
DECODERS = {
    **{size: (text, "vicuna_v1") for size, text in VICUNA.items()},
    "mistral_7b": (MISTRAL_7B_INSTRUCT, "mistral_instruct"),
}
# LLaVA-NeXT's grids (height, width): 2x1, 1x2, 2x2, 3x1 and 1x3 tiles of 336 px.
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def get_config(arg: str | None = None):
    name = arg or "7b"
    if name not in DECODERS:
        raise ValueError(
            f"config argument {arg!r}: expected one of {tuple(DECODERS)}, e.g. "
            "configs/llava_next.py:7b"
        )
    text, template = DECODERS[name]
    config = base_config()

    # LLaVA-1.5's towers and projector (stage 1's checkpoint holds them) with the grids;
    # bf16 compute, float32 parameters.
    model = config.model
    model.vision = CLIP_VIT_L_14_336.to_section()
    model.text = text.to_section()
    model.projector = "mlp2x_gelu"
    model.vision_feature_layer = -2
    model.vision_feature_select_strategy = "default"
    model.image_grid_pinpoints = PINPOINTS
    model.dtype = "bfloat16"
    model.param_dtype = "float32"
    model.scan_layers = True
    # An image is 5 tiles through the vision tower and up to 2928 tokens of a 4096-token
    # sequence: every layer is recomputed in the backward pass, one sequence per device per
    # pass. `python -m llava_jax.plan` puts the 7B at 16.0 GiB per chip on v4-32 and
    # v5p-32, 6.8 GiB on v5e-64.
    model.remat_policy = "full"
    config.train.per_device_batch_size = 1

    # LLaVA JSON, conversations of up to 4096 tokens (Vicuna's context; LLaVA-NeXT's for
    # Mistral too), the decoder's template, LLaVA's modality-length grouping.
    config.data.source = "llava_json"
    config.data.template = template
    config.data.max_len = 4096
    config.data.num_workers = 8
    config.data.group_by_modality_length = True
    config.data.global_batch_size = 128

    # From stage 1's checkpoint; everything trains, the vision tower at 2e-6.
    config.init.mode = "checkpoint"
    config.train.train_pattern = "img/.*|proj/.*|llm/.*"
    config.optimizer.learning_rate = 2e-5
    config.optimizer.vision_learning_rate = 2e-6
    config.optimizer.warmup_ratio = 0.03
    config.optimizer.schedule = "cosine"
    config.optimizer.weight_decay = 0.0
    config.train.num_epochs = 1.0
    config.train.log_every = 10
    config.train.checkpoint_every = 500
    config.mesh.shape = (1, -1, 1)
    return config
