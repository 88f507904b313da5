"""Loading the text tokenizer (a Hugging Face fast tokenizer from a local directory, with
the ``<image>`` placeholder and a pad token added when missing), and turning rendered
conversations into ids as LLaVA does (`TextEncoder`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llava_jax.data.conversation import CONTROL_TOKENS, IMAGE_PLACEHOLDER, DroppedExample, Piece

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
    text_encoder: TextEncoder


# Unicode noncharacters, "reserved for a process's internal use": stand-ins for the
# template's control tokens while a text is tokenized. Text that holds one is refused.
_STAND_IN_BASE = 0xFDD0
_STAND_INS = re.compile("[\ufdd0-\ufdef]")


class TextEncoder:
    """Rendered conversations -> ids, as LLaVA's ``tokenizer_image_token`` makes them.

    The text between two ``<image>`` is tokenized on its own call (so a SentencePiece
    tokenizer starts the text after an image as a new word, ``▁``), the first part with the
    tokenizer's BOS, the others without; each ``<image>`` becomes one image token. Inside a
    part, a template's control piece (``</s>``, ``<s>``, ``<|im_start|>``, ``<|im_end|>``) is
    that special token, and everything else is text: ``</s>`` written in an answer or a
    question is the characters ``<``, ``/``, ``s``, ``>``. This works on a copy of the fast
    tokenizer in which special tokens are not matched in text (``encode_special_tokens``)
    and each control token has a stand-in (a noncharacter with the control token's own
    strip settings), matched as the control token would be and mapped back to its id: so
    the text around a control token is tokenized as the tokenizer itself would tokenize it
    (LLaMA's: no ``▁`` after ``</s>``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_token_id: int):
        self.image_token_id = int(image_token_id)
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        added = {
            token.content: (i, token) for i, token in backend.get_added_tokens_decoder().items()
        }
        self.stand_ins: dict[str, str] = {}  # control text -> its stand-in character
        control_ids = []
        for index, control in enumerate(c for c in CONTROL_TOKENS if c in added):
            token_id, token = added[control]
            stand_in = chr(_STAND_IN_BASE + index)
            backend.add_tokens(
                [
                    AddedToken(
                        stand_in,
                        single_word=token.single_word,
                        lstrip=token.lstrip,
                        rstrip=token.rstrip,
                        normalized=False,
                        special=False,  # still matched with encode_special_tokens on
                    )
                ]
            )
            self.stand_ins[control] = stand_in
            control_ids.append((backend.token_to_id(stand_in), token_id))
        backend.encode_special_tokens = True
        self.backend = backend
        self.control_ids = dict(control_ids)  # stand-in id -> control token id

    def _string(self, pieces: Sequence[Piece]) -> str:
        parts = []
        for piece in pieces:
            if piece.control and piece.text in self.stand_ins:
                parts.append(self.stand_ins[piece.text])
                continue
            if reserved := _STAND_INS.search(piece.text):
                raise DroppedExample(
                    "reserved_character",
                    f"the text holds U+{ord(reserved.group()):04X} (a Unicode noncharacter, "
                    "which the tokenizer keeps for its own use)",
                )
            parts.append(piece.text)
        return "".join(parts)

    def _encode_unique(self, texts: set[str], add_special_tokens: bool) -> dict[str, list[int]]:
        texts = sorted(texts)
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        encodings = encode(texts, add_special_tokens=add_special_tokens)
        return {text: encoding.ids for text, encoding in zip(texts, encodings, strict=True)}

    def encode(self, texts: Sequence[Sequence[Piece]]) -> list[np.ndarray]:
        """``int32[L]`` for each text (a sequence of pieces), one image token per
        ``<image>``. Raises ``DroppedExample('reserved_character')`` for text holding a
        noncharacter U+FDD0..U+FDEF."""
        parts = [self._string(pieces).split(IMAGE_PLACEHOLDER) for pieces in texts]
        firsts = self._encode_unique({p[0] for p in parts}, add_special_tokens=True)
        rests = self._encode_unique({t for p in parts for t in p[1:]}, add_special_tokens=False)
        out = []
        for first, *rest in parts:
            ids = list(firsts[first])
            for text in rest:
                ids.append(self.image_token_id)
                ids.extend(rests[text])
            row = np.asarray(ids, np.int32)
            for stand_in, control in self.control_ids.items():
                row[row == stand_in] = control
            out.append(row)
        return out


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
        text_encoder=TextEncoder(tokenizer, image_token_id),
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
