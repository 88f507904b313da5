"""Continuous batching (inference/slots.py, inference/slot_engine.py): a request's greedy
answer is the same alone, among full slots and admitted while others decode, and equals
`Engine.generate` (and, for one case, transformers' `generate`); sampled rows keep their own
keys; limits, eos, cancelling and refusals."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hf_reference import IMAGE_TOKEN, image_tokens_per_image, tiny_hf_config, tiny_hf_model

from llava_jax.convert import load_hf
from llava_jax.inference import Engine, SamplingConfig
from llava_jax.inference.slot_engine import SlotEngine

PAD = 0
SLOTS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(hf model, config, params, engine): a tiny LLaVA and one `Engine` for references."""
    hf_config = tiny_hf_config()
    model = tiny_hf_model(hf_config, seed=3)
    directory = tmp_path_factory.mktemp("slots")
    model.save_pretrained(directory)
    config, params = load_hf(str(directory))
    return model, config, params, Engine(config)


@pytest.fixture(scope="module")
def slots(setup):
    """One slot engine for the module (its programs compiled once): 3 slots of 96 slots."""
    _, _, params, engine = setup
    with SlotEngine(engine, params, max_slots=SLOTS, cache_length=96, steps_per_round=3) as e:
        yield e


def request(seed: int, length: int, with_image: bool):
    """A random prompt of `length` tokens (the image's tokens after the first, with an
    image) and its images as `submit` takes them (one row; None without an image)."""
    rng = np.random.default_rng(seed)
    per_image = image_tokens_per_image(tiny_hf_config())
    prompt = rng.integers(1, IMAGE_TOKEN, length).astype(np.int32)
    if not with_image:
        return prompt, None
    prompt[1 : 1 + per_image] = IMAGE_TOKEN
    return prompt, rng.standard_normal((1, 1, 1, 28, 28, 3)).astype(np.float32)


def reference(engine, params, prompt, images, sampling):
    """`Engine.generate` for the prompt alone."""
    result = engine.generate(params, [prompt], images, None, sampling)
    return result.tokens[0].tolist(), result.finish_reasons[0]


GREEDY = SamplingConfig(max_new_tokens=12, pad_token_id=PAD)


def test_a_request_alone_equals_the_engine_and_transformers(setup, slots):
    model, _, params, engine = setup
    prompt, images = request(0, 20, with_image=True)
    tokens, finish = slots.submit(prompt, images, sampling=GREEDY).result(timeout=300)
    assert (tokens, finish) == reference(engine, params, prompt, images, GREEDY)
    assert finish == "length" and len(tokens) == 12
    with torch.no_grad():  # transformers' greedy generate on the same prompt and pixels
        out = model.generate(
            input_ids=torch.tensor(prompt[None].astype(np.int64)),
            pixel_values=torch.tensor(images[0, :, 0].transpose(0, 3, 1, 2)),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=None,
        )
    assert tokens == out[0, len(prompt) :].tolist()


def test_full_slots_and_a_queue_give_each_request_its_answer_alone(setup, slots):
    """Twice as many requests as slots, mixed lengths, with and without images: the
    waiting ones are admitted as slots free up, and every answer equals it alone."""
    _, _, params, engine = setup
    cases = [request(10 + i, 9 + 5 * i, with_image=i % 2 == 0) for i in range(2 * SLOTS)]
    limits = [5, 12, 3, 9, 7, 4]
    configs = [SamplingConfig(max_new_tokens=n, pad_token_id=PAD) for n in limits]
    handles = [
        slots.submit(p, images, sampling=c) for (p, images), c in zip(cases, configs, strict=True)
    ]
    for (prompt, images), config, handle in zip(cases, configs, handles, strict=True):
        assert handle.result(timeout=300) == reference(engine, params, prompt, images, config)


