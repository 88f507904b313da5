"""The recipes' docstring commands run: LLaVA-NeXT's two stages (`configs/llava_v15.py`'s
stage 1, then `configs/llava_next.py`) and LLaVA-OneVision's (`configs/llava_onevision.py`),
as written, on tiny towers and a tiny LLaVA JSON, with only the sizes shrunk."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from hf_reference import TINY_TEXT, TINY_VISION
from PIL import Image
from test_inference_cli import QUESTION, save_word_tokenizer
from trainer_fixtures import REPO, checkpoint_params, subprocess_env
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaOnevisionConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

sys.path.insert(0, os.path.join(REPO, "configs"))
import llava_next  # noqa: E402
import llava_onevision  # noqa: E402
import llava_v15  # noqa: E402

from llava_jax.train.config import RunConfig  # noqa: E402

# What the test changes, and only that: the sizes (a 28 px tower's grids, short sequences,
# a small batch, two steps), no worker processes, and one device.
SHRINK = [
    "--config.data.max_len=192",
    "--config.data.global_batch_size=4",
    "--config.data.num_workers=0",
    "--config.train.num_steps=2",
    "--config.train.log_every=1",
]
# Grids of the tiny tower's 28 px tiles. The run takes its towers from stage 1's checkpoint;
# its config's tower (checked against the grids when the config is read) is shrunk alike.
NEXT_GRIDS = [
    "--config.model.image_grid_pinpoints=((28,56),(56,28),(56,56))",
    "--config.model.vision.image_size=28",
    "--config.model.vision.patch_size=14",
]
# LLaVA-NeXT's published grids for its 336 px tower, (height, width), as its checkpoints'
# config.json write `image_grid_pinpoints` (llava-v1.6-*; transformers' LlavaNextConfig
# default): written out here, not read from the recipe, so that the recipe is checked.
LLAVA_NEXT_336_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def assert_trained_and_answers(workdir, image, prompt: str) -> None:
    """The run in `workdir` logged two finite losses, and the workdir answers `prompt` about
    `image` (any size) from the command line."""
    from llava_jax import generate

    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert len(losses) == 2 and np.isfinite(losses).all()
    argv = ["--checkpoint", str(workdir), "--image", str(image), "--prompt", prompt]
    assert generate.main([*argv, "--max-new-tokens", "3"]) == 0


def docstring_command(module, config: str) -> list[str]:
    """The `python -m llava_jax.main --config=configs/CONFIG ...` command of `module`'s
    docstring, as argv."""
    for block in module.__doc__.split("\n\n"):
        text = block.replace("\\\n", " ")
        if f"--config=configs/{config} " in text and "llava_jax.main" in text:
            return shlex.split(text.strip())
    raise AssertionError(f"no command for {config} in {module.__name__}'s docstring")


def with_paths(command: list[str], paths: dict[str, str]) -> list[str]:
    """`command` with each flag of `paths` (e.g. `--workdir`) given that value instead."""
    out = []
    for arg in command:
        flag, _, _ = arg.partition("=")
        assert flag not in paths or "/path/to/" in arg or "gs://BUCKET" in arg, arg
        out.append(f"{flag}={paths[flag]}" if flag in paths else arg)
    return [sys.executable, *out[1:]]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny CLIP and LLaMA towers (the tokenizer beside LLaMA) and a LLaVA JSON of
    conversations about images of several sizes."""
    root = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(root / "clip")
    LlamaForCausalLM(LlamaConfig(**TINY_TEXT)).save_pretrained(root / "vicuna")
    save_word_tokenizer(root / "vicuna")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    records = []
    for index, (height, width) in enumerate([(30, 50), (70, 20), (40, 40), (25, 90)] * 2):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{index}.png")
        records.append(
            {
                "id": str(index),
                "image": f"{index}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{QUESTION}"},
                    {"from": "gpt", "value": "How many shapes ?"},
                ],
            }
        )
    (root / "data.json").write_text(json.dumps(records))
    return root


