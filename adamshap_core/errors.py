"""Errors that carry a message for the user rather than a traceback."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class UserError(Exception):
    """Bad input (recipe, path, option, model, optimizer): the CLI prints the
    message as one paragraph and exits with code 2."""


def listed(choices: Sequence[str], conjunction: str) -> str:
    """Choices as a message names them: ``listed(["a", "b", "c"], "or")`` -> "a, b or c"."""
    *first, last = choices
    return f"{', '.join(first)} {conjunction} {last}" if first else last


# what torch's allocators say when an allocation fails (the CPU one raises a plain RuntimeError)
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")


class memory_short_as:  # lower case: used as a function, ``with memory_short_as(...):``
    """An allocation that fails inside raised as ``error()``, a refusal that says what took the
    memory, without the traceback; other errors pass as they are. A class rather than a generator
    context manager: it wraps every training step, and costs 0.5 µs there instead of 1.5."""

    __slots__ = ("error",)

    def __init__(self, error: Callable[[], Exception]):
        self.error = error

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None and is_out_of_memory(error):
            raise self.error() from None
        # any other error passes as it is


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed (not, say, CUDA's illegal memory access)."""
    import torch  # here: the CLI's modules import this one before they need torch

    # torch.cuda.OutOfMemoryError: torch.OutOfMemoryError itself from torch 2.4 on, absent before
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error).lower() for s in OUT_OF_MEMORY)
