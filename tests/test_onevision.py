"""LLaVA-OneVision against transformers' `LlavaOnevisionForConditionalGeneration` and its
processor, on a tiny random model: lone images of several sizes (one large enough for
`anyres_max` to downsample it), a prompt of several images, and a video."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import IMAGE_TOKEN, TINY_TEXT, TINY_VISION, perturbed
from PIL import Image
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from llava_jax.convert import load_hf, save_hf
from llava_jax.data.image import CLIP_MEAN, CLIP_STD
from llava_jax.data.image_tiles import ImageTiler
from llava_jax.models.inputs import ImageGeometry
from llava_jax.models.llava import Llava

VIDEO_TOKEN = IMAGE_TOKEN - 1
# A 35 px SigLIP of 7 px patches: 5 x 5 features a tile, pooled to 3 x 3 in a video (a
# bilinear resize with weights other than halves). Grids of up to 3 x 3 tiles (10 tiles a
# slot), and anyres_max_2: a lone image's map beyond 2 tiles' features (x 1.1) is resized.
TILE, PATCH, MAX_TILES_FEATURES = 35, 7, 2
PINPOINTS = ((35, 35), (35, 70), (70, 35), (70, 70), (35, 105), (105, 35), (105, 105))
# Lone images (height, width): small (kept whole), wide, and large (downsampled).
LONE_SIZES = [(30, 33), (40, 100), (100, 95)]
SEVERAL_SIZES = [(20, 50), (60, 30), (35, 35)]
FRAMES = 12  # two slots of frames (10 + 2)


def onevision_config() -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            **{**TINY_VISION, "image_size": TILE, "patch_size": PATCH}, vision_use_head=False
        ),
        text_config=Qwen2Config(**{**TINY_TEXT, "max_position_embeddings": 1024}),
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=[list(p) for p in PINPOINTS],
        vision_aspect_ratio=f"anyres_max_{MAX_TILES_FEATURES}",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    """(transformers model, our config, our params, tiler), the checkpoint as saved."""
    torch.manual_seed(0)
    hf_model = perturbed(LlavaOnevisionForConditionalGeneration(onevision_config()))
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them count
        for name, param in hf_model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                param.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("onevision") / "hf"
    hf_model.save_pretrained(path)
    config, params = load_hf(str(path))
    tiler = ImageTiler.of_geometry(ImageGeometry.of(config))
    return hf_model, config, params, tiler


def random_images(sizes, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def channels_first(tiles: np.ndarray) -> torch.Tensor:
    """float32[..., H, W, 3] -> torch [..., 3, H, W]."""
    return torch.tensor(np.moveaxis(tiles, -1, -3).copy())


def prompt(rng, media: int, count: int, before: int = 3, after: int = 5) -> np.ndarray:
    text = rng.integers(3, VIDEO_TOKEN - 1, before + after)
    return np.concatenate([text[:before], np.full(count, media), text[before:]]).astype(np.int32)


def media_cases(tiler: ImageTiler, seed: int = 0):
    """Each case: (prompt, our slots [(tiles, layout)], transformers' inputs)."""
    rng = np.random.default_rng(seed)
    cases = []
    for image in random_images(LONE_SIZES, seed):
        tiles, layout, count = tiler.encode(image, CLIP_MEAN, CLIP_STD)
        height, width = image.size[::-1]
        used = 1 + int(np.prod(tiler.grid(height, width)))
        hf = dict(
            pixel_values=channels_first(tiles[None, :used]),
            image_sizes=torch.tensor([[height, width]]),
        )
        cases.append((prompt(rng, IMAGE_TOKEN, count), [(tiles, layout)], hf))
    several = [
        tiler.encode_several(image, CLIP_MEAN, CLIP_STD)
        for image in random_images(SEVERAL_SIZES, seed + 1)
    ]
    ids = np.concatenate([prompt(rng, IMAGE_TOKEN, count, 2, 1) for _, _, count in several])
    hf = dict(
        pixel_values=channels_first(np.stack([tiles[:1] for tiles, _, _ in several])),
        image_sizes=torch.tensor(SEVERAL_SIZES),
        batch_num_images=torch.tensor([len(several)]),
    )
    cases.append((ids, [(tiles, layout) for tiles, layout, _ in several], hf))
    frames = np.random.default_rng(seed + 2).integers(0, 256, (FRAMES, 50, 60, 3), np.uint8)
    frames = [Image.fromarray(frame) for frame in frames]
    slots, count = tiler.encode_video(frames, CLIP_MEAN, CLIP_STD)
    pixels = np.concatenate([tiles for tiles, _ in slots])[:FRAMES]
    hf = dict(pixel_values_videos=channels_first(pixels[None]))
    cases.append((prompt(rng, VIDEO_TOKEN, count), slots, hf))
    return cases


def test_image_and_video_token_counts_equal_the_processor(tmp_path):
    """OneVision's published geometry (SigLIP 384/14, 36 grids, anyres_max_9): our counts
    for lone images of many sizes, images of a several-image prompt and videos equal
    transformers' processor's, tokenizing real prompts."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.processing_llava_onevision import (
        LlavaOnevisionProcessor,
    )

    from llava_jax.data.datasets.synthetic import build_tokenizer
    from llava_jax.data.tokenizer import load_tokenizer

    class WithoutVideoProcessor(LlavaOnevisionProcessor):
        """transformers' video processor needs torchvision, which the tests go without;
        the processor's own `replace_video_token` counts a video's tokens."""

        def check_argument_for_proper_class(self, name, argument):
            if not (name == "video_processor" and argument is None):
                return super().check_argument_for_proper_class(name, argument)

    tokenizer = load_tokenizer(build_tokenizer(str(tmp_path))).tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    processor = WithoutVideoProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(),
        tokenizer=tokenizer,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
    )
    grids = [(384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7)]
    ours = ImageGeometry(tile=384, patch=14, pinpoints=grids, max_grid_features=9)
    image_id = tokenizer.convert_tokens_to_ids("<image>")

    def counted(**inputs) -> int:
        ids = processor(**inputs, return_tensors="np")["input_ids"][0]
        return int((ids == image_id).sum())

    sizes = [(384, 384), (480, 640), (1000, 200), (200, 1000), (1500, 1500), (333, 999)]
    sizes += [(2000, 3000), (24, 1920), (5000, 700), (768, 1024), (100, 2500)]
    for height, width in sizes:
        image = Image.new("RGB", (width, height))
        expected = counted(text="<image> hi", images=[image])
        assert ours.num_tokens(height, width) == expected, (height, width)
        assert ours.layout_tokens(ours.feature_layout(height, width)) == expected
        assert ours.num_tokens(height, width) <= ours.max_tokens
    images = [Image.new("RGB", (w, h)) for h, w in [(300, 500), (900, 200), (384, 384)]]
    expected = counted(text="<image> <image> <image> hi", images=[images])
    assert 3 * ours.several_tokens == expected
    assert ours.layout_tokens(ours.several_layout()) == ours.several_tokens
    for frames in (1, 8, 32, 40):
        video = {"pixel_values_videos": [np.zeros((frames, 3, 384, 384), np.float32)]}
        expected = processor.replace_video_token(video, 0).count("<video>")
        assert ours.video_tokens(frames) == expected
        layouts = ours.video_layouts(frames)
        assert len(layouts) == -(-frames // ours.max_tiles)
        assert sum(ours.layout_tokens(layout) for layout in layouts) == expected


def test_logits_equal_transformers_for_images_several_images_and_video(onevision):
    """One batch: three lone images (one downsampled), a prompt of three images, a video of
    12 frames over two slots. Each row's logits equal transformers' for its prompt alone."""
    hf_model, config, params, tiler = onevision
    assert config.vision_aspect_ratio == f"anyres_max_{MAX_TILES_FEATURES}"
    assert config.video_token_id == VIDEO_TOKEN and config.text.model_type == "qwen2"
    cases = media_cases(tiler)
    large = tiler.unpadded(*LONE_SIZES[2])[2:]
    assert tiler.kept_size(*LONE_SIZES[2]) != large, "no case is downsampled"

    length = max(len(ids) for ids, _, _ in cases)
    slots = max(len(media) for _, media, _ in cases)
    input_ids = np.zeros((len(cases), length), np.int32)
    attention_mask = np.zeros_like(input_ids)
    images, layouts = tiler.empty(len(cases) * slots)
    images = images.reshape(len(cases), slots, *images.shape[1:])
    layouts = layouts.reshape(len(cases), slots, *layouts.shape[1:])
    image_mask = np.zeros((len(cases), slots), bool)
    for row, (ids, media, _) in enumerate(cases):
        input_ids[row, : len(ids)], attention_mask[row, : len(ids)] = ids, 1
        for slot, (tiles, layout) in enumerate(media):
            images[row, slot], layouts[row, slot], image_mask[row, slot] = tiles, layout, True
    logits = np.asarray(
        jax.jit(Llava(config).apply)(
            {"params": params},
            jnp.asarray(input_ids),
            jnp.asarray(images),
            jnp.asarray(image_mask),
            jnp.asarray(attention_mask),
            image_layout=jnp.asarray(layouts),
        )
    )
    for row, (ids, _, hf_inputs) in enumerate(cases):
        with torch.no_grad():
            expected = hf_model(input_ids=torch.tensor(ids[None]).long(), **hf_inputs).logits
        np.testing.assert_allclose(logits[row, : len(ids)], expected[0].numpy(), atol=1e-4)


def test_greedy_generation_equals_transformers_generate(onevision):
    """`Engine.generate` on a downsampled image, three images and a video (one batch, left
    padded) gives transformers' greedy tokens for each prompt."""
    from llava_jax.inference import Engine, SamplingConfig

    hf_model, config, params, tiler = onevision
    cases = [case for index, case in enumerate(media_cases(tiler, seed=3)) if index >= 2]
    steps = 6
    slots = max(len(media) for _, media, _ in cases)
    images, layouts = tiler.empty(len(cases) * slots)
    images = images.reshape(len(cases), slots, *images.shape[1:])
    layouts = layouts.reshape(len(cases), slots, *layouts.shape[1:])
    image_mask = np.zeros((len(cases), slots), bool)
    for row, (_, media, _) in enumerate(cases):
        for slot, (tiles, layout) in enumerate(media):
            images[row, slot], layouts[row, slot], image_mask[row, slot] = tiles, layout, True
    engine = Engine(config)
    result = engine.generate(
        engine.place(params),
        [ids for ids, _, _ in cases],
        images,
        image_mask,
        SamplingConfig(max_new_tokens=steps),
        image_layout=layouts,
    )
    hf_model.generation_config.eos_token_id = None
    for row, (ids, _, hf_inputs) in enumerate(cases):
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=torch.tensor(ids[None]).long(),
                **hf_inputs,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                suppress_tokens=[IMAGE_TOKEN],
            )
        np.testing.assert_array_equal(result.tokens[row], out[0, len(ids) :].numpy())


