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

from llava_jax.convert import load_hf, load_towers, save_hf
from llava_jax.data.datasets.record import from_stored
from llava_jax.data.image import CLIP_MEAN, CLIP_STD
from llava_jax.data.image_tiles import ImageTiler
from llava_jax.models.inputs import ImageGeometry
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
    ours = ImageTiler(tile=336, patch=14, pinpoints=pinpoints)
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
    geometry = ImageTiler(tile=TILE, patch=PATCH, pinpoints=pinpoints)
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


# Two images in the first row (the first with fewer tokens than the largest layout, so the
# second's features start at its own count), one in the second.
ROW_IMAGES = [[(30, 50), (70, 20)], [(40, 40)]]


@pytest.fixture(scope="module")
def several_images_a_row(tmp_path_factory):
    """(checkpoint directory, our inputs, transformers' logits, real tokens) for
    `ROW_IMAGES`: each row BOS, then each image's tokens followed by text, right-padded."""
    directory = tmp_path_factory.mktemp("next_rows")
    pinpoints, feature_layer, _ = CONFIGS["wide-and-tall"]
    hf_model = next_model(next_config(pinpoints, feature_layer), seed=11)
    hf_model.save_pretrained(directory)
    geometry = ImageTiler(tile=TILE, patch=PATCH, pinpoints=pinpoints)
    sizes = [size for row in ROW_IMAGES for size in row]
    images = random_images(sizes, seed=12)
    rng = np.random.default_rng(13)
    prompts = []
    for row in ROW_IMAGES:
        parts = [[1]]
        for height, width in row:
            parts += [
                np.full(geometry.num_tokens(height, width), IMAGE_TOKEN),
                rng.integers(3, 90, 4),
            ]
        prompts.append(np.concatenate(parts))
    length = max(len(p) for p in prompts) + 3
    input_ids = np.zeros((len(prompts), length), np.int64)
    mask = np.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt)], mask[row, : len(prompt)] = prompt, 1
    expected = hf_logits(
        hf_model, input_ids, mask, processor_for(pinpoints)(images, return_tensors="np")
    )

    slots = max(len(row) for row in ROW_IMAGES)
    tiles = np.zeros((len(ROW_IMAGES), slots, *geometry.tiles_shape()), np.float32)
    layout = geometry.empty_layouts(len(ROW_IMAGES), slots)
    image_mask = np.zeros((len(ROW_IMAGES), slots), bool)
    pictures = iter(images)
    for row, row_sizes in enumerate(ROW_IMAGES):
        for slot, (height, width) in enumerate(row_sizes):
            tiles[row, slot] = geometry.tiles(next(pictures), CLIP_MEAN, CLIP_STD)
            layout[row, slot] = geometry.feature_layout(height, width)
            image_mask[row, slot] = True
    inputs = dict(
        input_ids=input_ids.astype(np.int32),
        images=tiles,
        image_mask=image_mask,
        attention_mask=mask.astype(np.int32),
        image_layout=layout,
    )
    return directory, inputs, expected, mask.astype(bool)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unscanned"])
def test_logits_equal_transformers_with_several_images_in_a_row(several_images_a_row, scan_layers):
    """A row with two images of different sizes, another with one: each image token takes
    its own image's feature (float32), with the towers' layers scanned or not."""
    directory, inputs, expected, real = several_images_a_row
    config, params = load_hf(str(directory), scan_layers=scan_layers)
    for tower in ("img", "llm"):  # the other parameter trees and layer loops
        assert ("layers" in params[tower]) == scan_layers
    logits = np.asarray(Llava(config).apply({"params": params}, **inputs))
    np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers_generate(tmp_path):
    """Prompts of different lengths, each with an image of another size (left-padded for
    transformers): `Engine.generate` gives transformers' greedy tokens."""
    from llava_jax.inference import Engine, SamplingConfig

    pinpoints, feature_layer, sizes = CONFIGS["wide-and-tall"]
    hf_model = next_model(next_config(pinpoints, feature_layer), seed=3)
    hf_model.save_pretrained(tmp_path / "hf")
    config, params = load_hf(str(tmp_path / "hf"))
    geometry = ImageTiler(tile=TILE, patch=PATCH, pinpoints=pinpoints)
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


