"""Errors the user can fix: the command-line programs print the message and exit with 2.

`ArgumentError` is one about an argument of a library function (`load_model`'s `tokenizer`,
`step`, ...; `evaluate_file`'s `out_path`; a turn of a prompt): its message names the
argument as a call writes it (`step=3`), and `naming(flag)` says the same naming the flag a
program took it from (`--step 3`); `cli.py` holds the programs' table of flags.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class InputError(Exception):
    """Something the user gave cannot be used (a path, an image, a prompt); the message
    names the thing."""


class PromptTooLongError(InputError, ValueError):
    """The prompt does not fit the model's context (the message gives the lengths)."""


class Named:
    """How a message names an argument: `f"{arg}"` its name alone, `arg(value)` its name and
    value (`step=3` as a call writes them, `--step 3` as a command line does)."""

    def __init__(self, name: str, joiner: str) -> None:
        self.name, self.joiner = name, joiner

    def __str__(self) -> str:
        return self.name

    def __call__(self, value: Any) -> str:
        return f"{self.name}{self.joiner}{value}"


class ArgumentError(InputError):
    """The argument `argument` (its name in the call, e.g. "tokenizer") cannot be used.

    say: the message, or a function of how the argument is named (a `Named`) that writes it,
    e.g. `lambda arg: f"{arg(step)} contradicts ..."`. The message names it as a call does
    (`step=3 contradicts ...`); `naming("--step")` is the same message naming a flag
    (`--step 3 contradicts ...`).
    """

    def __init__(self, argument: str, say: str | Callable[[Named], str]) -> None:
        self.argument = argument
        self._say = say
        super().__init__(self._message(Named(argument, "=")))

    def _message(self, name: Named) -> str:
        return self._say if isinstance(self._say, str) else self._say(name)

    def naming(self, flag: str) -> str:
        """The message with the argument named as the command-line flag `flag`."""
        return self._message(Named(flag, " "))
