"""LLaVA-OneVision in the programs: `generate` (several `--image`s, `--video`), `chat`,
`evaluate` (a question of several images) and the server (several `image_url` parts, a
`video_url` part), on a tiny random OneVision checkpoint saved as transformers saves it.
Answers equal transformers' greedy `generate` on the same prompt ids: two images with
`batch_num_images=[2]` (each one padded tile), a video with `pixel_values_videos`. The
pixels given to transformers are our preprocessing's (as tests/test_onevision.py feeds it:
transformers' video processor needs torchvision), computed here from the files."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
import urllib.request

import av
import numpy as np
import pytest
import torch
from hf_reference import IMAGE_TOKEN, perturbed
from PIL import Image
from test_inference_cli import QUESTION, save_word_tokenizer
from test_onevision import VIDEO_TOKEN, channels_first, onevision_config, random_images
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

from llava_jax.data.image_tiles import ImageTiler
from llava_jax.data.video import read_video

STEPS = 5
# the tiny model (test_onevision.py): 35 px tiles of 7 px patches -> 5 x 5 features a tile,
# grids up to 3 x 3 (10 tiles a slot), anyres_max_2
SIDE = 5
SEVERAL_TOKENS = SIDE * SIDE + 1  # a tile, then a newline
POOLED = 3  # ceil(5 / 2): a video frame's features pooled 2x2
PAIR = {"left.png": (20, 50), "right.png": (60, 30)}  # (height, width)
LARGE = {"large.png": (100, 95)}  # a lone image anyres_max_2 resizes
FRAMES = 12  # of a 24-frame video: two slots (10 frames, then 2)
VIDEO_SIZE = (40, 48)  # (height, width), even for yuv420p


def write_video(path: str, num_frames: int = 24) -> str:
    """An MPEG-4 video of random frames (PyAV), `num_frames` at 10 fps."""
    rng = np.random.default_rng(9)
    height, width = VIDEO_SIZE
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(num_frames):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    """(directory, transformers model): a OneVision checkpoint with a tokenizer, PNG files
    of `PAIR` and `LARGE`, and `clip.mp4` beside it."""
    directory = tmp_path_factory.mktemp("hf_onevision")
    torch.manual_seed(0)
    model = perturbed(LlavaOnevisionForConditionalGeneration(onevision_config()))
    with torch.no_grad():
        for name, param in model.named_parameters():
            # larger weights than the default init: greedy answers that follow the pixels
            # (at 0.02 every prompt gets one repeated token, whatever its images)
            if param.ndim >= 2:
                param.normal_(0.0, 0.2)
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                param.normal_(0.0, 0.5)  # Qwen2's q/k/v biases start at zero
    model.save_pretrained(directory)
    save_word_tokenizer(directory)
    sizes = {**PAIR, **LARGE}
    for name, image in zip(sizes, random_images(sizes.values(), seed=4), strict=True):
        image.save(directory / name)
    write_video(str(directory / "clip.mp4"))
    model.generation_config.pad_token_id = 3
    return directory, model


@pytest.fixture(scope="module")
def loaded(onevision_dir):
    from llava_jax.inference.load import load_model

    return load_model(str(onevision_dir[0]))


def transformers_answer(onevision_dir, ids: np.ndarray, **media) -> tuple[str, np.ndarray]:
    """transformers' greedy answer (decoded with the checkpoint's tokenizer) to `ids`, and
    the logits of its first token `float32[V]`."""
    directory, hf_model = onevision_dir
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor(ids[None].astype(np.int64)),
            **media,
            max_new_tokens=STEPS,
            do_sample=False,
            eos_token_id=2,
            suppress_tokens=[IMAGE_TOKEN],
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(ids) :].tolist()
    tokens = tokens[: tokens.index(2)] if 2 in tokens else tokens
    text = AutoTokenizer.from_pretrained(directory).decode(tokens).strip()
    return text, out.logits[0][0].numpy()


def first_logits(loaded, prepared) -> np.ndarray:
    """Our logits `float32[V]` of the prepared prompt's first answer token (the image
    token's column left out of the comparison: both sides suppress it)."""
    result = loaded.generate(
        [prepared.ids],
        sampling=loaded.sampling(max_new_tokens=1),
        return_logits=True,
        **loaded.batch_images([prepared.images]),
    )
    return result.logits[0][0]


