"""A tiny run whose answers are numbers answers them at inference, token for token.

With a LLaMA-style SentencePiece tokenizer (Vicuna-1.5's shape), the answer " 2" after
"ASSISTANT:" is the two tokens "▁", "2". The prompt a program builds ends at "ASSISTANT:",
so the model must produce the "▁" first: it is a target, as in LLaVA. A model that never
learned it (before the conversation format's version 2) starts its answers with whatever
its untrained output at ":" is.
"""

from __future__ import annotations

import json
import os

import pytest
from trainer_fixtures import tiny_config
from vicuna_tokenizer import save_vicuna_tokenizer

from llava_jax.data.conversation import get_template, tokenize_conversation
from llava_jax.data.tokenizer import load_tokenizer
from llava_jax.inference.load import load_model
from llava_jax.train.trainer import train_and_evaluate

FACTS = {
    "How many sides does a triangle have?": "3",
    "How many sides does a square have?": "4",
    "How many legs does a spider have?": "8",
    "How many days are in a week?": "7",
    "How many months are in a year?": "12",
    "What is two plus three?": "5",
    "How many wheels does a bike have?": "2",
    "How many hours are in a day?": "24",
}


def _records(copies: int) -> list[dict]:
    return [
        {
            "id": f"{copy}-{index}",
            "conversations": [
                {"from": "human", "value": question},
                {"from": "gpt", "value": answer},
            ],
        }
        for copy in range(copies)
        for index, (question, answer) in enumerate(FACTS.items())
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    tokenizer = save_vicuna_tokenizer(str(root / "tokenizer"))
    (root / "images").mkdir()
    (root / "train.json").write_text(json.dumps(_records(4)))
    (root / "test.json").write_text(json.dumps(_records(1)))
    config = tiny_config(
        str(root / "tfds"),
        data__source="llava_json",
        data__json_path=str(root / "train.json"),
        data__test_json_path=str(root / "test.json"),
        data__image_dir=str(root / "images"),
        data__tokenizer_path=tokenizer,
        data__max_len=160,
        train__num_steps=100,
        train__checkpoint_every=100,
        train__log_every=50,
        eval__num_records=len(FACTS),
        eval__max_new_tokens=6,
    )
    workdir = str(root / "workdir")
    summary = train_and_evaluate(config, workdir)
    return workdir, tokenizer, summary


def test_a_model_trained_on_number_answers_answers_with_their_exact_tokens(trained):
    workdir, tokenizer_dir, summary = trained
    assert summary["eval"]["accuracy"] == 1.0, summary["eval"]["examples"]
    model = load_model(workdir)
    tokenizer = load_tokenizer(tokenizer_dir)
    template = get_template("vicuna_v1")
    for question, answer in FACTS.items():
        # LLaVA's targets after "ASSISTANT:": "▁", each digit (LLaMA splits digits), "</s>"
        expected = ["▁", *answer, "</s>"]
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        row = tokenize_conversation(turns, tokenizer, template, 0, 1, 160)
        targets = row.input_ids[row.loss_mask > 0].tolist()
        assert tokenizer.tokenizer.convert_ids_to_tokens(targets) == expected
        prompt = model.prompt_ids(turns[:1])
        result = model.generate([prompt], sampling=model.sampling(max_new_tokens=6))
        assert result.finish_reasons[0] == "eos", question
        generated = tokenizer.tokenizer.convert_ids_to_tokens(result.tokens[0].tolist())
        assert generated == expected[:-1], question  # eos is not listed
    assert os.path.exists(os.path.join(workdir, "eval.json"))
