"""Reading LLaVA's question, answer and annotation files: JSON Lines, one object a line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava_jax.json_input import JSONInputError, loads


def read_records(
    path: str | Path,
    error: type[Exception],
    errors: str = "strict",
    require: str | None = "question_id",
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of `path`; each line must be a JSON
    object with the key `require` (None: any object, e.g. LLaVA-Bench's context.jsonl).
    Anything else raises `error` naming `path:line`: malformed JSON, nesting too deep for the
    reader, a number of more digits than Python reads.

    errors: how bytes that are not UTF-8 are decoded; "surrogateescape" keeps them as lone
    surrogates in the strings, for the caller to refuse one record rather than the file.
    """
    try:
        # Lines end at "\n" only: JSON strings may hold U+2028 or U+0085 unescaped, which
        # `str.splitlines` would take for line ends.
        lines = Path(path).read_text(encoding="utf-8", errors=errors).split("\n")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise error(f"{path}: cannot read: {reason}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = loads(line)
        except JSONInputError as err:
            raise error(f"{path}:{number}: {err}") from None
        if not isinstance(obj, dict):
            raise error(f"{path}:{number}: expected a JSON object")
        if require is not None and require not in obj:
            raise error(f"{path}:{number}: missing {require!r}")
        records.append((number, obj))
    return records