def assert_logits_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    keep = np.arange(len(theirs)) != IMAGE_TOKEN
    np.testing.assert_allclose(ours[keep], theirs[keep], rtol=1e-4, atol=1e-4)


def image_tokens(ids: np.ndarray) -> int:
    return int(np.sum(ids == IMAGE_TOKEN))


def pair_reference(loaded, directory) -> dict:
    """transformers' inputs of the two images of `PAIR` in one prompt: each padded to a
    square tile (`ImageTiler.encode_several`, the model's mean and std)."""
    tiler = ImageTiler.of_geometry(loaded.geometry)
    mean, std = loaded.data.image_mean, loaded.data.image_std
    tiles = [
        tiler.encode_several(Image.open(directory / name).convert("RGB"), mean, std)[0][:1]
        for name in PAIR
    ]
    return dict(
        pixel_values=channels_first(np.stack(tiles)),
        image_sizes=torch.tensor(list(PAIR.values())),
        batch_num_images=torch.tensor([2]),
    )


def video_reference(loaded, path: str) -> dict:
    """transformers' `pixel_values_videos` of `FRAMES` frames of the video at `path`."""
    tiler = ImageTiler.of_geometry(loaded.geometry)
    frames = read_video(path, FRAMES)
    slots, _ = tiler.encode_video(frames, loaded.data.image_mean, loaded.data.image_std)
    pixels = np.concatenate([tiles for tiles, _ in slots])[:FRAMES]
    return dict(pixel_values_videos=channels_first(pixels[None]))


@pytest.fixture(scope="module")
def answers(onevision_dir, loaded) -> dict[str, str]:
    """`generate`'s answers (the library call the CLI makes): two images, the video."""
    from llava_jax import generate

    directory = onevision_dir[0]
    pair = [str(directory / name) for name in PAIR]
    video = str(directory / "clip.mp4")
    return {
        "pair": generate.answer(loaded, QUESTION, pair, max_new_tokens=STEPS),
        "video": generate.answer(
            loaded, QUESTION, None, video_path=video, frames=FRAMES, max_new_tokens=STEPS
        ),
    }


def test_two_images_answer_as_transformers_with_batch_num_images(onevision_dir, loaded, answers):
    """Two `--image`s: each is one tile and a newline (26 tokens, not its lone count), its
    `<image>\\n` in front of the question in order; the answer is transformers'."""
    from llava_jax.inference.prompting import Turn, prepare_prompt

    directory = onevision_dir[0]
    images = [loaded.load_image(str(directory / name)) for name in PAIR]
    assert [image.num_tokens for image in images] != [SEVERAL_TOKENS] * 2  # alone: anyres
    prepared = prepare_prompt(loaded, [Turn("user", QUESTION, 2)], images, max_new_tokens=STEPS)
    assert [image.num_tokens for image in prepared.images] == [SEVERAL_TOKENS] * 2
    assert image_tokens(prepared.ids) == 2 * SEVERAL_TOKENS
    expected, logits = transformers_answer(
        onevision_dir, prepared.ids, **pair_reference(loaded, directory)
    )
    assert answers["pair"] == expected
    assert_logits_close(first_logits(loaded, prepared), logits)


