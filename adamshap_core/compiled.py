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
on long runs. It needs a C++ compiler on a CPU. Where compiling fails, one warning says why and
every step computes eagerly, exactly as without ``compile`` (a run does not stop for a speed-up
it cannot have; whether it can is only known by compiling, which takes seconds).
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
    """Named functions, each compiled on first use; after the first failure, none of them is
    (one warning says why, and the caller computes eagerly)."""

    def __init__(self, functions: dict[str, Callable]):
        self.functions = functions
        self.failed: str | None = None  # why compiling failed (None: it has not)
        self.compile_seconds = 0.0  # time spent in the calls that compiled a graph
        self.graphs = 0  # graphs compiled (one per function and batch shape, if no step recompiles)
        self._compiled: dict[str, Callable] = {}

    def __call__(self, name: str, *args):
        """``functions[name](*args)``, compiled; None where compiling fails."""
        if self.failed is not None:
            return None
        start, before = time.perf_counter(), _graphs_compiled()
        try:
            out = self._function(name)(*args)
        except UserError:
            raise
        except Exception as e:  # no C++ compiler, a platform torch.compile does not support, ...
            self._fail(e)
            return None
        new = _graphs_compiled() - before
        if new:
            self.graphs += new
            self.compile_seconds += time.perf_counter() - start
        return out

    def _function(self, name: str) -> Callable:
        if name not in self._compiled:  # built on first use: torch.compile itself may refuse
            fn = self.functions[name]
            self._compiled[name] = torch.compile(fn, fullgraph=True, dynamic=False, options=OPTIONS)
        return self._compiled[name]

    def _fail(self, error: Exception) -> None:
        lines = str(error).strip().splitlines()
        self.failed = f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
        warnings.warn(
            f"attribution.compile: cannot compile here ({self.failed}); computing the values eagerly",
            RuntimeWarning,
            stacklevel=3,
        )


def _graphs_compiled() -> int:
    """Graphs torch.compile has built in this process so far (its own counter)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