def test_a_request_admitted_mid_decode_changes_no_running_answer(setup, slots):
    """A long answer runs; others are admitted while it decodes (after its first tokens
    arrived) and finish before it: all equal their answers alone, and the long one's
    tokens stream in order."""
    _, _, params, engine = setup
    long_prompt, long_images = request(20, 30, with_image=True)
    long_config = SamplingConfig(max_new_tokens=40, pad_token_id=PAD)
    running = slots.submit(long_prompt, long_images, sampling=long_config)
    streamed = []
    chunks = iter(running)
    streamed += next(chunks)  # it is decoding now
    late = [request(30 + i, 12 + 7 * i, with_image=i == 1) for i in range(2)]
    late_handles = [slots.submit(p, images, sampling=GREEDY) for p, images in late]
    for chunk in chunks:
        streamed += chunk
    assert (streamed, running.finish_reason) == reference(
        engine, params, long_prompt, long_images, long_config
    )
    for (prompt, images), handle in zip(late, late_handles, strict=True):
        assert handle.result(timeout=300) == reference(engine, params, prompt, images, GREEDY)


def test_sampled_rows_draw_with_their_own_keys_beside_greedy_ones(setup, slots):
    """A sampled request's tokens depend on its seed only: the same alone through the
    engine, and beside a greedy one; another seed gives other tokens."""
    _, _, params, engine = setup
    prompt, images = request(40, 16, with_image=True)
    hot = SamplingConfig(max_new_tokens=10, temperature=1.5, top_k=20, seed=7, pad_token_id=PAD)
    greedy_prompt, _ = request(41, 11, with_image=False)
    sampled = slots.submit(prompt, images, sampling=hot)
    beside = slots.submit(greedy_prompt, sampling=GREEDY)
    assert sampled.result(timeout=300) == reference(engine, params, prompt, images, hot)
    assert beside.result(timeout=300) == reference(engine, params, greedy_prompt, None, GREEDY)
    other = SamplingConfig(max_new_tokens=10, temperature=1.5, top_k=20, seed=8, pad_token_id=PAD)
    assert slots.submit(prompt, images, sampling=other).result(timeout=300)[0] != sampled.tokens


def test_an_eos_ends_the_answer_without_the_eos(setup, slots):
    """The eos id is one the greedy answer reaches: the answer stops before it, as the
    engine's does, and the slot is free again."""
    _, _, params, engine = setup
    prompt, images = request(50, 14, with_image=True)
    free_run = reference(engine, params, prompt, images, GREEDY)[0]
    eos = free_run[4]
    config = SamplingConfig(max_new_tokens=12, eos_token_ids=(eos,), pad_token_id=PAD)
    with SlotEngine(engine, params, max_slots=2, cache_length=64, shared=config) as own:
        tokens, finish = own.submit(prompt, images, sampling=config).result(timeout=300)
        assert finish == "eos" and tokens == free_run[: free_run.index(eos)]
        assert (tokens, finish) == reference(engine, params, prompt, images, config)
        assert own.slots_in_use == 0


def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(setup, slots):
    """Every slot busy with long answers and one more waiting: cancelling one running
    request ends it as "cancelled" and the waiting one is admitted and answers."""
    _, _, params, engine = setup
    long = SamplingConfig(max_new_tokens=60, pad_token_id=PAD)
    running = [slots.submit(request(60 + i, 10, False)[0], sampling=long) for i in range(SLOTS)]
    waiting_prompt, _ = request(70, 10, with_image=False)
    waiting = slots.submit(waiting_prompt, sampling=GREEDY)
    next(iter(running[0]))  # decoding
    running[0].cancel()
    assert waiting.result(timeout=300) == reference(engine, params, waiting_prompt, None, GREEDY)
    assert running[0].result(timeout=300)[1] == "cancelled"
    assert len(running[0].tokens) < 60
    for handle in running[1:]:
        handle.cancel()
    deadline = time.time() + 60
    while slots.slots_in_use and time.time() < deadline:
        time.sleep(0.05)
    assert slots.slots_in_use == 0


