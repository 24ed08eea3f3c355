"""``attribution.compile``: the valuation math after the backward pass, run as compiled graphs.

On a small model a valued step is mostly the dispatch of hundreds of tiny tensor ops (the
validation rows' gradients, their subtraction from ``.grad``, flattening the optimizer's state,
the rules, M and the contractions), not arithmetic. ``torch.compile`` fuses them into a few
kernels. The functions compiled are the eager ones (``fused.rows_gradients`` and
``tracker.traced_step_values``), which call the same layer kernels and rules.

One graph is built per distinct set of shapes (the last, smaller batch of an epoch gets a second
one) and kept by torch. What changes from step to step without changing shapes (learning rate,
step count, clip factor) enters as 0-d tensors, so no step compiles again. Compiling takes
seconds to a minute on the first step (less when torch's on-disk cache has the graphs): it pays
on long runs. It needs a C++ compiler on a CPU; where compiling fails, the wrapper says why in
one warning and computes eagerly from then on (the same values, up to float rounding).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

from .errors import UserError

# cpp_wrapper: the graph's launcher in C++ (a Python launcher costs ~1 µs per intermediate tensor,
# which here is as much as the arithmetic); no size asserts (a check per tensor per call); the
# many small independent loops fused into as few kernels as possible
OPTIONS = {
    "cpp_wrapper": True,
    "size_asserts": False,
    "aggressive_fusion": True,
    "cpp.max_horizontal_fusion_size": 1 << 16,
}


class Compiled:
    """``fn`` compiled on first use, or ``fn`` itself once compiling has failed here."""

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name
        self.failed: str | None = None  # why compiling failed (None: it has not)
        self.compile_seconds = 0.0  # time spent in calls that compiled a new graph
        self._graphs: set = set()  # the keys seen
        self._compiled = torch.compile(fn, fullgraph=True, dynamic=False, options=OPTIONS)

    def __call__(self, *args, key: object):
        """``fn(*args)``; ``key`` tells apart the calls that need a graph of their own (a batch size),
        so that the time of those that compile one is counted in ``compile_seconds``."""
        if self.failed is None:
            start = time.perf_counter()
            try:
                out = self._compiled(*args)
            except UserError:
                raise
            except Exception as e:  # no C++ compiler, an op torch cannot trace here, ...
                self._fail(e)
            else:
                if key not in self._graphs:
                    self._graphs.add(key)
                    self.compile_seconds += time.perf_counter() - start
                return out
        return self.fn(*args)

    def _fail(self, error: Exception) -> None:
        first = str(error).strip().splitlines()
        self.failed = f"{type(error).__name__}: {first[0] if first else ''}"[:300]
        warnings.warn(
            f"attribution.compile: cannot compile {self.name} here ({self.failed}); computing it eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
