"""What lmms-eval's OpenAI-compatible model (`--model openai`) sends, against a real server
(test_serve.py's: the tiny random transformers LLaVA, started once for the module).

lmms-eval 0.7.3 sends `messages` (the image as a `data:image/png;base64` part before the
text, or after it with `--force_simple`), `max_tokens`, `temperature`, and `top_p` and
`seed` when the task's generation_kwargs have them. Its POPE, MathVerse, DetailCaps,
ConBench and MMSearch tasks have `top_p: 0`, which OpenAI accepts (its range is [0, 1]):
the nucleus is then the most likely token alone, so the answer is greedy whatever the
temperature. `bench/lmms_eval_server.py` runs lmms-eval itself against the server.
"""

from __future__ import annotations

import openai
import pytest
import test_serve as serve
from test_inference_cli import QUESTION
from test_serve import MODEL, ask, data_url, user

# test_serve's module fixtures, here for this module: the tiny model, its server, a client.
model_dir, loaded, image, reference = serve.model_dir, serve.loaded, serve.image, serve.reference
server, client = serve.server, serve.client


def lmms_eval_messages(image_path, text: str, image_first: bool = True) -> list[dict]:
    """A document's one user turn as lmms-eval's openai model builds it (chat: the visuals,
    then the text; simple: the text, then the visuals)."""
    picture = {"type": "image_url", "image_url": {"url": data_url(image_path)}}
    words = {"type": "text", "text": text}
    return [{"role": "user", "content": [picture, words] if image_first else [words, picture]}]


@pytest.mark.timeout(240)
def test_top_p_zero_is_greedy_whatever_the_temperature(client, reference, image):
    greedy = reference[2].texts[0].strip()  # row 0: greedy, 8 tokens at most
    assert ask(client, [user(QUESTION, image)]).choices[0].message.content == greedy
    sampled = set()
    for seed in (1, 2, 3):
        for temperature in (0.0, 0.7, 1.0, 2.0):
            answer = ask(
                client, [user(QUESTION, image)], temperature=temperature, top_p=0, seed=seed
            )
            assert answer.choices[0].message.content == greedy, (seed, temperature)
        answer = ask(client, [user(QUESTION, image)], temperature=1.0, seed=seed)
        sampled.add(answer.choices[0].message.content)
    assert sampled != {greedy}  # without top_p 0 these requests sample


@pytest.mark.timeout(240)
def test_requests_as_lmms_eval_sends_them(client, reference, image):
    greedy = reference[2].texts[0].strip()
    for image_first in (True, False):  # lmms-eval's chat and simple openai models
        messages = lmms_eval_messages(image, QUESTION, image_first)
        # POPE's generation_kwargs (max_new_tokens 128: more than the tiny context leaves
        # after the prompt, so it is lowered), then a task's with top_p 1 and a seed.
        for knobs in (
            {"max_tokens": 128, "temperature": 0, "top_p": 0},
            {"max_tokens": 8, "temperature": 0, "top_p": 1.0, "seed": 42},
        ):
            response = client.chat.completions.create(model=MODEL, messages=messages, **knobs)
            text = response.choices[0].message.content
            assert text.startswith(greedy) if knobs["max_tokens"] > 8 else text == greedy
            assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0


@pytest.mark.timeout(240)
def test_top_p_outside_zero_one_is_refused(client, image):
    for top_p in (-0.1, 1.5):
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, [user(QUESTION, image)], top_p=top_p)
        error = caught.value.body
        assert error["param"] == "top_p" and error["code"] == "invalid_value"
        assert "[0, 1]" in error["message"], error
