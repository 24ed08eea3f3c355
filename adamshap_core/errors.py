"""Errors that carry a message for the user rather than a traceback."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager


class UserError(Exception):
    """Bad input (recipe, path, option, model, optimizer): the CLI prints the
    message as one paragraph and exits with code 2."""


def listed(choices: Sequence[str], conjunction: str) -> str:
    """Choices as a message names them: ``listed(["a", "b", "c"], "or")`` -> "a, b or c"."""
    *first, last = choices
    return f"{', '.join(first)} {conjunction} {last}" if first else last


# what torch's allocators say when an allocation fails (the CPU one raises a plain RuntimeError)
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")


@contextmanager
def memory_short_as(error: Callable[[], Exception]):
    """An allocation that fails inside raised as ``error()``, a refusal that says what took the
    memory, without the traceback; other errors pass as they are."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise error() from None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed (not, say, CUDA's illegal memory access)."""
    import torch  # here: the CLI's modules import this one before they need torch

    # torch.cuda.OutOfMemoryError: torch.OutOfMemoryError itself from torch 2.4 on, absent before
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error).lower() for s in OUT_OF_MEMORY)
