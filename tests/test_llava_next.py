"""LLaVA-NeXT (anyres): image tokens, tiles, logits and weights against transformers'
`LlavaNextForConditionalGeneration` and its processor, on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import IMAGE_TOKEN, TINY_TEXT, TINY_VISION, VOCAB, perturbed
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from llava_jax.convert import load_hf, save_hf
from llava_jax.data.anyres import Anyres
from llava_jax.data.datasets.record import from_stored
from llava_jax.data.image import CLIP_MEAN, CLIP_STD
from llava_jax.models.llava import Llava, init_params

TILE, PATCH = 28, 14  # 2 x 2 features a tile
# Three tiny configurations: pinpoints, feature layer, an image-size batch each (H, W).
CONFIGS = {
    "wide-and-tall": (((28, 56), (56, 28), (56, 56)), -2, [(30, 50), (70, 20), (40, 40)]),
    "long-grids": (((28, 84), (84, 28), (56, 56)), -1, [(20, 90), (100, 30), (33, 47)]),
    "square-only": (((56, 56), (84, 84)), (-3, -1), [(60, 61), (45, 90), (90, 45)]),
}


def next_config(pinpoints, feature_layer) -> LlavaNextConfig:
    assert TINY_VISION["image_size"] == TILE and TINY_VISION["patch_size"] == PATCH
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION),
        text_config=LlamaConfig(**{**TINY_TEXT, "max_position_embeddings": 512}),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[list(p) for p in pinpoints],
        vision_feature_layer=list(feature_layer)
        if isinstance(feature_layer, tuple)
        else feature_layer,
    )


def next_model(config: LlavaNextConfig, seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    return perturbed(LlavaNextForConditionalGeneration(config))


def hf_logits(model, input_ids, mask, reference) -> np.ndarray:
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(input_ids),
            attention_mask=torch.tensor(mask),
            pixel_values=torch.tensor(reference["pixel_values"]),
            image_sizes=torch.tensor(reference["image_sizes"]),
        ).logits.numpy()


def processor_for(pinpoints) -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=[list(p) for p in pinpoints],
    )


def random_images(sizes, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_image_token_counts_equal_the_processor_for_a_table_of_sizes(tmp_path):
    from llava_jax.data.datasets.synthetic import build_tokenizer
    from llava_jax.data.tokenizer import load_tokenizer

    pinpoints = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    processor = LlavaNextProcessor(
        image_processor=processor_for(pinpoints),
        tokenizer=load_tokenizer(build_tokenizer(str(tmp_path))).tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    ours = Anyres(tile=336, patch=14, pinpoints=pinpoints)
    sizes = [(336, 336), (480, 640), (640, 480), (1000, 200), (200, 1000), (333, 999)]
    sizes += [(1, 1), (24, 1920), (1920, 24), (768, 1024), (2000, 2000), (512, 513)]
    for height, width in sizes:
        expected = processor._get_number_of_features(height, width, 336, 336) - 1
        assert ours.num_tokens(height, width) == expected, (height, width)
        layout = ours.feature_layout(height, width)
        assert (layout >= 0).sum() == expected
        assert len(layout) == ours.max_tokens


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers_with_images_of_several_sizes(tmp_path, name):
    """One batch, three images of different sizes and aspect ratios (unpadded along each
    axis): our tiles equal the processor's, our logits equal transformers' (float32)."""
    pinpoints, feature_layer, sizes = CONFIGS[name]
    hf_config = next_config(pinpoints, feature_layer)
    hf_model = next_model(hf_config)
    hf_model.save_pretrained(tmp_path / "hf")
    config, params = load_hf(str(tmp_path / "hf"))
    assert config.image_grid_pinpoints == pinpoints

    images = random_images(sizes)
    reference = processor_for(pinpoints)(images, return_tensors="np")
    geometry = Anyres(tile=TILE, patch=PATCH, pinpoints=pinpoints)
    tiles = np.stack([geometry.tiles(image, CLIP_MEAN, CLIP_STD) for image in images])
    hf_pixels = reference["pixel_values"].transpose(0, 1, 3, 4, 2)  # [B, T, H, W, 3]
    counts = [1 + np.prod(geometry.grid(h, w)) for h, w in sizes]
    for index, count in enumerate(counts):
        np.testing.assert_allclose(tiles[index, :count], hf_pixels[index, :count], atol=1e-5)
        assert not tiles[index, count:].any()

    # Each prompt: BOS, the image's tokens, then text; right-padded to one length.
    tokens = [geometry.num_tokens(h, w) for h, w in sizes]
    rng = np.random.default_rng(1)
    length = max(tokens) + 8
    input_ids = np.zeros((len(sizes), length), np.int64)
    mask = np.zeros_like(input_ids)
    for row, count in enumerate(tokens):
        text = rng.integers(3, VOCAB - 1, 5 + row)
        ids = np.concatenate([[1], np.full(count, IMAGE_TOKEN), text])
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    expected = hf_logits(hf_model, input_ids, mask, reference)

    layout = np.stack([geometry.feature_layout(h, w) for h, w in sizes])[:, None]
    model = Llava(config)
    logits = np.asarray(
        model.apply(
            {"params": params},
            input_ids.astype(np.int32),
            tiles[:, None],
            attention_mask=mask.astype(np.int32),
            image_layout=layout,
        )
    )
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=0)

    # The way back: save_hf writes what transformers reads as the same model.
    save_hf(config, params, str(tmp_path / "ours"))
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    round_trip = hf_logits(again, input_ids, mask, reference)
    np.testing.assert_allclose(round_trip[real], expected[real], atol=1e-5, rtol=0)


def test_greedy_generation_equals_transformers_generate(tmp_path):
    """Prompts of different lengths, each with an image of another size (left-padded for
    transformers): `Engine.generate` gives transformers' greedy tokens."""
    from llava_jax.inference import Engine, SamplingConfig

    pinpoints, feature_layer, sizes = CONFIGS["wide-and-tall"]
    hf_model = next_model(next_config(pinpoints, feature_layer), seed=3)
    hf_model.save_pretrained(tmp_path / "hf")
    config, params = load_hf(str(tmp_path / "hf"))
    geometry = Anyres(tile=TILE, patch=PATCH, pinpoints=pinpoints)
    images = random_images(sizes, seed=4)
    rng = np.random.default_rng(5)
    prompts = [
        np.concatenate(
            [[1], np.full(geometry.num_tokens(h, w), IMAGE_TOKEN), rng.integers(3, 90, 4 + 3 * i)]
        ).astype(np.int32)
        for i, (h, w) in enumerate(sizes)
    ]
    steps = 8
    engine = Engine(config)
    tiles = np.stack([geometry.tiles(image, CLIP_MEAN, CLIP_STD) for image in images])
    layout = np.stack([geometry.feature_layout(h, w) for h, w in sizes])[:, None]
    result = engine.generate(
        engine.place(params),
        prompts,
        tiles[:, None],
        sampling=SamplingConfig(max_new_tokens=steps),
        image_layout=layout,
    )

    longest = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), longest), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = prompt
        mask[row, longest - len(prompt) :] = 1
    reference = processor_for(pinpoints)(images, return_tensors="pt")
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            pixel_values=reference["pixel_values"],
            image_sizes=reference["image_sizes"],
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            suppress_tokens=[IMAGE_TOKEN],
        )
    np.testing.assert_array_equal(np.stack(result.tokens), out[:, longest:].numpy())


