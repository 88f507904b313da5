"""A test tokenizer in Vicuna-1.5's shape: a small SentencePiece BPE model trained here with
LLaMA's settings (byte fallback, digits split, a dummy prefix, whitespace kept, ids 0/1/2 for
<unk>/<s>/</s>), saved as Vicuna ships it: `tokenizer.model` and a `LlamaTokenizer` config
with `legacy: false`, no `tokenizer.json` (transformers converts it when loading)."""

from __future__ import annotations

import io
import json
import os

CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "What is shown in the image? Describe the picture briefly.",
    "What color are the objects? Which shape do you see? How many objects are there?",
    "Where is the object? On which side is the object? It is on the left of the image.",
    "There are 2 red circles, 13 blue squares and 7 green triangles near the top right.",
    "The first line says hello; the second line is a list of numbers: 1, 2, 3.",
    "a red circle, a yellow cross, two purple squares on the bottom, three white shapes",
    "0 1 2 3 4 5 6 7 8 9",  # LLaMA has a piece for every digit
)
# LLaMA's and Vicuna's "USER" is one piece after a control token and "▁" + "USER" at the
# start of a text: the tokenization LLaVA's per-round counts in preprocess_v1 assume.
GLUED = ("USER:", "ASSISTANT:")


def special(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def save_vicuna_tokenizer(directory: str, vocab_size: int = 420) -> str:
    """Trains and saves the tokenizer in `directory`; returns it."""
    import sentencepiece as spm

    lines = [*CORPUS, *(f"x{glued}" for glued in GLUED)] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": special("<s>"),
        "eos_token": special("</s>"),
        "unk_token": special("<unk>"),
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 4096,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token")}, f, indent=2)
    return directory
