"""``attribution.compile``: the valuation math after the backward pass, run as compiled graphs.

On a small model a valued step is mostly the dispatch of hundreds of tiny tensor ops (the
validation rows' gradients, flattening the optimizer's state, the rules, M and the contractions),
not arithmetic. ``torch.compile`` fuses them into a few
kernels. The functions compiled are the eager ones (``fused.rows_gradients`` and
``tracker.traced_step_values``), which call the same layer kernels and rules.

One graph is built per distinct set of shapes (the last, smaller batch of an epoch gets a second
one) and kept by torch. What changes from step to step without changing shapes (learning rate,
step count, clip factor) enters as 0-d tensors, so no step compiles again. The graphs are guarded
on the engine's layout (a dict keyed by its parameters), so each tracker builds graphs of its own:
each ``Compiled`` compiles its own copy of the functions, so that torch keeps (and frees) a
tracker's graphs with it and counts their recompiles per tracker, and a tracker may build up to
``MAX_GRAPHS`` graphs per function (torch's default limit, 8, is raised for these functions only).
Compiling takes seconds to a minute on the first step (less when torch's on-disk cache has the
graphs; a new tracker in the same process reuses torch's cached kernels and takes about a second):
it pays on long runs. It needs a C++ compiler on a CPU. Where compiling fails, one warning says
why and every step computes eagerly, exactly as without ``compile`` (a run does not stop for a
speed-up it cannot have; whether it can is only known by compiling, which takes seconds). A
failure while a graph that was built earlier runs is raised instead: it is an error of the step
itself (out of memory, say), not a missing compiler. The graphs change no tensor in place.
"""

from __future__ import annotations

import logging
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .errors import UserError

# cpp_wrapper: the graph's launcher in C++ (a Python launcher costs ~1 µs per intermediate tensor,
# which here is as much as the arithmetic); no size asserts (a check per tensor per call); the
# many small independent loops fused into as few kernels as possible (typed as torch.compile's options)
OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {
    "cpp_wrapper": True,
    "size_asserts": False,
    "aggressive_fusion": True,
    "cpp.max_horizontal_fusion_size": 1 << 16,
}
# graphs one tracker may build per function: one per batch shape (a replay's query chunks, varying
# sequence lengths); past it, the valuation computes eagerly
MAX_GRAPHS = 64


class Compiled:
    """Named functions, each compiled on first use; after the first failure to compile, none of
    them is (one warning says why, and the caller computes eagerly)."""

    def __init__(self, functions: dict[str, Callable]):
        self.functions = functions
        self.failed: str | None = None  # why compiling failed (None: it has not)
        self.compile_seconds = 0.0  # time spent in the calls that compiled a graph
        self.graphs = 0  # graphs compiled (one per function and batch shape, if no step recompiles)
        self._compiled: dict[str, Callable] = {}
        self._ran: set[str] = set()  # functions one of whose graphs has run

    def __call__(self, name: str, *args):
        """``functions[name](*args)``, compiled; None where compiling fails."""
        if self.failed is not None:
            return None
        start, before, started = time.perf_counter(), _graphs_compiled(), _compiles_started()
        try:
            out = self._run(name, args)
        except UserError:
            raise
        except Exception as e:  # no C++ compiler, a platform torch.compile does not support, ...
            if _limit_hit(e):
                what = f"'{name}' needs more than {MAX_GRAPHS} graphs (one per batch shape), a tracker's most"
                self._fail(e, what)
                return None
            now = _compiles_started()  # None: unknown, so only a function's first call compiles
            compiling = name not in self._ran or (now is not None and now != started)
            if not compiling:  # a graph that built and ran before failed: an error of the step itself
                raise  # (out of memory, bad input), which the eager code would meet as well
            self._fail(e, "cannot compile here")
            return None
        self._ran.add(name)
        new = _graphs_compiled() - before
        if new:
            self.graphs += new
            self.compile_seconds += time.perf_counter() - start
        return out

    def _run(self, name: str, args: tuple):
        fn = self._function(name)
        try:
            return fn(*args)
        except Exception as e:
            if not _limit_hit(e):
                raise
        # torch refuses before it runs anything (a new shape, no graph for it): once more with room
        # for MAX_GRAPHS graphs (raised only here, so the steps that compile nothing pay nothing)
        with _recompile_limit(MAX_GRAPHS):
            return fn(*args)

    def _function(self, name: str) -> Callable:
        if name not in self._compiled:  # built on first use: torch.compile itself may refuse
            fn = _own_copy(self.functions[name])
            _QUIET_REFUSALS.names.add(fn.__name__)
            self._compiled[name] = torch.compile(fn, fullgraph=True, dynamic=False, options=OPTIONS)
        return self._compiled[name]

    def _fail(self, error: Exception, what: str) -> None:
        lines = str(error).strip().splitlines()
        self.failed = f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
        warnings.warn(
            f"compile=True (attribution.compile): {what} ({self.failed}); computing the values eagerly",
            RuntimeWarning,
            stacklevel=3,
        )


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own: torch keeps graphs, and counts recompiles, per code
    object, so each ``Compiled`` (each tracker) gets its own, freed with it."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return fn
    copy = types.FunctionType(code.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _recompile_limit(n: int):
    """Room for ``n`` graphs per compiled function, for the calls inside the context."""
    config = torch._dynamo.config
    # recompile_limit: cache_size_limit before torch 2.6
    names = [
        ("recompile_limit", "cache_size_limit"),
        ("accumulated_recompile_limit", "accumulated_cache_size_limit"),
    ]
    limits = {}
    for new, old in names:
        name = new if hasattr(config, new) else old
        if hasattr(config, name):
            limits[name] = max(getattr(config, name), n)
    return config.patch(**limits)


class _QuietRefusals(logging.Filter):
    """Drops torch's log line of a refusal at its recompile limit where the function is one compiled
    here: ``_run`` retries it at once with room for MAX_GRAPHS graphs (and warns itself past those),
    so the line would read as if compiling had failed. A filter costs nothing on calls that log
    nothing; raising the limit for every call up front would cost each call a config patch."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "hit config." not in message:
            return True
        return not any(f"'{name}'" in message for name in self.names)


_QUIET_REFUSALS = _QuietRefusals()
logging.getLogger("torch._dynamo.convert_frame").addFilter(_QUIET_REFUSALS)


def _limit_hit(error: Exception) -> bool:
    """Whether ``error`` is a fullgraph compile refused at torch's recompile limit."""
    exc = getattr(torch._dynamo, "exc", None)
    limit_hit = getattr(exc, "FailOnRecompileLimitHit", None)
    return limit_hit is not None and isinstance(error, limit_hit)


_started = 0  # compiles torch has started in this process, since the first one counted here


def _count_start(*args) -> None:  # torch before 2.8 passes no argument
    global _started
    _started += 1


def _compiles_started() -> int | None:
    """A count that changes whenever torch starts compiling a graph (None: this torch has no such
    hook); registered again if ``torch._dynamo.reset()`` cleared it."""
    handler = getattr(torch._dynamo, "callback_handler", None)
    if handler is None:
        return None
    if _count_start not in handler.start_callbacks:
        handler.register_start_callback(_count_start)
    return _started


def _graphs_compiled() -> int:
    """Graphs torch.compile has built in this process so far (its own counter)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
