"""Held-out evaluation during training, built once per run.

The held-out loss (on `eval.loss_batches` batches of the test split) and answer accuracy by
greedy decoding: each assistant turn of the first `eval.num_records` held-out records is a
question, the conversation up to it (earlier reference answers included) the prompt, and the
answer is compared with the reference after VQA's normalisation. `blind_accuracy` asks the
same questions with every image replaced by zeros: far below `accuracy` when the model
really looks at the image.

The questions, the eval-loss step and the inference engine are made once; every prompt is
padded to one length and every batch to one size, so each evaluation of the run reuses the
same three compiled programs (`trace_counts` says how often each was traced).
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import numpy as np

from llava_jax.data.config import DataConfig
from llava_jax.data.eval_questions import make_eval_questions
from llava_jax.data.pipeline import make_train_iterator, to_global_batch
from llava_jax.data.tokenizer import LoadedTokenizer
from llava_jax.evaluation.batch import generate_answers
from llava_jax.evaluation.vqa_normalize import normalize_vqa_answer
from llava_jax.inference.engine import Engine, default_length_bucket
from llava_jax.inference.sampling import SamplingConfig
from llava_jax.models.inputs import ImageGeometry
from llava_jax.train.config import EvalConfig
from llava_jax.train.state import TrainSetup
from llava_jax.train.step import make_eval_step, metrics_to_host

NUM_SHOWN = 8  # examples kept in the results for people to read


class Evaluator:
    """`evaluator(params) -> {'eval_loss', 'accuracy', 'blind_accuracy', 'num_examples',
    'examples'}` on the held-out split, with compiled programs reused across calls."""

    def __init__(
        self,
        setup: TrainSetup,
        tokenizer: LoadedTokenizer,
        data: DataConfig,
        config: EvalConfig,
        loss_chunk_size: int = 0,
    ):
        self.setup = setup
        self.tokenizer = tokenizer
        self.config = config
        # Held-out conversations one per row, in stored order: the same figures whether the
        # run packs or groups its training batches.
        self.data = data.replace(
            passes=1,
            global_batch_size=min(data.global_batch_size, config.batch_size),
            packing=False,
            group_by_modality_length=False,
        )
        self.geometry = ImageGeometry.of(setup.model_config)
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self.loss_step = make_eval_step(setup, loss_chunk_size, trace_counts=self.trace_counts)
        self.questions = []
        if config.num_records > 0:
            self.questions = make_eval_questions(
                self.data, self.geometry, tokenizer, "test", config.num_records
            )
        self.engine = Engine(
            setup.model_config, mesh=setup.mesh, rules=setup.rules, tokenizer=tokenizer.tokenizer
        )
        if self.questions:
            longest = max(len(q.prompt_ids) for q in self.questions)
            self.prompt_length = default_length_bucket(longest)
            self.batch_size = min(config.batch_size, len(self.questions))
            stops = sorted({q.stop.strip() for q in self.questions if q.stop.strip()})
            eos = tokenizer.tokenizer.eos_token_id
            self.sampling = SamplingConfig(
                max_new_tokens=config.max_new_tokens,
                eos_token_ids=() if eos is None else (int(eos),),
                stop_strings=tuple(stops),
                pad_token_id=tokenizer.pad_token_id,
            )

    @property
    def all_trace_counts(self) -> dict[str, int]:
        """Traces of the eval-loss step, the prefill and the decode loop so far."""
        return {**self.trace_counts, **self.engine.trace_counts}

    def __call__(self, params: Any) -> dict[str, Any]:
        results: dict[str, Any] = {}
        loss = self.eval_loss(params)
        if loss is not None:
            results["eval_loss"] = loss
        if self.questions:
            results.update(self.answer_accuracy(params))
        return results

    def eval_loss(self, params: Any) -> float | None:
        """Token-weighted cross-entropy on the first `loss_batches` held-out batches."""
        if self.config.loss_batches <= 0:
            return None
        try:
            iterator = make_train_iterator(self.data, self.geometry, self.tokenizer, split="test")
        except (KeyError, ValueError, FileNotFoundError) as err:
            logging.warning("No held-out split for the eval loss: %s", err)
            return None
        total, tokens = 0.0, 0.0
        try:
            for _ in range(self.config.loss_batches):
                try:
                    batch = to_global_batch(next(iterator), self.setup.mesh)
                except StopIteration:
                    break
                sums = metrics_to_host(self.loss_step(params, batch))
                total += sums["loss_sum"]
                tokens += sums["supervised_tokens"]
        finally:
            iterator.close()
        return total / tokens if tokens else None

    def answer_accuracy(self, params: Any) -> dict[str, Any]:
        """`{'accuracy', 'blind_accuracy', 'num_examples', 'examples'}` by greedy decoding."""
        questions = self.questions
        references = [normalize_vqa_answer(q.answer) for q in questions]
        results: dict[str, Any] = {"num_examples": len(questions)}
        image_slots = questions[0].images.shape
        for name, blind in (("accuracy", False), ("blind_accuracy", True)):
            images = [np.zeros_like(q.images) if blind else q.images for q in questions]
            answers = generate_answers(
                self.engine,
                params,
                [q.prompt_ids for q in questions],
                images,
                [q.image_mask for q in questions],
                self.sampling,
                batch_size=self.batch_size,
                image_slots=image_slots,
                length=self.prompt_length,
                image_layouts=[q.image_layout for q in questions],
            )
            correct = [
                normalize_vqa_answer(a) == r for a, r in zip(answers, references, strict=True)
            ]
            results[name] = float(np.mean(correct))
            if not blind:
                results["examples"] = [
                    {"record": q.record_id, "turn": q.turn, "reference": q.answer, "answer": a}
                    for q, a in list(zip(questions, answers, strict=True))[:NUM_SHOWN]
                ]
        return results
