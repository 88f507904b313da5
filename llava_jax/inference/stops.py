"""Stop strings on an answer still being decoded: how much of its text may be shown.

A streamed answer is decoded again after every chunk of tokens. Its text must not show a
stop string, nor the start of one that the next tokens may complete, nor half a character
(U+FFFD while a multi-byte character is still arriving). The chat program and the
server's batcher show their streams through `visible_text`.
"""

from __future__ import annotations

from collections.abc import Sequence


def visible_text(text: str, stops: Sequence[str]) -> str:
    """What may be shown of a partial answer: cut at a stop string, and without a tail that
    could still grow into one (or a half-decoded character)."""
    for stop in stops:
        if stop in text:
            text = text[: text.index(stop)]
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    text = text[: len(text) - hold]
    return text.rstrip("\ufffd").lstrip()
