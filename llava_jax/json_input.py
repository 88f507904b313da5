"""JSON a user wrote (data files, question files, request bodies): Python's `json`, with every
way it fails on hostile text turned into one `JSONInputError` that says what is wrong.

`json.loads` raises `RecursionError` for arrays or objects nested some thousand levels deep
and `ValueError` for an integer of more digits than Python converts (4,300 by default); both
would otherwise reach the user as a traceback or an HTTP 500.
"""

from __future__ import annotations

import json
import re
from typing import Any


class JSONInputError(ValueError):
    """Text that is not JSON this program can read; the message says why (no location
    prefix: the caller names the file, line or request)."""


_DIGITS = re.compile(r"Exceeds the limit \((\d+) digits\).*?value has (\d+) digits", re.S)


def loads(text: str | bytes) -> Any:
    """`json.loads(text)`, raising `JSONInputError` for malformed JSON (with its line and
    column), nesting too deep for the reader, and integers over Python's digit limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise JSONInputError(
            f"malformed JSON: {err.msg} (line {err.lineno}, column {err.colno})"
        ) from None
    except RecursionError:
        raise JSONInputError(
            "JSON nested too deeply (arrays or objects inside each other thousands of levels down)"
        ) from None
    except UnicodeDecodeError as err:
        raise JSONInputError(f"not UTF-8 text: {err.reason} at byte {err.start}") from None
    except ValueError as err:  # int() over sys.get_int_max_str_digits()
        found = _DIGITS.search(str(err))
        if found is None:
            raise JSONInputError(f"unreadable JSON: {err}") from None
        limit, digits = found.groups()
        raise JSONInputError(
            f"a number of {digits} digits (more than the {limit} Python reads)"
        ) from None
