"""Errors that carry a message for the user rather than a traceback."""

from __future__ import annotations

from collections.abc import Sequence


class UserError(Exception):
    """Bad input (recipe, path, option, model, optimizer): the CLI prints the
    message as one paragraph and exits with code 2."""


def listed(choices: Sequence[str], conjunction: str) -> str:
    """Choices as a message names them: ``listed(["a", "b", "c"], "or")`` -> "a, b or c"."""
    *first, last = choices
    return f"{', '.join(first)} {conjunction} {last}" if first else last
