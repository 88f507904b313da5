"""Generation with the KV cache: parity with transformers' `generate`, cached logits equal a
full forward pass, sampling, stopping, streaming, compilation reuse, sharding, errors."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import IMAGE_TOKEN, image_tokens_per_image, tiny_hf_config, tiny_hf_model
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llava_jax.convert import load_hf
from llava_jax.inference import Engine, SamplingConfig, filter_logits
from llava_jax.inference.sampling import SamplingParams, draw_by_uniform, select_tokens
from llava_jax.models.llama import init_cache
from llava_jax.models.llava import Llava
from llava_jax.sharding import make_mesh

PAD = 0
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=50000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
MODELS = {
    "gqa_default_select": dict(),
    "mha_tied_full_select_last_layer": dict(
        text=dict(num_key_value_heads=6, tie_word_embeddings=True),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    ),
    "llama3_rope_layer_list_biases": dict(
        text=dict(rope_parameters=LLAMA3_ROPE, head_dim=12, attention_bias=True, mlp_bias=True),
        vision_feature_layer=[0, -2],
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (hf config, hf model, our config, our params); built lazily, once each."""
    cache = {}

    def get(name):
        if name not in cache:
            hf_config = tiny_hf_config(**MODELS[name])
            model = tiny_hf_model(hf_config, seed=len(cache))
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            config, params = load_hf(str(directory))
            cache[name] = (hf_config, model, config, params)
        return cache[name]

    return get


class Bound:
    """An engine and parameters placed once: each call passes them, as a caller with the
    parameters of a run or a loaded model does."""

    def __init__(self, engine, params):
        self.engine, self.params = engine, engine.place(params)

    def generate(self, *args, **kwargs):
        return self.engine.generate(self.params, *args, **kwargs)

    def stream(self, *args, **kwargs):
        return self.engine.stream(self.params, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def Generator(config, params, **kwargs):  # noqa: N802 - reads like the engine it binds
    return Bound(Engine(config, **kwargs), params)


@pytest.fixture(scope="module")
def generator(models):
    """An engine of the first model, shared so its compilations are reused across tests."""
    _, _, config, params = models("gqa_default_select")
    return Generator(config, params, tokenizer=DigitTokenizer())


class DigitTokenizer:
    """Token t -> its decimal digits and a space: stop strings can end inside a token."""

    def decode(self, token_ids):
        return "".join(f"{t} " for t in token_ids)


def make_prompts(hf_config, lengths, images_per_row, seed=0):
    """Random prompts (no pad token, no image token) with `per_image` image tokens per image,
    and images float32[B, I, 1, H, W, 3] (one tile each) with image_mask bool[B, I]."""
    rng = np.random.default_rng(seed)
    per_image = image_tokens_per_image(hf_config)
    prompts = []
    for length, count in zip(lengths, images_per_row, strict=True):
        prompt = rng.integers(1, IMAGE_TOKEN, length).astype(np.int32)
        for k in range(count):
            start = 1 + k * (per_image + 2)
            prompt[start : start + per_image] = IMAGE_TOKEN
        prompts.append(prompt)
    vision = hf_config.vision_config
    max_images = max(max(images_per_row), 1)
    size = vision.image_size
    images = rng.standard_normal((len(lengths), max_images, 1, size, size, 3)).astype(np.float32)
    image_mask = np.arange(max_images)[None, :] < np.asarray(images_per_row)[:, None]
    return prompts, images, image_mask


def left_pad(prompts, length=None):
    length = length or max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), PAD, np.int64)
    mask = np.zeros((len(prompts), length), np.int64)
    for b, p in enumerate(prompts):
        ids[b, length - len(p) :] = p
        mask[b, length - len(p) :] = 1
    return ids, mask