# Images of any size for the programs: wide, tall, tiny and square.
PROGRAM_IMAGES = {
    "wide.png": (30, 50),
    "tall.png": (70, 20),
    "dot.png": (3, 2),
    "box.png": (40, 40),
}


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    """(directory, transformers model, pinpoints): a NeXT checkpoint as transformers saves
    it, with a tokenizer, and PNG files of `PROGRAM_IMAGES`' sizes beside it."""
    from test_inference_cli import save_word_tokenizer

    directory = tmp_path_factory.mktemp("hf_next")
    pinpoints, feature_layer, _ = CONFIGS["wide-and-tall"]
    model = next_model(next_config(pinpoints, feature_layer), seed=7)
    model.save_pretrained(directory)
    save_word_tokenizer(directory)
    images = random_images(PROGRAM_IMAGES.values(), seed=8)
    for name, image in zip(PROGRAM_IMAGES, images, strict=True):
        image.save(directory / name)
    return directory, model, pinpoints


def transformers_answer(next_dir, ids: np.ndarray, image_name: str | None, steps: int) -> str:
    """transformers' greedy answer (decoded with the checkpoint's tokenizer) to the prompt
    `ids` and the image file, prepared by its own `LlavaNextImageProcessor`."""
    from transformers import AutoTokenizer

    directory, hf_model, pinpoints = next_dir
    inputs = {"input_ids": torch.tensor(ids[None].astype(np.int64))}
    if image_name is not None:
        image = Image.open(directory / image_name).convert("RGB")
        reference = processor_for(pinpoints)([image], return_tensors="pt")
        inputs.update(pixel_values=reference["pixel_values"], image_sizes=reference["image_sizes"])
    hf_model.generation_config.pad_token_id = 3
    with torch.no_grad():
        out = hf_model.generate(
            **inputs,
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=2,
            suppress_tokens=[IMAGE_TOKEN],
        )
    tokens = out[0, len(ids) :].tolist()
    tokens = tokens[: tokens.index(2)] if 2 in tokens else tokens
    return AutoTokenizer.from_pretrained(directory).decode(tokens).strip()