def test_a_request_that_cannot_fit_is_refused_naming_the_limit(setup, slots):
    prompt, images = request(80, 40, with_image=True)  # bucket 64
    with pytest.raises(ValueError, match=r"need 104 cache slots, more than cache_length=96"):
        slots.submit(prompt, images, sampling=SamplingConfig(max_new_tokens=40))
    with pytest.raises(ValueError, match="eos_token_ids"):
        slots.submit(prompt, images, sampling=SamplingConfig(max_new_tokens=4, eos_token_ids=(2,)))


def test_a_slot_reused_after_a_longer_answer_forgets_it(setup):
    """One slot: a long answer, then a short prompt in the same row. The row's old keys
    beyond the new prompt are masked out, so the new request's positions and attention are
    its own: its (sampled, so position-sensitive) answer equals it alone."""
    _, _, params, engine = setup
    first, first_images = request(90, 30, with_image=True)
    second, _ = request(91, 6, with_image=False)
    hot = SamplingConfig(max_new_tokens=8, temperature=1.2, seed=5, pad_token_id=PAD)
    long = SamplingConfig(max_new_tokens=30, pad_token_id=PAD)
    with SlotEngine(engine, params, max_slots=1, cache_length=64, steps_per_round=5) as one:
        one.submit(first, first_images, sampling=long).result(timeout=300)
        tokens, finish = one.submit(second, sampling=hot).result(timeout=300)
        assert (tokens, finish) == reference(engine, params, second, None, hot)
        # The row holds this request's keys alone: its 6 prompt tokens and the 7 answer
        # tokens fed back (a tiny random model's tokens barely feel positions, so this
        # checks what they rest on: RoPE positions count the row's valid slots).
        assert int(np.asarray(one.state.cache["mask"]).sum()) == len(second) + len(tokens) - 1


def test_unscanned_layers_decode_in_slots_alike(setup, tmp_path):
    """Layers unscanned (one cache buffer a layer): two requests in slots, each equal to
    the engine alone."""
    model = setup[0]
    model.save_pretrained(tmp_path)
    config, params = load_hf(str(tmp_path), scan_layers=False)
    engine = Engine(config)
    cases = [request(100, 13, with_image=True), request(101, 8, with_image=False)]
    with SlotEngine(engine, params, max_slots=2, cache_length=64) as unscanned:
        handles = [unscanned.submit(p, images, sampling=GREEDY) for p, images in cases]
        for (prompt, images), handle in zip(cases, handles, strict=True):
            assert handle.result(timeout=300) == reference(engine, params, prompt, images, GREEDY)


class DigitTokenizer:
    """Token t -> its decimal digits and a space: stop strings can end inside a token."""

    def decode(self, token_ids):
        return "".join(f"{t} " for t in token_ids)


def test_a_stop_string_ends_the_answer_as_the_engine_does(setup):
    """A stop string the greedy answer completes mid-way (ending inside a token): the
    same tokens and finish as `Engine.generate`, and the slot is free at once."""
    _, config, params, _ = setup
    engine = Engine(config, tokenizer=DigitTokenizer())
    prompt, images = request(110, 15, with_image=True)
    free_run = reference(engine, params, prompt, images, GREEDY)[0]
    stop = f"{free_run[3]} {str(free_run[4])[0]}"  # token 3, then the start of token 4
    config = SamplingConfig(max_new_tokens=12, stop_strings=(stop,), pad_token_id=PAD)
    with SlotEngine(engine, params, max_slots=2, cache_length=64) as own:
        tokens, finish = own.submit(prompt, images, sampling=config).result(timeout=300)
        assert (tokens, finish) == reference(engine, params, prompt, images, config)
        assert finish == "stop" and tokens == free_run[:5]
        assert own.slots_in_use == 0


def test_a_prompt_prefilled_in_chunks_answers_as_whole(setup):
    """Prompts of 1, 2, 3 and 4 chunks of 16 tokens (with and without an image; the first
    two of one bucket, prefilled from different starts): the same answers as
    `Engine.generate`, which prefills each whole."""
    _, _, params, engine = setup
    cases = [request(122, 60, True), request(123, 40, False)]
    cases += [request(120, 10, True), request(121, 27, False)]
    with SlotEngine(engine, params, max_slots=2, cache_length=96, prefill_chunk=16) as chunked:
        handles = [chunked.submit(p, images, sampling=GREEDY) for p, images in cases]
        for (prompt, images), handle in zip(cases, handles, strict=True):
            assert handle.result(timeout=300) == reference(engine, params, prompt, images, GREEDY)