def hf_greedy(model, prompts, images, image_mask, max_new_tokens):
    """transformers' greedy `generate` on the left-padded batch -> int64[B, max_new_tokens]."""
    ids, mask = left_pad(prompts)
    valid = images[image_mask][:, 0]  # each image's one tile
    pixel_values = torch.tensor(valid.transpose(0, 3, 1, 2)) if len(valid) else None
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # never stop early: compare every token
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            pixel_values=pixel_values,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            suppress_tokens=[IMAGE_TOKEN],  # as our default suppress_image_token=True
        )
    return out[:, ids.shape[1] :].numpy()


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_equals_transformers_generate(models, name):
    hf_config, model, config, params = models(name)
    prompts, images, image_mask = make_prompts(hf_config, [19, 11, 30], [1, 0, 2], seed=1)
    steps = 12
    result = Generator(config, params).generate(
        prompts, images, image_mask, SamplingConfig(max_new_tokens=steps)
    )
    expected = hf_greedy(model, prompts, images, image_mask, steps)
    assert result.finish_reasons == ["length"] * 3
    np.testing.assert_array_equal(np.stack(result.tokens), expected)
    np.testing.assert_array_equal(result.padded_tokens, expected)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_model_trained_with_remat_generates_in_either_layout(models, scan_layers):
    """A training config's `remat_policy` (every 7B recipe has one) is nothing to generation:
    greedy tokens equal transformers' with the layers stacked or one tree per layer (a bug:
    the unscanned, rematerialised layers traced the per-layer cache's static index)."""
    from llava_jax.models.llava import to_unscanned_layout

    hf_config, model, config, params = models("gqa_default_select")
    if not scan_layers:
        params = to_unscanned_layout(params, config)
    config = config.replace(remat_policy="full", scan_layers=scan_layers)
    prompts, images, image_mask = make_prompts(hf_config, [9, 14], [1, 0], seed=2)
    result = Generator(config, params).generate(
        prompts, images, image_mask, SamplingConfig(max_new_tokens=4)
    )
    np.testing.assert_array_equal(
        np.stack(result.tokens), hf_greedy(model, prompts, images, image_mask, 4)
    )


def test_cached_logits_equal_a_full_forward_pass(models, generator):
    hf_config, _, config, params = models("gqa_default_select")
    prompts, images, image_mask = make_prompts(hf_config, [9, 21], [1, 1], seed=2)
    steps = 10
    result = generator.generate(
        prompts, images, image_mask, SamplingConfig(max_new_tokens=steps), return_logits=True
    )
    # Prompt + generated tokens, left-padded to their own length (not the bucket), positions
    # counting the real tokens, as transformers' generate runs them.
    sequences = [np.concatenate([p, t]) for p, t in zip(prompts, result.tokens, strict=True)]
    ids, mask = left_pad(sequences)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full = Llava(config).apply(
        {"params": params},
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(images),
        jnp.asarray(image_mask),
        jnp.asarray(mask, jnp.int32),
        jnp.asarray(positions, jnp.int32),
    )
    full = np.asarray(full)
    for b, prompt in enumerate(prompts):
        start = ids.shape[1] - steps - 1  # the position that predicts the first new token
        expected = full[b, start : start + steps]
        assert len(prompt) + steps == mask[b].sum()
        assert result.logits[b].shape == expected.shape
        assert np.abs(result.logits[b] - expected).max() <= 1e-4
        # Greedy picks the argmax (never the image token), and logprobs are the log-softmax
        # of those logits.
        allowed = np.where(np.arange(expected.shape[-1]) == IMAGE_TOKEN, -np.inf, expected)
        np.testing.assert_array_equal(result.tokens[b], allowed.argmax(-1))
        log_softmax = np.asarray(jax.nn.log_softmax(expected, axis=-1))
        picked = np.take_along_axis(log_softmax, result.tokens[b][:, None], axis=1)[:, 0]
        np.testing.assert_allclose(result.logprobs[b], picked, atol=1e-5)


def text_prompts(generator, lengths=(7, 12), seed=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, IMAGE_TOKEN, n).astype(np.int32) for n in lengths]


