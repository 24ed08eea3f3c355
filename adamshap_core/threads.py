"""The intra-op CPU thread count, which a replay must share with the run it replays.

How torch splits a product or a sum over its threads sets the order of the additions, so the same
step rounds differently with another thread count; over hundreds of steps a replay then leaves the
run's trajectory. A run records its count (``metrics.json``: ``torch_threads``) and its replays take
it, whatever the shell they are started from sets (``make`` sets ``OMP_NUM_THREADS=1``, say).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (None: as they are), then restore the count."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def recorded_threads(metrics: Mapping) -> int | None:
    """The thread count a run's ``metrics.json`` records (None: a run made before it was recorded)."""
    n = metrics.get("torch_threads")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