def test_the_programs_refuse_a_next_model_saying_why(tmp_path):
    """The command-line programs do not tile images yet: a NeXT checkpoint is refused when
    loading, with a message saying so, not failed deep inside."""
    from llava_jax.data.datasets.synthetic import build_tokenizer
    from llava_jax.inference.load import InputError, load_model

    pinpoints, feature_layer, _ = CONFIGS["wide-and-tall"]
    next_model(next_config(pinpoints, feature_layer)).save_pretrained(tmp_path / "hf")
    build_tokenizer(str(tmp_path / "hf"))
    with pytest.raises(InputError, match="LLaVA-NeXT model .* cannot tile"):
        load_model(str(tmp_path / "hf"))


def test_a_next_model_trains_and_evaluates(tmp_path):
    """configs/tiny.py:next, a few steps: the loss is finite and falls, the held-out loss
    and the answers (generated over tiles) are computed."""
    import json
    import sys

    from trainer_fixtures import REPO, tiny_config

    from llava_jax.train.trainer import train_and_evaluate

    sys.path.insert(0, f"{REPO}/configs")
    import tiny

    assert tiny.get_config("next").model.image_grid_pinpoints
    config = tiny_config(
        str(tmp_path / "tfds"),
        model__image_grid_pinpoints=((48, 96), (96, 48), (96, 96)),
        data__max_len=160,
        train__num_steps=4,
        eval__num_records=2,
        eval__loss_batches=1,
        eval__max_new_tokens=3,
    )
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert np.isfinite(summary["eval"]["eval_loss"])
    assert summary["eval"]["num_examples"] > 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["image_grid_pinpoints"] == [[48, 96], [96, 48], [96, 96]]