def test_sampling_seed_top_k_top_p_temperature(generator):
    prompts = text_prompts(generator)
    steps = 16
    greedy = np.stack(generator.generate(prompts, sampling=SamplingConfig(steps)).tokens)

    def sample(**kw):
        config = SamplingConfig(max_new_tokens=steps, **kw)
        return np.stack(generator.generate(prompts, sampling=config).tokens)

    a = sample(temperature=1.0, seed=1)
    traces = dict(generator.trace_counts)
    np.testing.assert_array_equal(a, sample(temperature=1.0, seed=1))
    assert (a != sample(temperature=1.0, seed=2)).any()
    assert (a != greedy).any()
    np.testing.assert_array_equal(sample(temperature=1.0, top_k=1, seed=4), greedy)
    np.testing.assert_array_equal(sample(temperature=1.0, top_p=1e-6, seed=5), greedy)
    np.testing.assert_array_equal(sample(temperature=1e-4, seed=6), greedy)
    # Temperature, top-k, top-p and the seed are traced values: no new program.
    assert dict(generator.trace_counts) == traces


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.5, 10, 0.6)]
)
def test_filter_logits_equals_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32) * 3
    ours = np.asarray(
        filter_logits(
            jnp.asarray(logits), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)
        )
    )
    scores = torch.tensor(logits)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    theirs = scores.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    kept = ~np.isinf(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)


def test_argmax_last_is_numpy_s_argmax_with_ties_infinities_and_nans():
    """The greedy token: numpy's argmax (the first of equal maxima, a NaN's index where a
    row has one) on random rows, ties, -inf rows and NaNs, at a vocabulary's width."""
    from llava_jax.inference.sampling import argmax_last

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 32000)).astype(np.float32)
    logits[1, [7, 31999, 400]] = 50.0  # a tie: the first wins
    logits[2] = -np.inf
    logits[3, 123] = np.nan
    logits[4, 31999] = np.inf
    logits[5] = rng.integers(0, 3, 32000)  # many ties
    np.testing.assert_array_equal(np.asarray(argmax_last(jnp.asarray(logits))), logits.argmax(-1))


def sampling_params(temperature, top_k, top_p, seed, suppress=None) -> SamplingParams:
    """Traced sampling settings for `select_tokens` alone: no eos, no stop sequences, one
    token at most; `suppress`: a token never drawn."""
    return SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        pad=jnp.int32(0),
        max_new=jnp.int32(1),
        eos=jnp.zeros(4, jnp.int32),
        eos_valid=jnp.zeros(4, bool),
        stop=jnp.zeros((4, 1), jnp.int32),
        stop_valid=jnp.zeros((4, 1), bool),
        suppress=jnp.int32(suppress or 0),
        suppress_valid=jnp.bool_(suppress is not None),
    )


def test_sampled_frequencies_follow_the_tempered_distribution():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    temperature = 0.5
    sampling = sampling_params(
        jnp.float32(temperature), jnp.int32(0), jnp.float32(1.0), jnp.uint32(0)
    )
    rows = jnp.broadcast_to(logits, (20000, 4))  # one draw per row
    draws = select_tokens(rows, sampling, jnp.int32(3), greedy=False)
    frequencies = np.bincount(np.asarray(draws), minlength=4) / len(draws)
    expected = np.asarray(jax.nn.softmax(logits[0] / temperature))
    np.testing.assert_allclose(frequencies, expected, atol=0.015)


