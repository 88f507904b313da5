"""Loading the text tokenizer: a Hugging Face fast tokenizer from a local directory,
with the ``<image>`` placeholder and a pad token added when missing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llava_jax.data.conversation import IMAGE_PLACEHOLDER

PAD_TOKEN = "<pad>"


@dataclasses.dataclass(frozen=True)
class LoadedTokenizer:
    """The tokenizer and the numbers the model must follow.

    ``vocab_size`` counts the added tokens: the model's embedding needs at least this
    many rows.
    """

    tokenizer: PreTrainedTokenizerBase
    vocab_size: int
    image_token_id: int
    pad_token_id: int
    added_tokens: tuple[str, ...]


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> LoadedTokenizer:
    """Adds ``<image>`` and a pad token to ``tokenizer`` (in place) when missing."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("A fast tokenizer is required: answer masks use character offsets.")
    added = []
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        # add_tokens(special_tokens=True) keeps it whole and works on transformers 4 and 5
        tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
        added.append(IMAGE_PLACEHOLDER)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(PAD_TOKEN)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    probe = tokenizer(IMAGE_PLACEHOLDER, add_special_tokens=False)["input_ids"]
    if probe != [image_token_id]:
        raise ValueError(f"{IMAGE_PLACEHOLDER} does not tokenize to one token: {probe}")
    return LoadedTokenizer(
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        image_token_id=int(image_token_id),
        pad_token_id=int(tokenizer.pad_token_id),
        added_tokens=tuple(added),
    )


def load_tokenizer(path: str) -> LoadedTokenizer:
    """``AutoTokenizer`` from a local directory (never the hub, no remote code)."""
    tokenizer = AutoTokenizer.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=False, use_fast=True
    )
    loaded = prepare_tokenizer(tokenizer)
    logging.info(
        "Tokenizer %s: vocabulary %d (added %s), image token %d, pad %d",
        path,
        loaded.vocab_size,
        list(loaded.added_tokens) or "nothing",
        loaded.image_token_id,
        loaded.pad_token_id,
    )
    return loaded


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the vocabulary (every token and its id) and the special tokens: two
    tokenizers with the same fingerprint turn the same text into the same ids."""
    blob = json.dumps(
        [sorted(tokenizer.get_vocab().items()), sorted(tokenizer.special_tokens_map.items())],
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenizer_difference(old: PreTrainedTokenizerBase, new: PreTrainedTokenizerBase) -> str:
    """What differs between two tokenizers, in a few words (for an error message)."""
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    if len(old_vocab) != len(new_vocab):
        return f"{len(old_vocab)} tokens before, {len(new_vocab)} now"
    for token in sorted(old_vocab, key=old_vocab.get):
        if new_vocab.get(token) != old_vocab[token]:
            now = new_vocab.get(token)
            return f"same size, but {token!r} was id {old_vocab[token]} and is {now}"
    return f"special tokens {old.special_tokens_map} before, {new.special_tokens_map} now"