def test_the_next_recipe_runs_both_stages_as_its_docstring_says(inputs, tmp_path):
    paths = {
        "--config.init.vision_path": str(inputs / "clip"),
        "--config.init.text_path": str(inputs / "vicuna"),
        "--config.data.tokenizer_path": str(inputs / "vicuna"),
        "--config.data.json_path": str(inputs / "data.json"),
        "--config.data.image_dir": str(inputs / "images"),
    }
    stage_1, stage_2 = tmp_path / "stage1", tmp_path / "stage2"
    first = docstring_command(llava_v15, "llava_v15.py:7b,pretrain")
    first = with_paths(first, {**paths, "--workdir": str(stage_1)})
    second = docstring_command(llava_next, "llava_next.py:7b")
    second = with_paths(
        second,
        {**paths, "--workdir": str(stage_2), "--config.init.checkpoint_path": str(stage_1)},
    )
    env = subprocess_env(devices=1)
    for command in ([*first, *SHRINK], [*second, *SHRINK, *NEXT_GRIDS]):
        data_dir = f"--config.data.data_dir={tmp_path / 'tfds'}"
        done = subprocess.run(
            [*command, data_dir],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        # No held-out split (no test_json_path): trained, and said there is no evaluation
        # (a bug: the final evaluation used to fail looking for split 'test').
        assert "no held-out split" in done.stderr

    assert not (stage_1 / "eval.json").exists()
    before, after = checkpoint_params(str(stage_1), 2), checkpoint_params(str(stage_2), 2)
    newline = "['proj']['image_newline']"
    assert newline in after and newline not in before  # LLaVA-NeXT's, fresh in stage 2
    for tower in ("img", "proj", "llm"):  # stage 2 trains all three
        changed = [k for k in before if k.startswith(f"['{tower}']") and k in after]
        assert changed and any(not np.array_equal(before[k], after[k]) for k in changed)
    saved = json.loads((stage_2 / "config.json").read_text())
    assert saved["model"]["image_grid_pinpoints"] == [[28, 56], [56, 28], [56, 56]]
    assert saved["optimizer"]["vision_learning_rate"] == 2e-6
    assert saved["data"]["group_by_modality_length"] is True
    assert_trained_and_answers(stage_2, inputs / "images" / "3.png", QUESTION)


@pytest.mark.parametrize("name", list(llava_next.DECODERS))
def test_the_next_recipe_is_llava_next_stage_2(name):
    """LLaVA-NeXT's published stage 2: its grids, the whole model trained (the vision tower
    at 2e-6, the rest at 2e-5), batch 128 of 4096 tokens, grouped by modality, the decoder's
    own template; and a decoder the recipe does not know is refused by name."""
    run = RunConfig.from_config(llava_next.get_config(name))
    assert run.model.image_grid_pinpoints == tuple(map(tuple, LLAVA_NEXT_336_PINPOINTS))
    assert re.fullmatch(run.train.train_pattern, "img/layers/attn/query/kernel")
    assert (run.optimizer.learning_rate, run.optimizer.vision_learning_rate) == (2e-5, 2e-6)
    assert run.data.global_batch_size == 128 and run.data.max_len == 4096
    assert run.data.group_by_modality_length and run.init.mode == "checkpoint"
    mistral = name == "mistral_7b"
    assert run.model.text.model_type == ("mistral" if mistral else "llama")
    assert run.data.template == ("mistral_instruct" if mistral else "vicuna_v1")
    with pytest.raises(ValueError, match="expected one of"):
        llava_next.get_config("70b")


# --- LLaVA-OneVision ---------------------------------------------------------------------------

# The OneVision run's grids for the tiny tower's 28 px tiles (up to 2 x 2). The test also
# gives `<video>`'s id in the tiny tokenizer (the recipe's 151647 is the real Qwen2's).
ONEVISION_SHRINK = [
    "--config.model.image_grid_pinpoints=((28,28),(28,56),(56,28),(56,56))",
    "--config.model.vision.image_size=28",
    "--config.model.vision.patch_size=14",
]
# Qwen2-{0.5B,7B}-Instruct's config.json (the Hugging Face hub), the fields the recipe sets.
QWEN2_INSTRUCT_PUBLISHED = {
    "0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
}
# google/siglip-so400m-patch14-384's published depth; OneVision's checkpoints keep 26.
SIGLIP_SO400M_LAYERS = 27


def save_onevision_tokenizer(directory) -> int:
    """The Qwen2-shaped test tokenizer with OneVision's `<image>` and `<video>` added after
    its own tokens (as LLaVA-OneVision adds them after Qwen2's); returns `<video>`'s id."""
    from qwen_tokenizer import qwen_shaped_tokenizer

    tokenizer = qwen_shaped_tokenizer()
    tokenizer.add_tokens(["<image>", "<video>"], special_tokens=True)
    tokenizer.save_pretrained(directory)
    return tokenizer.convert_tokens_to_ids("<video>")


@pytest.fixture(scope="module")
def onevision_inputs(tmp_path_factory):
    """Tiny SigLIP and Qwen2 towers (the tokenizer beside Qwen2), LCS-558K-like captions for
    stage 1 and OneVision conversations for stage 2: lone images of several sizes and
    prompts of two images."""
    root = tmp_path_factory.mktemp("onevision_recipe")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).save_pretrained(root / "siglip")
    Qwen2ForCausalLM(Qwen2Config(**TINY_TEXT)).save_pretrained(root / "qwen2")
    video_id = save_onevision_tokenizer(root / "qwen2")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    sizes = [(30, 50), (70, 20), (40, 40), (25, 90)]
    for index, (height, width) in enumerate(sizes):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{index}.png")
    captions, conversations = [], []
    for index in range(8):
        image = f"{index % len(sizes)}.png"
        captions.append(
            {
                "id": f"c{index}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\n"},
                    {"from": "gpt", "value": "A red circle near the top."},
                ],
            }
        )
        several = index % 2 == 1  # every other conversation compares two images
        question = "<image>\n<image>\nCompare them." if several else "<image>\nWhat is shown?"
        conversations.append(
            {
                "id": f"o{index}",
                "image": [image, f"{(index + 1) % len(sizes)}.png"] if several else image,
                "conversations": [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": "There are 2 red circles."},
                ],
            }
        )
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "conversations.json").write_text(json.dumps(conversations))
    return root, video_id