def test_generate_chat_evaluate_and_the_server_take_a_next_model_and_any_image(
    next_dir, tmp_path, capsys
):
    """A NeXT checkpoint in every program, images of four sizes (1.7:1 to 1:3.5, 3 x 2 px):
    `generate` answers as transformers' `generate` does (its processor tiling the image);
    `evaluate` (batched, with a text-only question), `chat` and the server's batcher give
    the same answers."""
    import asyncio
    import base64
    import json

    from test_inference_cli import QUESTION

    from llava_jax import chat, evaluate, generate
    from llava_jax.inference.load import InputError, load_model
    from llava_jax.serve.app import make_job
    from llava_jax.serve.batcher import Batcher, Done
    from llava_jax.serve.requests import parse_request

    directory, _, pinpoints = next_dir
    steps = 6
    model = load_model(str(directory))
    geometry = ImageTiler(TILE, PATCH, pinpoints, square_tokens=(TILE // PATCH) ** 2)
    assert model.tiler == geometry

    answers = {}
    for name, (height, width) in PROGRAM_IMAGES.items():
        image = model.load_image(str(directory / name))
        assert image.num_tokens == geometry.num_tokens(height, width)
        ids = model.prompt_ids([model.user_turn(QUESTION, with_image=True)], [image])
        assert np.sum(ids == IMAGE_TOKEN) == image.num_tokens
        answers[name] = generate.answer(
            model, QUESTION, str(directory / name), max_new_tokens=steps
        )
        assert answers[name] == transformers_answer(next_dir, ids, name, steps)
    with pytest.raises(InputError, match=r"<image> written 1 time\(s\) but 0 image\(s\)"):
        model.prompt_ids([model.user_turn(QUESTION, with_image=True)], [])
    text_ids = model.prompt_ids([model.user_turn(QUESTION, with_image=False)])
    answers[None] = generate.answer(model, QUESTION, None, max_new_tokens=steps)
    assert answers[None] == transformers_answer(next_dir, text_ids, None, steps)
    assert len(set(answers.values())) > 1  # the images matter

    # evaluate: two questions a batch, one without an image
    questions = tmp_path / "questions.jsonl"
    names = [*PROGRAM_IMAGES, None]
    questions.write_text(
        "".join(
            json.dumps({"question_id": i, "text": QUESTION, **({"image": n} if n else {})}) + "\n"
            for i, n in enumerate(names)
        )
    )
    out = tmp_path / "answers.jsonl"
    argv = ["--checkpoint", str(directory), "--questions", str(questions), "--image-dir"]
    argv += [str(directory), "--out", str(out), "--batch-size", "2", "--no-progress"]
    assert evaluate.main([*argv, "--max-new-tokens", str(steps)]) == 0
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["text"] for e in entries] == [answers[n] for n in names]

    # chat: the image's tokens stay in the history; the first answer is generate's
    lines = iter([QUESTION, "How many shapes ?", "exit"])
    argv = ["--checkpoint", str(directory), "--image", str(directory / "tall.png")]
    capsys.readouterr()
    assert chat.main([*argv, "--max-new-tokens", str(steps), "--temperature", "0"],
                     read=lambda prompt: next(lines)) == 0  # fmt: skip
    shown = capsys.readouterr().out
    assert f"ASSISTANT: {answers['tall.png']}\n" in shown and shown.count("ASSISTANT: ") == 2

    # the server: three requests batched together, images sent as data URLs
    def request(name: str | None) -> dict:
        content = [{"type": "text", "text": QUESTION}]
        if name is not None:
            data = base64.b64encode((directory / name).read_bytes()).decode()
            content.append(
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
            )
        body = {"model": "next", "messages": [{"role": "user", "content": content}]}
        return {**body, "max_tokens": steps, "temperature": 0}

    async def serve(names) -> list[str]:
        loop = asyncio.get_running_loop()
        batcher = Batcher(model, max_batch=4, batch_wait_s=0.5)
        batcher.start()
        try:
            jobs = [
                make_job(model, parse_request(request(n), "next", 1 << 20), loop) for n in names
            ]
            for job in jobs:
                batcher.submit(job)
            done = []
            for job in jobs:
                while not isinstance(event := await job.events.get(), Done):
                    assert not hasattr(event, "status"), event  # Failed
                done.append(event.text)
            return done
        finally:
            batcher.stop()

    served = ["wide.png", None, "dot.png"]
    assert asyncio.run(serve(served)) == [answers[n] for n in served]


def test_a_next_model_trains_and_evaluates(tmp_path):
    """configs/tiny.py:next, a few steps: the loss is finite and falls, the held-out loss
    and the answers (generated over tiles) are computed."""
    import json
    import sys

    from trainer_fixtures import REPO, tiny_config, train_a_few_steps

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
    train_a_few_steps(config, str(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["image_grid_pinpoints"] == [[48, 96], [96, 48], [96, 96]]


def next_data_config(tmp_path, **fields):
    """A `DataConfig` for NeXT data (the built-in tokenizer)."""
    from llava_jax.data.config import DataConfig

    return DataConfig(data_dir=str(tmp_path), **fields)


def next_geometry(pinpoints) -> ImageTiler:
    """The NeXT image geometry of the tiny tower's tiles and these grids."""
    return ImageTiler(tile=TILE, patch=PATCH, pinpoints=pinpoints)


def stored_record(index: int, image: Image.Image | None, answer: str = "red", path: str = ""):
    """A one-turn record as the prepared data stores it: a question about `image` (a PNG),
    or a text-only one."""
    import io
    import json

    images = []
    if image is not None:
        png = io.BytesIO()
        image.save(png, format="PNG")
        images.append(png.getvalue())
    question = "<image>\nWhat colour is the shape?" if images else "Say red."
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {
        "id": f"next-{index}",
        "image_bytes": images,
        "image_paths": [path] if path else [],
        "conversations": json.dumps(turns),
    }


def test_the_data_pipeline_tiles_images_and_gives_each_its_own_token_count(tmp_path):
    """A NeXT data config: each image's tiles and layout come with the example, its prompt
    has the image's own number of image tokens (images of three sizes), and a NeXT model
    reads the batch, every image token taking a feature."""
    import dataclasses

    from llava_jax.data.encode import ExampleEncoder
    from llava_jax.data.pipeline import make_train_iterator, tokenizer_for
    from llava_jax.models.config import ModelConfig, TextConfig, VisionConfig
    from llava_jax.models.inputs import ImageGeometry

    pinpoints, _, sizes = CONFIGS["wide-and-tall"]
    config = next_data_config(tmp_path, max_len=96, global_batch_size=3)
    geometry = next_geometry(pinpoints)
    tokenizer = tokenizer_for(config)
    records = [stored_record(i, image) for i, image in enumerate(random_images(sizes, seed=7))]
    batch = next(make_train_iterator(config, geometry, tokenizer, 0, 1, source=records))
    assert batch["images"].shape == (3, 1, geometry.max_tiles, TILE, TILE, 3)
    assert batch["image_layout"].shape == (3, 1, geometry.max_tokens)
    encoder = ExampleEncoder(config, geometry, tokenizer)
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
    assert not ImageGeometry.of(dataclasses.replace(model_config, image_grid_pinpoints=())).tiled


def test_next_data_packs_and_groups_with_each_images_own_token_count(tmp_path):
    """The length table measures a NeXT conversation from its images' headers, exactly as
    encoding it gives; a packed row holds each conversation with its own tiles and layout
    as unpacked; packed and grouped training read NeXT data."""
    import dataclasses

    from llava_jax.data.encode import ExampleEncoder, RowEncoder
    from llava_jax.data.pipeline import length_table, make_train_iterator, tokenizer_for

    pinpoints, _, sizes = CONFIGS["long-grids"]
    config = next_data_config(tmp_path, max_len=256, max_images_per_row=3, global_batch_size=2)
    geometry = next_geometry(pinpoints)
    tokenizer = tokenizer_for(config)
    images = [*random_images(sizes, seed=9), None]
    records = [stored_record(i, image, "red " * (i + 1)) for i, image in enumerate(images)]
    unpacked = ExampleEncoder(config, geometry, tokenizer)
    examples = [unpacked.encode(from_stored(r)) for r in records]
    lengths = [int(e["attention_mask"].sum()) for e in examples]
    table = length_table(config, geometry, tokenizer, records)
    assert table.lengths.tolist() == lengths and len(set(lengths)) == len(lengths)

    packed = dataclasses.replace(config, packing=True)
    row = RowEncoder(packed, geometry, tokenizer)({"records": records[:3]})
    assert row["images"].shape == (3, geometry.max_tiles, TILE, TILE, 3)
    start = 0
    for slot, (example, length) in enumerate(zip(examples[:3], lengths, strict=False)):
        where = slice(start, start + length)
        assert (row["attention_mask"][where] == slot + 1).all()
        np.testing.assert_array_equal(row["input_ids"][where], example["input_ids"][:length])
        np.testing.assert_array_equal(row["images"][slot], example["images"][0])
        np.testing.assert_array_equal(row["image_layout"][slot], example["image_layout"][0])
        start += length

    for option in ("packing", "group_by_modality_length"):
        reading = dataclasses.replace(config, **{option: True})
        batch = next(make_train_iterator(reading, geometry, tokenizer, 0, 1, source=records))
        slots = reading.image_slots
        assert batch["image_layout"].shape == (2, slots, geometry.max_tokens)
        image_tokens = (batch["input_ids"] == tokenizer.image_token_id).sum(axis=1)
        assert image_tokens.tolist() == (batch["image_layout"] >= 0).sum(axis=(1, 2)).tolist()


def test_an_image_whose_size_changes_on_decoding_is_dropped_from_next_data(tmp_path, monkeypatch):
    """A NeXT image's tokens are counted from its header: one whose decoded pixels have
    another size is dropped, named, rather than trained on with misplaced image tokens."""
    from llava_jax.data import encode, pipeline

    pinpoints, _, _ = CONFIGS["wide-and-tall"]
    config = next_data_config(tmp_path, max_len=96)
    stored = stored_record(0, random_images([(30, 50)])[0], path="images/a.ico")
    encoder = encode.ExampleEncoder(
        config, next_geometry(pinpoints), pipeline.tokenizer_for(config)
    )
    assert encoder(stored)["drop_reason"] == ""
    monkeypatch.setattr(encode, "decoded_size", lambda data: (16, 16))  # what a header said
    dropped = encoder(stored)
    assert dropped["drop_reason"] == "image_size_changed"
    assert dropped["file"] == "images/a.ico" and "(16, 16)" in dropped["detail"]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_load_towers_starts_a_next_model_with_a_fresh_newline(tmp_path, family):
    """CLIP + LLaMA (or Mistral) towers and a grid make a NeXT model: the towers as saved, a
    fresh projector and `image_newline` (normal, std 1/sqrt(D), as LLaVA-NeXT initialises
    it), and transformers' `LlavaNextForConditionalGeneration` reads it back."""
    import jax
    from safetensors.numpy import load_file
    from transformers import CLIPVisionModel

    pinpoints, feature_layer, _ = CONFIGS["wide-and-tall"]
    torch.manual_seed(2)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "clip")
    text = {**TINY_TEXT, "hidden_size": 256, "num_attention_heads": 8}
    text_model(family, text).save_pretrained(tmp_path / "llama")
    config, params = load_towers(
        str(tmp_path / "clip"),
        str(tmp_path / "llama"),
        rng=jax.random.key(1),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=feature_layer,
        image_grid_pinpoints=pinpoints,
    )
    assert ImageGeometry.of(config).tiled
    newline = np.asarray(params["proj"]["image_newline"])
    assert newline.shape == (256,) and abs(newline.std() * 16 - 1) < 0.15
    save_hf(config, params, str(tmp_path / "next"))
    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "next")
    assert hf.config.image_grid_pinpoints == [list(p) for p in pinpoints]
    assert hf.config.text_config.model_type == config.text.model_type == family
    np.testing.assert_array_equal(hf.model.image_newline.detach().numpy(), newline)
    tower = load_file(str(tmp_path / "clip" / "model.safetensors"))
    loaded = {
        k.removeprefix("vision_model."): v for k, v in hf.model.vision_tower.state_dict().items()
    }
    assert set(tower) <= set(loaded)
    for key, value in tower.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, key)