def test_a_long_prompt_is_prefilled_between_the_running_answers_steps(setup):
    """One decode step a round: while a 64-token prompt is prefilled 16 tokens a round, the
    running answer gets a token every round (at least 3 before the long one's first);
    prefilled whole, the long prompt takes one round."""
    _, _, params, engine = setup
    runner, _ = request(130, 10, with_image=False)
    long_prompt, long_images = request(131, 60, with_image=True)
    running_config = SamplingConfig(max_new_tokens=40, pad_token_id=PAD)

    def tokens_meanwhile(chunk: int, budget: int = 0) -> int:
        events: list[str] = []
        with SlotEngine(
            engine,
            params,
            max_slots=2,
            cache_length=96,
            steps_per_round=1,
            prefill_chunk=chunk,
            prefill_budget=budget,
        ) as slots:
            running = slots.submit(
                runner, sampling=running_config, listener=lambda t, f: events.append("run")
            )
            while not running.tokens:
                time.sleep(0.01)
            events.append("submitted")
            slots.submit(
                long_prompt,
                long_images,
                sampling=GREEDY,
                listener=lambda t, f: events.append("long" if t else "end"),
            )
            running.result(timeout=300)
            while "end" not in events:
                time.sleep(0.01)
        after = events[events.index("submitted") :]
        return after[: after.index("long")].count("run")

    assert tokens_meanwhile(16) >= 3
    assert tokens_meanwhile(0) <= 2
    assert tokens_meanwhile(16, budget=64) <= 2  # four chunks a round: the prompt in one


def test_the_prefill_budget_goes_to_the_earliest_prompt_first(setup):
    """One chunk of 16 a round while an answer decodes, two 60-token prompts admitted
    together: the first is prefilled to its end (4 rounds) before the second starts, so it
    answers at least 3 rounds earlier; both answers equal `Engine.generate`'s."""
    _, _, params, engine = setup
    runner, _ = request(135, 10, with_image=False)
    prompts = [request(136 + i, 60, with_image=i == 0) for i in range(2)]
    events: list[str] = []
    with SlotEngine(
        engine, params, max_slots=3, cache_length=96, steps_per_round=1, prefill_chunk=16
    ) as slots:
        running = slots.submit(
            runner,
            sampling=SamplingConfig(max_new_tokens=40, pad_token_id=PAD),
            listener=lambda t, f: events.append("run"),
        )
        while not running.tokens:
            time.sleep(0.01)
        with slots._wake:  # both waiting when the next round admits them
            handles = [
                slots.submit(
                    p, images, sampling=GREEDY, listener=lambda t, f, i=i: events.append(f"{i}")
                )
                for i, (p, images) in enumerate(prompts)
            ]
        for (prompt, images), handle in zip(prompts, handles, strict=True):
            assert handle.result(timeout=300) == reference(engine, params, prompt, images, GREEDY)
        running.result(timeout=300)
    first, second = events.index("0"), events.index("1")
    assert events[first:second].count("run") >= 3


def test_the_image_cache_keeps_answers_and_skips_the_vision_tower(setup):
    """Three questions on each of two images, image cache on: each image is encoded once
    (2 misses, 4 hits) and every answer equals `Engine.generate` (the cache off too)."""
    _, _, params, engine = setup
    rng = np.random.default_rng(140)
    pictures = [rng.standard_normal((1, 1, 1, 28, 28, 3)).astype(np.float32) for _ in range(2)]
    cases = [(request(141 + q, 12 + 4 * q, with_image=True)[0], pictures[q % 2]) for q in range(6)]
    for cache in (1 << 20, 0):
        with SlotEngine(
            engine, params, max_slots=2, cache_length=64, image_cache_bytes=cache
        ) as slots:
            handles = [slots.submit(p, images, sampling=GREEDY) for p, images in cases]
            for (prompt, images), handle in zip(cases, handles, strict=True):
                assert handle.result(timeout=300) == reference(
                    engine, params, prompt, images, GREEDY
                )
            if cache:
                assert (slots.image_cache.misses, slots.image_cache.hits) == (2, 4)
            else:
                assert slots.image_cache is None


