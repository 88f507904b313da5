"""Loading the text tokenizer (a Hugging Face fast tokenizer from a local directory, with
the ``<image>`` placeholder and a pad token added when missing), and turning rendered
conversations into ids as LLaVA does (`TextEncoder`)."""

from __future__ import annotations

import bisect
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

    The text between two ``<image>`` is tokenized on its own (so a SentencePiece tokenizer
    starts the text after an image as a new word, ``▁``), the first part after the
    tokenizer's BOS; each ``<image>`` becomes one image token. Inside a part, a template's
    control piece (``</s>``, ``<s>``, ``<|im_start|>``, ``<|im_end|>``) is that special token,
    and everything else is text: ``</s>`` written in an answer or a question is the
    characters ``<``, ``/``, ``s``, ``>``. This works on a copy of the fast tokenizer in which
    special tokens are not matched in text (``encode_special_tokens``) and each control token
    has a stand-in (a noncharacter with the control token's own strip settings), matched as
    the control token would be: so the text around a control token is tokenized as the
    tokenizer itself would tokenize it (LLaMA's: no ``▁`` after ``</s>``).

    The tokenizer splits its input at added tokens and tokenizes the segments between them
    on their own, each knowing only whether it starts the input; so the segments between
    images and control tokens are tokenized once, and a prefix of the text (a prompt of the
    conversation) costs only its last, partial segment (`encode_with_prefixes`).
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
        self.control_ids: dict[str, int] = {}  # stand-in character -> control token id
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
            self.control_ids[stand_in] = token_id
        backend.encode_special_tokens = True
        self.backend = backend
        alternatives = [re.escape(IMAGE_PLACEHOLDER), *map(re.escape, self.control_ids)]
        self._separators = re.compile("|".join(alternatives))
        # What the tokenizer puts before a text (LLaMA's BOS); what it may put after one
        # (an add_eos_token setting) is left out, as it would end every prompt.
        with_specials = backend.encode("a", add_special_tokens=True).ids
        text = backend.encode("a", add_special_tokens=False).ids
        starts = [i for i in range(len(with_specials)) if with_specials[i:][: len(text)] == text]
        self.leading_ids = with_specials[: starts[0]] if starts else []

    def _string(self, pieces: Sequence[Piece]) -> tuple[str, list[int]]:
        """The text to tokenize (control pieces as stand-ins) and where each piece ends."""
        parts, ends, length = [], [], 0
        for piece in pieces:
            if piece.control and piece.text in self.stand_ins:
                text = self.stand_ins[piece.text]
            elif reserved := _STAND_INS.search(piece.text):
                raise DroppedExample(
                    "reserved_character",
                    f"the text holds U+{ord(reserved.group()):04X} (a Unicode noncharacter, "
                    "which the tokenizer keeps for its own use)",
                )
            else:
                text = piece.text
            parts.append(text)
            length += len(text)
            ends.append(length)
        return "".join(parts), ends

    def _tokenize(self, requests: set[tuple[str, str]]) -> dict[tuple[str, str], list[int]]:
        """`(context, text) -> ids` of each text where it follows `context`: a stand-in, or
        '' for the start of a part (the input's start, or just after an image)."""
        ordered = sorted(requests)
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        encodings = encode([c + t for c, t in ordered], add_special_tokens=False)
        out = {}
        for (context, text), encoding in zip(ordered, encodings, strict=True):
            ids = encoding.ids
            if context:  # the stand-in is one added token: drop it
                if not ids or ids[0] != self.backend.token_to_id(context):
                    raise RuntimeError(f"the control token's stand-in did not stay whole: {ids}")
                ids = ids[1:]
            out[(context, text)] = ids
        return out

    def encode(self, pieces: Sequence[Piece]) -> np.ndarray:
        """``int32[L]``: the text of ``pieces``, one image token per ``<image>``. Raises
        ``DroppedExample('reserved_character')`` for text holding a noncharacter
        U+FDD0..U+FDEF."""
        return self.encode_with_prefixes(pieces, [])[0]

    def encode_with_prefixes(
        self, pieces: Sequence[Piece], cuts: Sequence[int]
    ) -> tuple[np.ndarray, list[int | None]]:
        """``int32[L]`` for the text of ``pieces`` (as `encode`), and for each of ``cuts``
        (a number of pieces) how many tokens the text of ``pieces[:cut]`` gets when tokenized
        alone, provided they are the first tokens of the whole text's (else None)."""
        text, ends = self._string(pieces)
        # segments: (start, end, context); separators[i] is the token after segment i
        segments, separators, start, context = [], [], 0, ""
        for match in self._separators.finditer(text):
            segments.append((start, match.start(), context))
            separator = match.group()
            if separator == IMAGE_PLACEHOLDER:
                separators.append(self.image_token_id)
                context = ""  # the text after an image is tokenized as a new part
            else:
                separators.append(self.control_ids[separator])
                context = separator
            start = match.end()
        segments.append((start, len(text), context))
        starts = [segment[0] for segment in segments]

        wanted = []  # per cut: (its last segment, where the cut text ends in it)
        for cut in cuts:
            position = ends[cut - 1] if cut else 0
            index = bisect.bisect_right(starts, position) - 1
            if position > segments[index][1]:
                raise ValueError(f"a cut at character {position} falls inside a separator")
            wanted.append((index, position))
        requests = {(c, text[s:e]) for s, e, c in segments}
        requests |= {(segments[i][2], text[segments[i][0] : p]) for i, p in wanted}
        tokens = self._tokenize(requests)

        ids = list(self.leading_ids)
        segment_starts = []  # where each segment's tokens start in `ids`
        for index, (start, end, context) in enumerate(segments):
            segment_starts.append(len(ids))
            ids.extend(tokens[(context, text[start:end])])
            if index < len(separators):
                ids.append(separators[index])
        lengths: list[int | None] = []
        for index, position in wanted:
            start, _, context = segments[index]
            tail = tokens[(context, text[start:position])]
            first = segment_starts[index]  # the whole segments before are the row's
            lengths.append(first + len(tail) if ids[first : first + len(tail)] == tail else None)
        return np.asarray(ids, np.int32), lengths


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> LoadedTokenizer:
    """Adds ``<image>`` and a pad token to ``tokenizer`` (in place) when missing."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "A fast tokenizer is required: conversations are tokenized with its backend "
            "(data/tokenizer.py TextEncoder)"
        )
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