def test_the_onevision_recipe_runs_pretrain_then_ov_as_its_docstring_says(
    onevision_inputs, tmp_path
):
    """Stage 1 from SigLIP and Qwen2 towers (the projector alone), then the OneVision stage
    from its checkpoint (everything trains; anyres_max_9 images, several to a prompt)."""
    inputs, video_id = onevision_inputs
    paths = {
        "--config.init.vision_path": str(inputs / "siglip"),
        "--config.init.text_path": str(inputs / "qwen2"),
        "--config.data.tokenizer_path": str(inputs / "qwen2"),
        "--config.data.image_dir": str(inputs / "images"),
    }
    stage_1, stage_2 = tmp_path / "pretrain", tmp_path / "ov"
    first = docstring_command(llava_onevision, "llava_onevision.py:0.5b,pretrain")
    first = with_paths(
        first,
        {
            **paths,
            "--workdir": str(stage_1),
            "--config.data.json_path": str(inputs / "captions.json"),
        },
    )
    second = docstring_command(llava_onevision, "llava_onevision.py:0.5b,ov")
    second = with_paths(
        second,
        {
            **paths,
            "--workdir": str(stage_2),
            "--config.init.checkpoint_path": str(stage_1),
            "--config.data.json_path": str(inputs / "conversations.json"),
        },
    )
    video = [f"--config.model.video_token_id={video_id}"]
    env = subprocess_env(devices=1)
    for command in ([*first, *SHRINK], [*second, *SHRINK, *ONEVISION_SHRINK, *video]):
        data_dir = f"--config.data.data_dir={tmp_path / 'tfds'}"
        done = subprocess.run(
            [*command, data_dir],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]

    before, after = checkpoint_params(str(stage_1), 2), checkpoint_params(str(stage_2), 2)
    newline = "['proj']['image_newline']"
    assert newline in after and newline not in before  # fresh in the first grid stage
    for tower in ("img", "proj", "llm"):  # stage 2 trains all three
        changed = [k for k in before if k.startswith(f"['{tower}']") and k in after]
        assert changed and any(not np.array_equal(before[k], after[k]) for k in changed)
    saved = json.loads((stage_2 / "config.json").read_text())
    model = saved["model"]
    assert model["vision"]["model_type"] == "siglip"
    assert model["text"]["model_type"] == "qwen2" and model["text"]["qkv_bias"] is True
    assert model["vision_aspect_ratio"] == "anyres_max_9"
    assert model["image_grid_pinpoints"] == [[28, 28], [28, 56], [56, 28], [56, 56]]
    assert model["video_token_id"] == video_id
    assert saved["data"]["template"] == "qwen_1_5"
    assert saved["data"]["image_mean"] == saved["data"]["image_std"] == [0.5, 0.5, 0.5]
    assert saved["optimizer"]["learning_rate"] == 1e-5
    assert saved["optimizer"]["vision_learning_rate"] == 2e-6
    assert_trained_and_answers(stage_2, inputs / "images" / "3.png", "What is shown?")