def test_draw_by_uniform_is_the_inverse_of_the_running_probability():
    """Each uniform picks the token numpy's searchsorted finds in the float64 running
    probability: across block edges (1000 tokens: 7 blocks of 128 and a part), at 0, just
    below 1, and with tokens of probability 0 (`-inf`) never picked, nor padding."""
    rng = np.random.default_rng(0)
    vocab = 1000
    logits = rng.normal(0, 2, (6, vocab)).astype(np.float32)
    logits[1, ::3] = -np.inf  # every third token impossible
    logits[2, :] = -np.inf
    logits[2, [5, 130, 999]] = [0.0, 1.0, 2.0]  # three tokens, in three blocks
    logits[3, 900:] = -np.inf  # the last blocks empty: a uniform near 1 stays below them
    probs = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    running = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
    for uniforms in (
        rng.random(6),
        np.zeros(6),
        np.full(6, 1 - 2**-24),
        running[np.arange(6), rng.integers(0, vocab, 6)] - 1e-4,  # just before a token's end
    ):
        drawn = np.asarray(draw_by_uniform(jnp.asarray(logits), jnp.asarray(uniforms, jnp.float32)))
        expected = [
            min(np.searchsorted(running[b], u, side="right"), np.flatnonzero(probs[b])[-1])
            for b, u in enumerate(uniforms)
        ]
        np.testing.assert_array_equal(drawn, expected)
        assert np.all(np.isfinite(logits[np.arange(6), drawn]))


@pytest.mark.parametrize("with_top_k", [False, True], ids=["scaled", "filtered"])
def test_sampled_frequencies_follow_the_distribution_per_row_keys(with_top_k):
    """Per-row seeds over a vocabulary of several blocks (300 tokens): each row's draws over
    many steps follow its own tempered (and, with a top-k row, filtered) distribution."""
    rng = np.random.default_rng(1)
    vocab, rows, steps = 300, 4, 4000
    logits = rng.normal(0, 1.5, (rows, vocab)).astype(np.float32)
    temperature = np.asarray([0.7, 1.0, 1.3, 1.0], np.float32)
    top_k = np.asarray([0, 0, 0, 5 if with_top_k else 0], np.int32)
    seeds = jnp.arange(rows, dtype=jnp.uint32) + 11
    sampling = sampling_params(
        jnp.asarray(temperature), jnp.asarray(top_k), jnp.ones(rows), seeds, suppress=7
    )
    draw = jax.jit(
        jax.vmap(lambda step: select_tokens(jnp.asarray(logits), sampling, step, greedy=False))
    )
    each_step = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32)[:, None], (steps, rows))
    draws = np.asarray(draw(each_step))
    for row in range(rows):
        scaled = logits[row].astype(np.float64) / temperature[row]
        scaled[7] = -np.inf  # the suppressed token
        if top_k[row]:
            scaled[scaled < np.sort(scaled)[-top_k[row]]] = -np.inf
        expected = np.exp(scaled - scaled.max())
        expected /= expected.sum()
        frequencies = np.bincount(draws[:, row], minlength=vocab) / steps
        assert frequencies[expected == 0].sum() == 0, f"row {row} drew an impossible token"
        # Total variation distance, 0.5 * sum |f - p|: 0.05-0.09 from 4000 draws over 300
        # tokens; 0.17-0.28 between these rows' tempered and untempered distributions.
        assert 0.5 * np.abs(frequencies - expected).sum() < 0.15, f"row {row}"
        top = np.argsort(expected)[-3:]
        np.testing.assert_allclose(frequencies[top], expected[top], atol=0.03)


def test_eos_stops_each_row_on_its_own(generator):
    prompts = text_prompts(generator)
    steps = 16
    free = generator.generate(prompts, sampling=SamplingConfig(steps)).tokens
    # An eos that row 0 emits at step >= 1 and row 1 never does.
    candidates = [t for t in free[0][1:] if t not in free[1] and t not in free[0][:1]]
    assert candidates, "pick other prompts: row 0 has no token row 1 lacks"
    eos = int(candidates[0])
    stop = int(np.flatnonzero(free[0] == eos)[0])
    result = generator.generate(prompts, sampling=SamplingConfig(steps, eos_token_ids=(eos,)))
    assert result.finish_reasons == ["eos", "length"]
    np.testing.assert_array_equal(result.tokens[0], free[0][:stop])
    np.testing.assert_array_equal(result.tokens[1], free[1])
    # On device the row wrote its eos, then pad while the other row went on.
    expected_row = np.full(steps, PAD)
    expected_row[: stop + 1] = free[0][: stop + 1]
    np.testing.assert_array_equal(result.padded_tokens[0], expected_row)

    # Several eos ids: each row stops at the first of any of them.
    other = int(free[1][2])
    both = generator.generate(
        prompts, sampling=SamplingConfig(steps, eos_token_ids=(eos, other), pad_token_id=3)
    )
    assert both.finish_reasons == ["eos", "eos"]
    for b in range(2):
        first = min(i for i, t in enumerate(free[b]) if t in (eos, other))
        np.testing.assert_array_equal(both.tokens[b], free[b][:first])
        assert (both.padded_tokens[b, first + 1 :] == 3).all()