def test_the_image_cache_with_tiled_images(tmp_path):
    """LLaVA-NeXT images (tiles, a layout, features that may not exist): two questions on
    each of two images of other sizes, from the cache, answer as `Engine.generate`."""
    from test_llava_next import CONFIGS, PATCH, TILE, next_config, next_model, random_images

    from llava_jax.data.image import CLIP_MEAN, CLIP_STD
    from llava_jax.data.image_tiles import ImageTiler

    pinpoints, feature_layer, sizes = CONFIGS["wide-and-tall"]
    next_model(next_config(pinpoints, feature_layer), seed=2).save_pretrained(tmp_path)
    config, params = load_hf(str(tmp_path))
    engine, tiler = Engine(config), ImageTiler(tile=TILE, patch=PATCH, pinpoints=pinpoints)
    rng = np.random.default_rng(150)
    cases = []
    for q, image in enumerate(random_images(sizes[:2], seed=151) * 2):
        tiles, layout, count = tiler.encode(image, CLIP_MEAN, CLIP_STD)
        prompt = np.concatenate([[1], np.full(count, IMAGE_TOKEN), rng.integers(3, 90, 3 + q)])
        cases.append((prompt.astype(np.int32), tiles[None, None], layout[None, None]))
    with SlotEngine(engine, params, max_slots=2, cache_length=128, image_cache_bytes=1 << 20) as s:
        handles = [
            s.submit(p, tiles, sampling=GREEDY, image_layout=layout) for p, tiles, layout in cases
        ]
        for (prompt, tiles, layout), handle in zip(cases, handles, strict=True):
            expected = engine.generate(
                params, [prompt], tiles, None, GREEDY, image_layout=layout
            ).tokens[0]
            assert handle.result(timeout=300)[0] == expected.tolist()
        assert (s.image_cache.misses, s.image_cache.hits) == (2, 2)


def test_the_lru_cache_keeps_its_bound_and_drops_the_least_recently_used():
    from llava_jax.inference.lru_cache import LRUCache

    cache = LRUCache(100)
    cache.put("a", 1, 40)
    cache.put("b", 2, 40)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3, 40)  # 120 > 100: b, the least recently used, goes
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert cache.bytes == 80 and len(cache) == 2
    cache.put("huge", 4, 101)  # larger than the bound: not kept, nothing dropped
    assert cache.get("huge") is None and len(cache) == 2
    assert (cache.hits, cache.misses) == (3, 2)


def shared_start(rng):
    """A prompt start of 35 tokens (bos, an image's tokens, random text: two whole blocks of
    16) and its image, as `submit` takes it."""
    per_image = image_tokens_per_image(tiny_hf_config())
    shared = np.concatenate(
        [[1], np.full(per_image, IMAGE_TOKEN), rng.integers(2, IMAGE_TOKEN, 35 - 1 - per_image)]
    ).astype(np.int32)
    return shared, rng.standard_normal((1, 1, 1, 28, 28, 3)).astype(np.float32)


