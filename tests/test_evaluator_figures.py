"""The trainer's held-out figures, computed independently: `eval_loss` is the token-weighted
mean cross-entropy of its batches, and `accuracy` / `blind_accuracy` count an answering
stand-in's right answers, with and without the images."""

from __future__ import annotations

import types
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import pytest
from trainer_fixtures import tiny_config

from llava_jax.data.pipeline import make_train_iterator
from llava_jax.models.inputs import Batch
from llava_jax.train.evaluator import Evaluator
from llava_jax.train.state import init_train_state
from llava_jax.train.trainer import Run

LOSS_BATCHES = 2  # of the 3 held-out batches (24 records, 8 a batch)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Evaluator, Any]:
    """(the evaluator as the trainer builds it, fresh parameters of the tiny model)."""
    config = tiny_config(
        str(tmp_path_factory.mktemp("tfds")),
        eval__num_records=4,
        eval__batch_size=8,
        eval__loss_batches=LOSS_BATCHES,
        eval__max_new_tokens=4,
    )
    run = Run(config, str(tmp_path_factory.mktemp("run")))
    evaluator = Evaluator(
        run.setup,
        run.tokenizer,
        run.data_config,
        run.config.eval,
        run.config.train.loss_chunk_size,
    )
    return evaluator, init_train_state(run.setup, jax.random.key(0)).params


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def test_eval_loss_is_the_token_weighted_mean_cross_entropy(evaluated):
    evaluator, params = evaluated
    setup = evaluator.setup
    forward = jax.jit(lambda params, inputs: setup.model.apply({"params": params}, **inputs))
    # The first LOSS_BATCHES held-out batches, each through the model once; the
    # cross-entropy of every answer token (predicted from the position before) in float64.
    sums, tokens = [], []
    iterator = make_train_iterator(
        evaluator.data, evaluator.geometry, evaluator.tokenizer, split="test"
    )
    for _ in range(LOSS_BATCHES):
        arrays = next(iterator)
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            logits = forward(params, Batch.from_arrays(arrays).model_inputs())
        log_probs = _log_softmax(np.asarray(logits, np.float64)[:, :-1])
        targets = np.asarray(arrays["input_ids"])[:, 1:]
        mask = np.asarray(arrays["loss_mask"], np.float64)[:, 1:]
        cross_entropy = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        sums.append(float((cross_entropy * mask).sum()))
        tokens.append(float(mask.sum()))
    iterator.close()
    token_weighted = sum(sums) / sum(tokens)
    mean_of_batch_means = float(np.mean([s / n for s, n in zip(sums, tokens, strict=True)]))
    # The batches hold different numbers of answer tokens: the two means differ a hundred
    # times more than the tolerance below, which tells them apart.
    assert len(set(tokens)) == LOSS_BATCHES, tokens
    assert abs(token_weighted - mean_of_batch_means) > 1e-4 * token_weighted

    loss = evaluator.eval_loss(params)
    np.testing.assert_allclose(loss, token_weighted, rtol=1e-6)


class AnsweringStandIn:
    """In the engine's place: answers each question right when it is in `right_with_image`
    and gets its own images, or in `right_blind` and gets zeros; records what reached it.

    Questions are expected in order, pass after pass (two records may ask the same first
    question, so a prompt alone does not name one)."""

    def __init__(self, evaluator: Evaluator, right_with_image: set[int], right_blind: set[int]):
        self.geometry = evaluator.geometry  # generate_answers reads the engine's geometry
        self.questions = evaluator.questions
        self.right_with_image = right_with_image
        self.right_blind = right_blind
        self.seen: list[tuple[int, str]] = []  # (question, "image" | "zeros" | "other")

    def generate(self, params, prompts, images, image_mask, sampling, **kwargs):
        texts = []
        for row, prompt in enumerate(prompts):
            i = len(self.seen) % len(self.questions)
            question = self.questions[i]
            np.testing.assert_array_equal(prompt, question.prompt_ids)
            np.testing.assert_array_equal(image_mask[row], question.image_mask)
            if np.array_equal(images[row], question.images) and np.any(question.images):
                received = "image"
            elif not np.any(images[row]):
                received = "zeros"
            else:
                received = "other"
            self.seen.append((i, received))
            right = (received == "image" and i in self.right_with_image) or (
                received == "zeros" and i in self.right_blind
            )
            # A right answer as a model writes it: VQA's normalisation makes it the reference.
            texts.append(f" The {question.answer.title()}. " if right else "a wrong answer")
        return types.SimpleNamespace(texts=texts)


def test_accuracy_and_blind_accuracy_count_right_answers_with_and_without_images(
    evaluated, monkeypatch
):
    evaluator, params = evaluated
    count = len(evaluator.questions)
    assert count > evaluator.batch_size  # two batches, the last one short
    right_with_image = set(range(count)) - {1, 4}
    right_blind = {0, 4}
    stand_in = AnsweringStandIn(evaluator, right_with_image, right_blind)
    monkeypatch.setattr(evaluator, "engine", stand_in)

    results = evaluator.answer_accuracy(params)

    assert results["num_examples"] == count
    assert results["accuracy"] == len(right_with_image) / count
    assert results["blind_accuracy"] == len(right_blind) / count
    # Each question asked once with its own images, then once with every image zeroed.
    assert stand_in.seen == [(i, "image") for i in range(count)] + [
        (i, "zeros") for i in range(count)
    ]
    assert [e["answer"] for e in results["examples"]] == [
        f"The {q.answer.title()}." if i in right_with_image else "a wrong answer"
        for i, q in enumerate(evaluator.questions[: len(results["examples"])])
    ]