def test_stop_token_sequences_on_device(generator):
    prompts = text_prompts(generator)
    steps = 16
    free = generator.generate(prompts, sampling=SamplingConfig(steps)).tokens
    sequence = tuple(int(t) for t in free[0][2:4])
    result = generator.generate(
        prompts, sampling=SamplingConfig(steps, stop_token_sequences=(sequence,))
    )
    for b in range(2):
        ends = [i + 2 for i in range(steps - 1) if tuple(free[b][i : i + 2]) == sequence]
        if ends:
            assert result.finish_reasons[b] == "stop"
            np.testing.assert_array_equal(result.tokens[b], free[b][: ends[0]])
        else:
            assert result.finish_reasons[b] == "length"
            np.testing.assert_array_equal(result.tokens[b], free[b])
    assert result.finish_reasons[0] == "stop"


def test_stop_strings_cut_tokens_and_text(generator):
    prompts = text_prompts(generator)
    steps = 24
    tokenizer = generator.tokenizer
    free = generator.generate(prompts, sampling=SamplingConfig(steps)).tokens
    text = tokenizer.decode(free[0].tolist())
    # A stop string that starts inside token 2's digits and ends inside a later token's.
    start = len(tokenizer.decode(free[0][:2].tolist())) + 1
    stop = text[start : start + 4]
    result = generator.generate(prompts, sampling=SamplingConfig(steps, stop_strings=(stop,)))
    for b in range(2):
        full_text = tokenizer.decode(free[b].tolist())
        if stop not in full_text:
            assert result.finish_reasons[b] == "length"
            np.testing.assert_array_equal(result.tokens[b], free[b])
            assert result.texts[b] == full_text
            continue
        shortest = next(
            k for k in range(1, steps + 1) if stop in tokenizer.decode(free[b][:k].tolist())
        )
        assert result.finish_reasons[b] == "stop"
        np.testing.assert_array_equal(result.tokens[b], free[b][:shortest])
        assert result.texts[b] == full_text[: full_text.index(stop)]
    assert result.finish_reasons[0] == "stop"


def test_stream_yields_the_generated_tokens_without_recompiling(generator):
    prompts = text_prompts(generator)
    sampling = SamplingConfig(max_new_tokens=13, temperature=0.8, seed=7)
    expected = generator.generate(prompts, sampling=sampling)
    before = dict(generator.trace_counts)
    stream = generator.stream(prompts, sampling=sampling, chunk_size=3)
    chunks = list(stream)
    result = stream.result
    assert len(chunks) == 5  # token 1 from the prefill, then 3 per chunk: 1+3+3+3+3 = 13
    for b in range(2):
        streamed = np.concatenate([chunk[b] for chunk in chunks])
        np.testing.assert_array_equal(streamed, expected.tokens[b])
        np.testing.assert_array_equal(result.tokens[b], expected.tokens[b])
    assert dict(generator.trace_counts) == before


def test_one_compilation_serves_prompt_lengths_in_a_bucket(models):
    _, _, config, params = models("gqa_default_select")
    generator = Generator(config, params)
    rng = np.random.default_rng(4)
    sampling = SamplingConfig(max_new_tokens=5)
    generator.generate([rng.integers(1, 90, 9), rng.integers(1, 90, 3)], sampling=sampling)
    assert generator.trace_counts == {"prefill": 1, "decode": 1}
    # Other lengths (and batch contents, and max_new_tokens) within the same buckets.
    generator.generate(
        [rng.integers(1, 90, 14), rng.integers(1, 90, 16)], sampling=SamplingConfig(11)
    )
    assert generator.trace_counts == {"prefill": 1, "decode": 1}
    # A longer prompt goes to the next bucket: one more prefill and decode program.
    generator.generate([rng.integers(1, 90, 20), rng.integers(1, 90, 5)], sampling=sampling)
    assert generator.trace_counts == {"prefill": 2, "decode": 2}