def test_a_video_answers_as_transformers_with_pixel_values_videos(onevision_dir, loaded, answers):
    """`--video clip.mp4 --frames 12`: one `<image>` of 12 x 3 x 3 + 1 tokens over two image
    slots; transformers (its `<video>` tokens in their place) gives the same answer."""
    from llava_jax.inference.prompting import Turn, prepare_prompt

    video_path = str(onevision_dir[0] / "clip.mp4")
    video = loaded.load_video(video_path, FRAMES)
    assert len(video.slots) == 2 and video.num_tokens == FRAMES * POOLED**2 + 1
    prepared = prepare_prompt(loaded, [Turn("user", QUESTION, 1)], [video], max_new_tokens=STEPS)
    assert image_tokens(prepared.ids) == FRAMES * POOLED**2 + 1
    batched = loaded.batch_images([prepared.images])
    assert batched["image_mask"].tolist() == [[True, True]]
    hf_ids = np.where(prepared.ids == IMAGE_TOKEN, VIDEO_TOKEN, prepared.ids)
    expected, logits = transformers_answer(
        onevision_dir, hf_ids, **video_reference(loaded, video_path)
    )
    assert answers["video"] == expected
    assert_logits_close(first_logits(loaded, prepared), logits)
    assert answers["video"] != answers["pair"]  # the media matter


def test_a_lone_image_keeps_anyres_max(onevision_dir, loaded):
    """One image on a OneVision model: its grid's tokens, resized past 2 tiles' features
    (hand count: 100 x 95 px on the 3 x 3 grid of 5 x 5 features, unpadded 15 x 15
    (round(95 * 15 / 100) = 14 columns, no whole column of padding to cut), ratio
    sqrt(225 / 50) = 2.12 > 1.1 -> 15 // 2.12 = 7 x 7, each row with a newline, after the
    overview's 25)."""
    from llava_jax.inference.prompting import Turn, prepare_prompt

    image = loaded.load_image(str(onevision_dir[0] / "large.png"))
    assert image.num_tokens == 25 + 7 * (7 + 1)
    prepared = prepare_prompt(loaded, [Turn("user", QUESTION, 1)], [image], max_new_tokens=STEPS)
    assert image_tokens(prepared.ids) == 25 + 7 * (7 + 1)


