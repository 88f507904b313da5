"""The held-out questions the trainer's evaluator answers: each assistant turn of the test
split, its prompt (earlier reference answers included) and its images, as inference
prepares them."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from llava_jax.data import datasets
from llava_jax.data.config import DataConfig
from llava_jax.data.conversation import (
    IMAGE_PLACEHOLDER,
    DroppedExample,
    skip_leading_answer,
)
from llava_jax.data.datasets.record import from_stored
from llava_jax.data.encode import ExampleEncoder
from llava_jax.data.prompt import prompt_ids
from llava_jax.data.tokenizer import LoadedTokenizer
from llava_jax.models.inputs import ImageGeometry


@dataclasses.dataclass(frozen=True)
class EvalQuestion:
    """One assistant turn to answer by greedy decoding.

    ``prompt_ids int32[L]``: the conversation up to this answer (earlier reference answers
    included), image tokens expanded; ``images float32[I, T, H, W, 3]`` (each image's tiles),
    ``image_mask bool[I]``, ``image_layout int32[I, N]`` (models/inputs.py); ``answer``: the
    reference text. ``stop``: the template's end-of-answer string.
    """

    record_id: str
    turn: int
    prompt_ids: np.ndarray
    images: np.ndarray
    image_mask: np.ndarray
    image_layout: np.ndarray
    answer: str
    stop: str


def make_eval_questions(
    config: DataConfig,
    geometry: ImageGeometry,
    tokenizer: LoadedTokenizer,
    split: str = "test",
    limit: int | None = None,
    source: Sequence | None = None,
) -> list[EvalQuestion]:
    """Every assistant turn of the first ``limit`` records of ``split`` as a question
    (records with unreadable images are left out, and logged)."""
    if source is None:
        source = datasets.open_split(config, split)
    encoder = ExampleEncoder(config, geometry, tokenizer)
    template = config.conversation_template
    questions = []
    # the TFDS source order is a fixed hash order, the same on every run
    for index in range(len(source) if limit is None else min(limit, len(source))):
        record = from_stored(source[index])
        try:
            images, image_mask, layout, counts = encoder.images(record)
        except DroppedExample as error:
            logging.warning("Eval record %s left out: %s", record.id, error)
            continue
        turns = skip_leading_answer(record.conversations)
        for turn in range(1, len(turns), 2):
            shown = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns[:turn])
            image_tokens = counts[:shown]  # the images the prompt so far shows
            # and only their slots (a video's one placeholder shows all of its slots)
            slots_shown = int(image_mask.sum()) if record.is_video and shown else shown
            visible = image_mask & (np.arange(len(image_mask)) < slots_shown)
            questions.append(
                EvalQuestion(
                    record_id=record.id,
                    turn=turn,
                    prompt_ids=prompt_ids(turns[:turn], template, tokenizer, image_tokens),
                    images=images,
                    image_mask=visible,
                    image_layout=layout,
                    answer=turns[turn]["value"],
                    stop=template.end,
                )
            )
    return questions
