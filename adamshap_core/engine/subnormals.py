"""Subnormal floats in the contraction.

Output-gradients behind a softmax hold many subnormal floats (a few percent of an attention
projection's b after a few dozen steps of the facts GPT at width 256), and so do products with
them. An x86 core computes with a subnormal operand or result through a slow microcode path:
they doubled the contraction's time there. The contraction is sums of products alone: a
subnormal operand set to zero drops a term smaller than 1.2e-38 times the other factor, and a
subnormal product one smaller than 1.2e-38, far below float32's rounding of a value. So it runs
with the CPU's flush-to-zero and denormals-are-zero modes on, and the thread's previous mode is
back before anything of training runs again. The mode belongs to a thread: products that torch
splits over its intra-op threads run partly without it (with two threads it gained nothing).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

# 2^-100 · 2^-40 = 2^-140 is subnormal in float32 (the smallest normal is 2^-126): zero when flushing
_PROBE = (torch.tensor(2.0**-100), torch.tensor(2.0**-40))


def flushing() -> bool:
    """Whether this thread flushes subnormals now (set by ``torch.set_flush_denormal``)."""
    return bool(torch.mul(*_PROBE) == 0)


class _Flushed(AbstractContextManager):
    def __enter__(self):
        # set only where it was off, so that a caller who flushes already keeps flushing after
        self._set = not flushing() and torch.set_flush_denormal(True)
        return self

    def __exit__(self, *exc) -> None:
        if self._set:
            torch.set_flush_denormal(False)


def subnormals_flushed(device: torch.device) -> AbstractContextManager:
    """A context in which this thread flushes subnormals, on a CPU and outside compiled code
    (a GPU computes with them at full speed; a compiled graph is left as it is)."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return nullcontext()
    return _Flushed()