def test_the_prefix_cache_reuses_a_shared_start_and_keeps_answers(setup):
    """Questions that start the same way (an image and 31 shared tokens: two blocks of 16)
    and end differently: from the second on, both blocks come from the prefix cache, and
    every answer equals `Engine.generate`'s. The same tokens about another image reuse
    nothing (a block's key holds the images it shows)."""
    _, _, params, engine = setup
    rng = np.random.default_rng(160)
    shared, picture = shared_start(rng)
    other = rng.standard_normal((1, 1, 1, 28, 28, 3)).astype(np.float32)
    suffixes = [rng.integers(2, IMAGE_TOKEN, n).astype(np.int32) for n in (6, 13, 21)]
    with SlotEngine(
        engine, params, max_slots=2, cache_length=96, prefill_chunk=16, prefix_cache_bytes=1 << 22
    ) as slots:
        hits = []
        for images, suffix in [(picture, s) for s in suffixes] + [(other, suffixes[0])]:
            prompt = np.concatenate([shared, suffix])
            before = slots.prefix_cache.hits
            answer = slots.submit(prompt, images, sampling=GREEDY).result(timeout=300)
            assert answer == reference(engine, params, prompt, images, GREEDY)
            hits.append(slots.prefix_cache.hits - before)
        assert hits == [0, 2, 2, 0]


def test_prompts_admitted_together_prefill_a_shared_start_once(setup):
    """Three questions about one image, admitted in the same round: the first prefills the
    shared start (two blocks of 16) and keeps it; the others, looked up when their turn to
    prefill comes, reuse both blocks (at admission nothing was kept yet). Answers equal
    `Engine.generate`'s."""
    _, _, params, engine = setup
    rng = np.random.default_rng(161)
    shared, picture = shared_start(rng)
    prompts = [np.concatenate([shared, rng.integers(2, IMAGE_TOKEN, n)]) for n in (6, 13, 21)]
    with SlotEngine(
        engine, params, max_slots=3, cache_length=96, prefill_chunk=16, prefix_cache_bytes=1 << 22
    ) as slots:
        with slots._wake:  # held: the scheduler admits all three in one round
            handles = [slots.submit(p.astype(np.int32), picture, sampling=GREEDY) for p in prompts]
        for prompt, handle in zip(prompts, handles, strict=True):
            expected = reference(engine, params, prompt.astype(np.int32), picture, GREEDY)
            assert handle.result(timeout=300) == expected
        # Hits: two blocks each for the second and third; misses: the first's first block,
        # and the third's third block (its own tokens, kept by no one).
        assert (slots.prefix_cache.hits, slots.prefix_cache.misses) == (4, 2)


def test_the_kv_budget_sets_the_slots_and_their_length(setup):
    """A token's bytes equal what the slot state's cache holds per token; a budget holds
    as many slots of a given length as fit, or `max_slots` of the longest length that fits
    (a multiple of 16); too small a budget is refused naming it."""
    import jax

    from llava_jax.inference.kv_budget import kv_bytes_per_token, slot_layout

    _, config, params, engine = setup
    per_token = kv_bytes_per_token(config, engine.cache_dtype)
    with SlotEngine(engine, params, max_slots=3, cache_length=40) as slots:
        cache = slots.state.cache
        held = sum(leaf.nbytes for leaf in jax.tree.leaves((cache["k"], cache["v"])))
    assert per_token == held // (3 * 40)
    assert slot_layout(per_token, per_token * 300, 8, 100, 256) == (3, 100)
    assert slot_layout(per_token, per_token * 300, 8, 0, 256) == (8, 32)  # 37 -> 32
    assert slot_layout(per_token, per_token * 10_000, 2, 0, 256) == (2, 256)  # the context
    with pytest.raises(ValueError, match=f"budget of {per_token * 50} bytes.*100 tokens"):
        slot_layout(per_token, per_token * 50, 8, 100, 256)