def test_prompt_longer_than_the_context_is_an_error(generator):
    context = generator.config.text.max_position_embeddings
    too_long = np.ones(context + 1, np.int32)
    with pytest.raises(ValueError, match=rf"{context + 1} tokens.*context of {context}"):
        generator.generate([np.ones(4, np.int32), too_long], sampling=SamplingConfig(4))
    with pytest.raises(ValueError, match=rf"needs {context + 2} positions.*context of {context}"):
        generator.generate([np.ones(context - 2, np.int32)], sampling=SamplingConfig(4))


def test_prompt_and_images_must_agree(generator, models):
    hf_config = models("gqa_default_select")[0]
    prompts, images, image_mask = make_prompts(hf_config, [10, 10], [1, 0])
    with pytest.raises(ValueError, match="prompt 1 has 0 image tokens but its 1 image"):
        generator.generate(prompts, images, np.ones_like(image_mask), SamplingConfig(2))


def test_sharded_generation_equals_unsharded(models):
    hf_config, _, config, params = models("gqa_default_select")
    prompts, images, image_mask = make_prompts(hf_config, [12, 7, 15], [1, 0, 1], seed=6)
    sampling = SamplingConfig(max_new_tokens=8)
    mesh = make_mesh((2, 2, 2))  # data-parallel size 4 > 3 prompts: the batch gets a filler
    sharded = Generator(config, params, mesh=mesh)
    result = sharded.generate(prompts, images, image_mask, sampling)
    kernel = sharded.params["llm"]["layers"]["attn"]["query"]["kernel"]
    assert not kernel.sharding.is_fully_replicated
    expected = Generator(config, params).generate(prompts, images, image_mask, sampling)
    assert len(result.tokens) == 3
    for ours, reference in zip(result.tokens, expected.tokens, strict=True):
        np.testing.assert_array_equal(ours, reference)


def test_inference_package_does_not_import_torch():
    code = "import sys, llava_jax.inference; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["gqa_default_select", "mha_tied_full_select_last_layer"])
def test_prefill_computes_the_lm_head_on_the_last_position_only(models, name):
    """`last_position_only` narrows the (untied or tied) LM head to the last position, and
    those logits equal the last position of the full computation."""
    hf_config, _, config, params = models(name)
    prompts, images, image_mask = make_prompts(hf_config, [10, 10], [1, 0])
    args = (jnp.asarray(np.stack(prompts)), init_cache(config.text, 2, 16, jnp.float32))
    args += (jnp.asarray(images), jnp.asarray(image_mask))
    full, _ = Llava(config).apply({"params": params}, *args, method=Llava.decode)
    last, _ = Llava(config).apply(
        {"params": params}, *args, last_position_only=True, method=Llava.decode
    )
    assert full.shape == (2, 10, config.text.vocab_size)
    assert last.shape == (2, 1, config.text.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5)


def test_batch_rows_pads_with_filler_rows_that_share_one_compilation(generator):
    """A last, smaller batch padded to `batch_rows` gives the same tokens as alone, and the
    full and the smaller batch run the same compiled programs."""
    prompts = text_prompts(generator)
    sampling = SamplingConfig(max_new_tokens=6)
    alone = generator.generate(prompts[:1], sampling=sampling)
    padded = generator.generate(prompts[:1], sampling=sampling, batch_rows=4)
    assert len(padded.tokens) == 1
    np.testing.assert_array_equal(padded.tokens[0], alone.tokens[0])
    before = dict(generator.trace_counts)
    generator.generate([prompts[0]] * 4, sampling=sampling)
    assert dict(generator.trace_counts) == before
