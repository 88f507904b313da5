"""Held-out answer accuracy by greedy decoding, as the trainer reports it.

Each assistant turn of the first `num_records` held-out records is a question: the
conversation up to it (earlier reference answers included) is the prompt, the greedy
answer is compared with the reference after light normalisation. `blind_accuracy` asks
the same questions with every image replaced by zeros: far below `accuracy` when the
model really looks at the image.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from llava_jax.data.pipeline import EvalQuestion, make_eval_questions
from llava_jax.data.tokenizer import LoadedTokenizer
from llava_jax.inference.generate import Generator, SamplingConfig

NUM_SHOWN = 8  # examples kept in the results for people to read


def normalize_answer(text: str) -> str:
    """Lower case, no surrounding whitespace or final punctuation, single spaces."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.rstrip(".!?,;: ")


def _batches(questions: list[EvalQuestion], size: int):
    for start in range(0, len(questions), size):
        yield questions[start : start + size]


def generate_answers(
    generator: Generator,
    questions: list[EvalQuestion],
    sampling: SamplingConfig,
    batch_size: int,
    blind: bool = False,
) -> list[str]:
    """Greedy answers, in order, `batch_size` questions at a time (a last, smaller batch
    is padded by the generator, so one compiled program serves them all)."""
    answers: list[str] = []
    for batch in _batches(questions, batch_size):
        images = np.stack([q.images for q in batch])
        if blind:
            images = np.zeros_like(images)
        result = generator.generate(
            [q.prompt_ids for q in batch],
            images,
            np.stack([q.image_mask for q in batch]),
            sampling,
            batch_rows=batch_size,
        )
        answers.extend(result.texts)
    return answers


def answer_accuracy(
    setup: Any, params: Any, tokenizer: LoadedTokenizer, data_config: Any, eval_config: Any
) -> dict[str, Any]:
    """`{'accuracy', 'blind_accuracy', 'num_examples', 'examples'}` on the held-out split.

    setup: the trainer's `TrainSetup` (model config, mesh, rules); params: its parameters.
    """
    questions = make_eval_questions(data_config, tokenizer, "test", eval_config.num_records)
    if not questions:
        return {"num_examples": 0}
    hf_tokenizer = tokenizer.tokenizer
    stops = sorted({q.stop.strip() for q in questions if q.stop.strip()})
    eos = hf_tokenizer.eos_token_id
    sampling = SamplingConfig(
        max_new_tokens=eval_config.max_new_tokens,
        eos_token_ids=() if eos is None else (int(eos),),
        stop_strings=tuple(stops),
        pad_token_id=tokenizer.pad_token_id,
    )
    generator = Generator(
        setup.model_config, params, mesh=setup.mesh, rules=setup.rules, tokenizer=hf_tokenizer
    )
    batch_size = min(eval_config.batch_size, len(questions))
    references = [normalize_answer(q.answer) for q in questions]
    results: dict[str, Any] = {"num_examples": len(questions)}
    for name, blind in (("accuracy", False), ("blind_accuracy", True)):
        answers = generate_answers(generator, questions, sampling, batch_size, blind)
        correct = [normalize_answer(a) == r for a, r in zip(answers, references, strict=True)]
        results[name] = float(np.mean(correct))
        if not blind:
            results["examples"] = [
                {"record": q.record_id, "turn": q.turn, "reference": q.answer, "answer": a}
                for q, a in list(zip(questions, answers, strict=True))[:NUM_SHOWN]
            ]
    return results