def test_slots_on_a_mesh_answer_as_on_one_device(setup):
    """A (2, 2, 2) mesh: the decode state's slots split over the data axes and its kv heads
    over `tensor`; requests with and without images, prefilled in chunks through both
    caches, queued behind full slots: every greedy answer equals `Engine.generate` on one
    device. A slot count the data axes do not divide is refused."""
    from llava_jax.inference.kv_budget import kv_bytes_per_token, kv_split, slot_layout
    from llava_jax.sharding import device_bytes, make_mesh

    _, config, params, engine = setup
    mesh = make_mesh((2, 2, 2))
    on_mesh = Engine(config, mesh=mesh)
    with pytest.raises(ValueError, match="max_slots=3 must be a multiple of .* size 4"):
        SlotEngine(on_mesh, params, max_slots=3, cache_length=64)
    cases = [request(170 + i, 9 + 11 * i, with_image=i % 2 == 0) for i in range(6)]
    with SlotEngine(
        on_mesh,
        params,
        max_slots=4,
        cache_length=96,
        prefill_chunk=16,
        image_cache_bytes=1 << 20,
        prefix_cache_bytes=1 << 22,
    ) as slots:
        keys = slots.state.cache["k"]
        assert tuple(keys.sharding.spec)[:3] == (None, ("data", "fsdp"), "tensor")
        # A device's budget: what one device holds of the slots' keys and values (a data
        # shard's slot, half its kv heads); a byte less holds no slot in every data shard.
        # The state holds 64 of its 96 cache slots until a row needs more.
        per_device = device_bytes((slots.state.cache["k"], slots.state.cache["v"]))
        per_token = kv_bytes_per_token(config, on_mesh.cache_dtype)
        assert slots.state.cache["mask"].shape[1] == 64
        assert per_device * 4 * 2 == 4 * 64 * per_token and kv_split(config, mesh) == (4, 2)
        full = per_device * 96 // 64
        assert slot_layout(per_token, full * 8, 8, 96, 256, slot_multiple=4) == (4, 96)
        with pytest.raises(ValueError, match="does not hold 4 slots .one a data shard. of 96"):
            slot_layout(per_token, full * 8 - 1, 8, 96, 256, slot_multiple=4)
        assert not slots.params["llm"]["layers"]["attn"]["query"][
            "kernel"
        ].sharding.is_fully_replicated
        handles = [slots.submit(p, images, sampling=GREEDY) for p, images in cases]
        for (prompt, images), handle in zip(cases, handles, strict=True):
            assert handle.result(timeout=300) == reference(engine, params, prompt, images, GREEDY)
        keys = slots.state.cache["k"]  # grown to the longest rows, split as before
        assert keys.shape[-1] == 96
        assert tuple(keys.sharding.spec)[:3] == (None, ("data", "fsdp"), "tensor")
        prompt, images = cases[4][0][:-3], cases[4][1]  # its image and first 3 blocks again
        answer = slots.submit(prompt, images, sampling=GREEDY).result(timeout=300)
        assert answer == reference(engine, params, prompt, images, GREEDY)
        assert slots.image_cache.hits == 1 and slots.prefix_cache.hits == 3


def test_the_state_grows_and_shrinks_with_its_rows_alike(setup):
    """A cache of 256 slots (granule 64): the state starts at 64 cache slots and grows as
    rows need more. Two slots: a long answer in one; in the other a 60-token answer, then a
    50-token one that is still decoding when the long one ends, so the state shrinks under
    it (its keys kept) and grows again. Every answer equals `Engine.generate`'s."""
    _, _, params, engine = setup
    cases = [request(180 + i, length, with_image=False) for i, length in enumerate((20, 9, 12))]
    configs = [SamplingConfig(max_new_tokens=n, pad_token_id=PAD) for n in (100, 60, 50)]
    with SlotEngine(engine, params, max_slots=2, cache_length=256, steps_per_round=8) as slots:
        assert (slots._granule, slots.state.cache["mask"].shape[1]) == (64, 64)
        lengths = []
        resize = slots._resize

        def recorded(state, *, length):
            lengths.append(length)
            return resize(state, length=length)

        slots._resize = recorded
        handles = [
            slots.submit(p, images, sampling=c)
            for (p, images), c in zip(cases, configs, strict=True)
        ]
        for (prompt, images), config, handle in zip(cases, configs, handles, strict=True):
            assert handle.result(timeout=300) == reference(engine, params, prompt, images, config)
        # The long answer (a 32-slot bucket and 100 tokens) took the state to 192 slots; the
        # last answer, at about 60 slots when it ended, shrank it to 64, then grew it again.
        assert lengths[: lengths.index(192) + 1] == [128, 192], lengths
        assert lengths[lengths.index(192) :] == [192, 64, 128], lengths