def test_the_data_pipeline_tiles_images_and_gives_each_its_own_token_count(tmp_path):
    """A NeXT data config: each image's tiles and layout come with the example, its prompt
    has the image's own number of image tokens (images of three sizes), and a NeXT model
    reads the batch, every image token taking a feature."""
    import dataclasses
    import io
    import json

    from llava_jax.data.config import DataConfig
    from llava_jax.data.pipeline import ExampleEncoder, make_train_iterator, tokenizer_for
    from llava_jax.models.config import ModelConfig, TextConfig, VisionConfig

    pinpoints, _, sizes = CONFIGS["wide-and-tall"]
    config = DataConfig(
        data_dir=str(tmp_path),
        image_size=TILE,
        image_patch_size=PATCH,
        num_image_tokens=(TILE // PATCH) ** 2,
        image_grid_pinpoints=pinpoints,
        max_len=96,
        global_batch_size=3,
    )
    tokenizer = tokenizer_for(config)
    records = []
    for index, image in enumerate(random_images(sizes, seed=7)):
        png = io.BytesIO()
        image.save(png, format="PNG")
        turns = [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": "red"},
        ]
        records.append(
            {
                "id": f"next-{index}",
                "image_bytes": [png.getvalue()],
                "image_paths": [],
                "conversations": json.dumps(turns),
            }
        )
    batch = next(make_train_iterator(config, tokenizer, 0, 1, source=records))
    geometry = config.anyres
    assert batch["images"].shape == (3, 1, geometry.max_tiles, TILE, TILE, 3)
    assert batch["image_layout"].shape == (3, 1, geometry.max_tokens)
    encoder = ExampleEncoder(config, tokenizer)
    by_size = {}
    for record, image in zip(records, random_images(sizes, seed=7), strict=True):
        example = encoder.encode(from_stored(record))
        width, height = image.size
        count = int((example["input_ids"] == tokenizer.image_token_id).sum())
        assert count == geometry.num_tokens(height, width)
        np.testing.assert_array_equal(
            example["images"][0], geometry.tiles(image, config.image_mean, config.image_std)
        )
        by_size[count] = example
    assert len(by_size) == 3  # three sizes, three counts

    model_config = ModelConfig(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, image_size=TILE,
            patch_size=PATCH,
        ),
        text=TextConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
            num_heads=4, num_kv_heads=2, max_position_embeddings=128,
        ),
        image_token_id=tokenizer.image_token_id,
        image_grid_pinpoints=pinpoints,
    )  # fmt: skip

    params = init_params(model_config, __import__("jax").random.key(0))
    inputs = {k: batch[k] for k in ("input_ids", "images", "image_mask", "attention_mask")}
    logits = Llava(model_config).apply(
        {"params": params}, **inputs, image_layout=batch["image_layout"]
    )
    assert np.isfinite(np.asarray(logits)).all()
    assert dataclasses.replace(config, image_grid_pinpoints=()).anyres is None


def test_packing_or_grouping_next_data_is_refused():
    from llava_jax.data.config import DataConfig

    grid = dict(image_size=TILE, image_patch_size=PATCH, image_grid_pinpoints=((28, 56),))
    for option in ("packing", "group_by_modality_length"):
        with pytest.raises(ValueError, match="do not take LLaVA-NeXT images .* yet"):
            DataConfig(**grid, **{option: True})