@pytest.mark.parametrize("size", llava_onevision.SIZES)
def test_the_onevision_recipe_is_the_published_one(size):
    """Each stage against what LLaVA-OneVision published: transformers' LlavaOnevisionConfig
    (the checkpoints' architecture: tower, feature layer, grids, ids, strategy), SigLIP's
    image processor (mean and std), Qwen2-Instruct's config.json, and the paper's and
    LLaVA-NeXT scripts' stages (batch, learning rates, what trains, the template)."""
    reference = LlavaOnevisionConfig()
    vision_ref = reference.vision_config
    qwen = QWEN2_INSTRUCT_PUBLISHED[size]
    siglip_processor = SiglipImageProcessor()
    runs = {
        stage: RunConfig.from_config(llava_onevision.get_config(f"{size},{stage}"))
        for stage in llava_onevision.STAGES
    }
    for run in runs.values():
        model, vision, text = run.model, run.model.vision, run.model.text
        assert vision.model_type == "siglip"
        assert (vision.hidden_size, vision.intermediate_size, vision.num_heads) == (
            vision_ref.hidden_size,
            vision_ref.intermediate_size,
            vision_ref.num_attention_heads,
        )
        assert (vision.patch_size, vision.image_size) == (
            vision_ref.patch_size,
            vision_ref.image_size,
        )
        assert vision.layer_norm_eps == vision_ref.layer_norm_eps
        assert vision.hidden_act == vision_ref.hidden_act
        # The whole published SigLIP, read at the hidden state OneVision's 26 layers end on.
        assert vision.num_layers == SIGLIP_SO400M_LAYERS
        selected = vision.num_layers + 1 + model.vision_feature_layer
        assert selected == vision_ref.num_hidden_layers + 1 + reference.vision_feature_layer
        assert model.vision_feature_select_strategy == reference.vision_feature_select_strategy
        assert model.projector == "mlp2x_gelu" and model.projector_act == "gelu"
        assert model.projector_act == reference.projector_hidden_act
        assert model.image_token_id == reference.image_token_index
        assert text.model_type == "qwen2" and text.qkv_bias and not text.attention_bias
        assert (text.vocab_size, text.hidden_size, text.intermediate_size) == (
            qwen["vocab_size"],
            qwen["hidden_size"],
            qwen["intermediate_size"],
        )
        assert (text.num_layers, text.num_heads, text.num_kv_heads) == (
            qwen["num_hidden_layers"],
            qwen["num_attention_heads"],
            qwen["num_key_value_heads"],
        )
        assert (text.rope.theta, text.rms_norm_eps) == (qwen["rope_theta"], qwen["rms_norm_eps"])
        assert text.max_position_embeddings == qwen["max_position_embeddings"]
        assert text.tie_word_embeddings == qwen["tie_word_embeddings"]
        assert (text.bos_token_id, text.eos_token_id) == (
            qwen["bos_token_id"],
            qwen["eos_token_id"],
        )
        assert run.data.image_mean == tuple(siglip_processor.image_mean)
        assert run.data.image_std == tuple(siglip_processor.image_std)
        assert run.data.image_aspect == "resize"  # SigLIP's processor resizes to the square
        assert run.optimizer.schedule == "cosine" and run.optimizer.warmup_ratio == 0.03
        assert run.optimizer.weight_decay == 0.0 and run.train.num_epochs == 1.0

    pretrain = runs["pretrain"]  # the paper: LCS-558K, the projector at 1e-3, batch 512
    assert pretrain.init.mode == "towers" and pretrain.data.template == "plain"
    assert pretrain.data.global_batch_size == 512
    assert pretrain.optimizer.learning_rate == 1e-3
    assert re.fullmatch(pretrain.train.train_pattern, "proj/linear_1/kernel")
    for tower in ("img/layers/attn/query/kernel", "llm/layers/attn/query/kernel"):
        assert not re.fullmatch(pretrain.train.train_pattern, tower)
    assert not pretrain.model.image_grid_pinpoints  # one 384 px image
    assert not pretrain.model.vision_aspect_ratio and pretrain.model.video_token_id is None

    # Stage 1.5: LLaVA-NeXT's grids of up to 2 x 2 tiles (the paper's 384 x {2x2, 1x{2,3},
    # {2,3}x1}); stage 2: transformers' 36 grids of 1..6 x 1..6 tiles, anyres_max_9.
    mid_grids = {(768, 768), (384, 768), (384, 1152), (768, 384), (1152, 384)}
    assert set(runs["mid"].model.image_grid_pinpoints) == mid_grids
    for stage in ("mid", "si", "ov"):
        run = runs[stage]
        assert run.model.vision_aspect_ratio == reference.vision_aspect_ratio
        assert run.init.mode == "checkpoint" and run.data.template == "qwen_1_5"
        assert run.data.global_batch_size == 256 and run.data.max_len == 32768
        assert (run.optimizer.learning_rate, run.optimizer.vision_learning_rate) == (1e-5, 2e-6)
        for path in ("img/layers/attn/query/kernel", "proj/linear_1/kernel", "llm/embed/embedding"):
            assert re.fullmatch(run.train.train_pattern, path), (stage, path)
    for stage in ("si", "ov"):
        grids = runs[stage].model.image_grid_pinpoints
        assert grids == tuple(map(tuple, reference.image_grid_pinpoints))
        assert runs[stage].data.group_by_modality_length
    assert runs["si"].model.video_token_id is None
    assert runs["ov"].model.video_token_id == reference.video_token_index
    assert runs["ov"].data.max_images_per_sample > 1
    assert runs["ov"].data.video_frames == 32  # finetune_ov.sh's --frames_upbound
    with pytest.raises(ValueError, match="expected SIZE,STAGE"):
        llava_onevision.get_config(f"{size},finetune")
    with pytest.raises(ValueError, match="expected SIZE,STAGE"):
        llava_onevision.get_config("72b,si")