def text_model(family: str, fields: dict) -> torch.nn.Module:
    """A random LLaMA or Mistral causal LM (Mistral without a sliding window, as LLaVA-NeXT's
    Mistral-7B-Instruct-v0.2)."""
    from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

    if family == "mistral":
        fields = {k: v for k, v in fields.items() if k not in ("attention_bias", "mlp_bias")}
        return MistralForCausalLM(MistralConfig(**fields, sliding_window=None))
    return LlamaForCausalLM(LlamaConfig(**fields))


def test_a_mistral_next_model_equals_transformers_and_round_trips(tmp_path):
    """llava-v1.6-mistral's shape: a NeXT model whose decoder is a Mistral. Logits equal
    transformers' (float32), `save_hf` writes a Mistral text config that reads back the same,
    the programs default to its `[INST]` template, and a sliding window is refused by name."""
    from transformers import MistralConfig

    from llava_jax.convert import CheckpointError

    pinpoints, feature_layer, sizes = CONFIGS["wide-and-tall"]
    text = MistralConfig(
        **{**TINY_TEXT, "max_position_embeddings": 512, "rope_parameters": None},
        sliding_window=None,
    )
    hf_config = next_config(pinpoints, feature_layer)
    hf_config.text_config = text
    hf_model = next_model(hf_config, seed=5)
    hf_model.save_pretrained(tmp_path / "hf")
    config, params = load_hf(str(tmp_path / "hf"))
    assert config.text.model_type == "mistral"

    geometry = ImageTiler(tile=TILE, patch=PATCH, pinpoints=pinpoints)
    images = random_images(sizes[:2], seed=6)
    reference = processor_for(pinpoints)(images, return_tensors="np")
    tokens = [geometry.num_tokens(h, w) for h, w in sizes[:2]]
    length = max(tokens) + 6
    input_ids = np.zeros((2, length), np.int64)
    mask = np.zeros_like(input_ids)
    for row, count in enumerate(tokens):
        ids = np.concatenate([[1], np.full(count, IMAGE_TOKEN), [5, 6, 7 + row]])
        input_ids[row, : len(ids)], mask[row, : len(ids)] = ids, 1
    expected = hf_logits(hf_model, input_ids, mask, reference)
    tiles = np.stack([geometry.tiles(image, CLIP_MEAN, CLIP_STD) for image in images])
    layout = np.stack([geometry.feature_layout(h, w) for h, w in sizes[:2]])[:, None]
    logits = Llava(config).apply(
        {"params": params},
        input_ids.astype(np.int32),
        tiles[:, None],
        attention_mask=mask.astype(np.int32),
        image_layout=layout,
    )
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=1e-4, rtol=0)

    save_hf(config, params, str(tmp_path / "ours"))
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    assert again.config.text_config.model_type == "mistral"
    assert again.config.text_config.sliding_window is None
    round_trip = hf_logits(again, input_ids, mask, reference)
    np.testing.assert_allclose(round_trip[real], expected[real], atol=1e-5, rtol=0)

    from llava_jax.inference.checkpoints import _hf_data

    assert _hf_data(str(tmp_path / "hf"), config.text.model_type).template == "mistral_instruct"

    hf_config.text_config.sliding_window = 64
    next_model(hf_config).save_pretrained(tmp_path / "window")
    with pytest.raises(CheckpointError, match="sliding_window=64 < max_position_embeddings"):
        load_hf(str(tmp_path / "window"))