def test_save_hf_round_trip(onevision, tmp_path):
    """`save_hf` writes a LlavaOnevision checkpoint that transformers loads to the same
    logits (within 1e-5) and `load_hf` reads back to the same config and parameters."""
    hf_model, config, params, tiler = onevision
    save_hf(config, params, str(tmp_path / "out"))
    reloaded = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.vision_aspect_ratio == f"anyres_max_{MAX_TILES_FEATURES}"
    assert reloaded.config.video_token_index == VIDEO_TOKEN
    for ids, _, hf_inputs in media_cases(tiler, seed=5)[2:]:
        with torch.no_grad():
            before = hf_model(input_ids=torch.tensor(ids[None]).long(), **hf_inputs).logits
            after = reloaded(input_ids=torch.tensor(ids[None]).long(), **hf_inputs).logits
        np.testing.assert_allclose(after.numpy(), before.numpy(), atol=1e-5)
    config_again, params_again = load_hf(str(tmp_path / "out"))
    # transformers' Qwen2Config writes the head size it resolves from the others.
    text = dataclasses.replace(config.text, head_dim=config.text.resolved_head_dim)
    assert config_again == dataclasses.replace(config, text=text)
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_the_tiny_onevision_job_trains_and_evaluates(tmp_path):
    """configs/tiny.py:onevision, a few steps: two images a conversation, each one tile and
    a newline in the prompt; the loss is finite and falls, the held-out loss and answers
    are computed."""
    import json

    from trainer_fixtures import tiny_config, train_a_few_steps

    from llava_jax.data.datasets.synthetic import make_record

    config = tiny_config(
        str(tmp_path / "tfds"),
        "onevision",
        train__num_steps=4,
        eval__num_records=2,
        eval__loss_batches=1,
        eval__max_new_tokens=3,
    )
    record = make_record(0, "train", 0, 48, config.data.synthetic_style)
    assert len(record.image_bytes) == 2  # one image a question, both in the last prompt
    assert [turn["value"].count("<image>") for turn in record.conversations[::2]] == [1, 1]
    train_a_few_steps(config, str(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["vision_aspect_ratio"] == "anyres_max_2"
    assert saved["data"]["template"] == "qwen_1_5"


def test_the_data_pipeline_encodes_lone_and_several_images_the_onevision_way(tmp_path):
    """A record with two images: each is its square tile (padded in the mean colour) and
    `several_tokens` tokens; a record with one large image: anyres_max tiles and its
    downsampled count. The length table measures each as encoding gives."""
    import dataclasses
    import io

    from llava_jax.data.config import DataConfig
    from llava_jax.data.datasets.synthetic import make_record
    from llava_jax.data.encode import ExampleEncoder
    from llava_jax.data.eval_questions import make_eval_questions
    from llava_jax.data.image import preprocess_image
    from llava_jax.data.pipeline import tokenizer_for

    config = DataConfig(
        data_dir=str(tmp_path), template="qwen_1_5", max_images_per_sample=2, max_len=1024
    )
    geometry = ImageGeometry(
        tile=48, patch=8, pinpoints=((48, 96), (96, 48), (96, 96)), max_grid_features=1
    )
    tokenizer = tokenizer_for(config)
    encoder = ExampleEncoder(config, geometry, tokenizer)
    several = make_record(3, "train", 0, 48, "several")
    large = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 80, 3), np.uint8))
    png = io.BytesIO()
    large.save(png, format="PNG")
    turns = ({"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"})
    lone = dataclasses.replace(
        several, id="lone", image_bytes=(png.getvalue(),), image_paths=("lone.png",),
        conversations=turns,
    )  # fmt: skip
    for record, counts in [
        (several, [geometry.several_tokens] * 2),
        (lone, [geometry.num_tokens(90, 80)]),
    ]:
        example = encoder.encode(record)
        found = int((example["input_ids"] == tokenizer.image_token_id).sum())
        assert found == sum(counts)
        assert encoder.measure(record.to_example())[0] == int(example["attention_mask"].sum())
        for slot, data in enumerate(record.image_bytes):
            image = Image.open(io.BytesIO(data))
            if len(counts) > 1:
                expected = preprocess_image(image, 48, "pad", config.image_mean, config.image_std)
                np.testing.assert_array_equal(example["images"][slot, 0], expected)
                assert not example["images"][slot, 1:].any()
                np.testing.assert_array_equal(
                    example["image_layout"][slot], geometry.several_layout()
                )
            else:
                tiler = ImageTiler.of_geometry(geometry)
                np.testing.assert_array_equal(
                    example["images"][slot], tiler.tiles(image, config.image_mean, config.image_std)
                )
                assert geometry.kept_size(90, 80) != geometry.unpadded(90, 80)[2:]

    # Held-out questions show only the images their prompt has shown so far.
    questions = make_eval_questions(config, geometry, tokenizer, source=[several.to_example()])
    assert [q.image_mask.tolist() for q in questions] == [[True, False], [True, True]]
    assert [int((q.prompt_ids == tokenizer.image_token_id).sum()) for q in questions] == [
        geometry.several_tokens,
        2 * geometry.several_tokens,
    ]
