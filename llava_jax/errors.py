"""Errors the user can fix: the command-line programs print the message and exit with 2."""

from __future__ import annotations


class InputError(Exception):
    """Something the user gave cannot be used (a path, an image, a prompt); the message
    names the thing."""


class PromptTooLongError(InputError, ValueError):
    """The prompt does not fit the model's context (the message gives the lengths)."""