def test_generate_chat_and_evaluate_take_several_images_and_a_video(
    onevision_dir, loaded, answers, tmp_path, capsys, monkeypatch
):
    """The command lines: `generate --image A --image B`, `generate --video --frames`,
    `chat --image A --image B` and `evaluate` with `"image": [A, B]` give `answer`'s texts
    (one model load: `model_from_args` returns the loaded model)."""
    from llava_jax import chat, cli, evaluate, generate

    monkeypatch.setattr(cli, "model_from_args", lambda args: loaded)
    directory = onevision_dir[0]
    base = ["--checkpoint", str(directory), "--max-new-tokens", str(STEPS)]
    images = [arg for name in PAIR for arg in ("--image", str(directory / name))]
    capsys.readouterr()
    assert generate.main([*base, *images, "--prompt", QUESTION]) == 0
    assert capsys.readouterr().out == answers["pair"] + "\n"
    video = ["--video", str(directory / "clip.mp4"), "--frames", str(FRAMES)]
    assert generate.main([*base, *video, "--prompt", QUESTION]) == 0
    assert capsys.readouterr().out == answers["video"] + "\n"

    lines = iter([QUESTION, "exit"])
    assert chat.main([*base, *images, "--temperature", "0"], read=lambda _: next(lines)) == 0
    assert f"ASSISTANT: {answers['pair']}\n" in capsys.readouterr().out

    questions = tmp_path / "questions.jsonl"
    records = [{"question_id": 1, "text": QUESTION, "image": list(PAIR)}]
    records.append({"question_id": 2, "text": QUESTION, "image": "left.png"})
    questions.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "answers.jsonl"
    argv = [*base, "--questions", str(questions), "--image-dir", str(directory)]
    assert evaluate.main([*argv, "--out", str(out), "--batch-size", "2", "--no-progress"]) == 0
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e.get("error") for e in entries] == [None, None]
    assert entries[0]["text"] == answers["pair"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_server_takes_several_image_urls_and_a_video_url(onevision_dir, loaded, answers):
    """The app on uvicorn (slot engine, image and prefix caches): two `image_url` parts in
    one message (sent twice: the second from the caches) and a `video_url` part answer as
    `generate`; a second video, bytes that are no video, or a video for a model without
    video are refused, naming the message."""
    import uvicorn

    from llava_jax.serve.api_error import APIError
    from llava_jax.serve.app import create_app
    from llava_jax.serve.requests import parse_request
    from llava_jax.serve.slot_batcher import SlotBatcher

    directory = onevision_dir[0]

    def part(kind: str, path, mime: str) -> dict:
        data = base64.b64encode(path.read_bytes()).decode()
        return {"type": kind, kind: {"url": f"data:{mime};base64,{data}"}}

    def body(*parts: dict) -> dict:
        content = [*parts, {"type": "text", "text": QUESTION}]
        return {
            "model": "onevision",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": STEPS,
            "temperature": 0,
        }

    pair = [part("image_url", directory / name, "image/png") for name in PAIR]
    video = part("video_url", directory / "clip.mp4", "video/mp4")
    batcher = SlotBatcher(
        loaded, max_slots=2, prefill_chunk=16, image_cache_bytes=1 << 24, prefix_cache_bytes=1 << 24
    )
    app = create_app(loaded, batcher, "onevision", video_frames=FRAMES)
    port = free_port()
    served = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        deadline = time.monotonic() + 30
        while not served.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        for expected, parts in [("pair", pair), ("pair", pair), ("video", [video])]:
            status, reply = post(url, body(*parts))
            assert status == 200, reply
            assert reply["choices"][0]["message"]["content"] == answers[expected]
        status, reply = post(url, body(video, video))
        assert status == 400 and "at most 1 video" in reply["error"]["message"]
        not_a_video = part("video_url", directory / "left.png", "video/mp4")
        status, reply = post(url, body(not_a_video))
        assert status == 400 and reply["error"]["param"] == "messages[0].content", reply
        assert "video in messages[0]" in reply["error"]["message"]
        assert len(batcher.engine.image_cache) == 4  # two images, a video's two slots
    finally:
        served.should_exit = True
        thread.join(10)
    # a model without video keeps today's rules: one image a message, no video
    with pytest.raises(APIError) as refused:
        parse_request(body(video), "onevision", 1 << 24)
    assert refused.value.status == 400 and refused.value.code == "unsupported_video"
    with pytest.raises(APIError, match="2 images: one per message at most"):
        parse_request(body(*pair), "onevision", 1 << 24)


def test_prefix_keys_follow_blended_layouts_and_a_video_over_two_slots(loaded):
    """`block_keys` on a prompt of text, a 12-frame video (slots of 90 and 19 tokens, hand
    counted) and text: a key for every block, and changing the second slot's pixels changes
    exactly the keys of the blocks from the one holding its first token."""
    from llava_jax.inference.cache_keys import block_keys

    frames = [Image.new("RGB", (48, 40), (i * 20, 0, 0)) for i in range(FRAMES)]
    video = loaded.video_from_frames(frames)
    assert [int(loaded.geometry.layout_tokens(layout)) for _, layout in video.slots] == [90, 19]
    ids = np.concatenate([np.full(7, 5), np.full(109, IMAGE_TOKEN), np.full(12, 6)])
    fields = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int32)}
    fields |= loaded.batch_images([[video]])
    block = 16
    keys = block_keys(fields, block, IMAGE_TOKEN, loaded.geometry)
    assert len(keys) == len(ids) // block
    changed = dict(fields, images=fields["images"].copy())
    changed["images"][0, 1, 0, 0, 0, 0] += 1
    other = block_keys(changed, block, IMAGE_TOKEN, loaded.geometry)
    second_slot_starts = 7 + 90  # its first token's block
    same = [a == b for a, b in zip(keys, other, strict=True)]
    assert same == [(j + 1) * block <= second_slot_starts for j in range(len(keys))]
    assert hashlib.sha256(b"".join(keys)).digest() != hashlib.sha256(b"".join(other)).digest()


def test_a_qwen2_checkpoint_that_names_no_template_prompts_with_qwen_1_5(loaded):
    """A Hugging Face OneVision directory says nothing of its conversation format: a Qwen2
    decoder is prompted as LLaVA-OneVision was trained (ChatML, `qwen_1_5`), not as
    LLaVA-1.5, and stops at `<|im_end|>`."""
    assert loaded.template.name == "qwen_1_5"
    assert loaded.stop_strings == ("<|im_end|>",)
