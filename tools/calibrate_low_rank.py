"""Calibrate the fast mode's rule for when a weight matrix is contracted through low-rank factors.

For a sweep of shapes (d_out × d_in from 32 × 32 to 2048 × 512, K = 1 and 3 methods, B·T rows
from 48 to 3072) it times, on one thread, the exact contraction, the factorisation and the
low-rank contraction, then reports how often ``factorizing_pays`` chooses wrongly with its
current constants and which constants of a small grid would lose the least time. It changes
nothing: copy the constants into ``adamshap_core/engine/low_rank.py`` by hand if they should change.

    OMP_NUM_THREADS=1 python tools/calibrate_low_rank.py        # about 35 seconds
"""

from __future__ import annotations

import itertools
import time

import torch

from adamshap_core.engine import low_rank
from adamshap_core.engine.linear import contract_weight

RANK, T = 8, 12
SHAPES = [(32, 32), (128, 32), (32, 128), (300, 32), (64, 64), (256, 64), (128, 128), (512, 128)]
SHAPES += [(256, 256), (1024, 256), (256, 1024), (512, 512), (2048, 512), (1024, 1024)]
MAX_FLOATS = 2**27  # B·T·d_out·d_in above this is left out (memory and time)


def seconds(fn) -> float:
    """Mean seconds per call over about 0.15 s, after 3 calls to warm up."""
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.15:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def sweep() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    points = []
    for (d_out, d_in), K in itertools.product(SHAPES, (1, 3)):
        M = torch.randn(K, d_out, d_in)
        factorizing = seconds(lambda M=M: low_rank.factorize(M, RANK, gen))
        factors = low_rank.factorize(M, RANK, gen)
        for B in (4, 16, 64, 256):
            if B * T * d_out * d_in > MAX_FLOATS:
                continue
            a, b = torch.randn(B, T, d_in), torch.randn(B, T, d_out)
            exact = seconds(lambda a=a, b=b, M=M: contract_weight(a, b, M))
            factored = factorizing + seconds(lambda a=a, b=b, f=factors: contract_weight(a, b, f))
            points.append(dict(d_out=d_out, d_in=d_in, K=K, rows=B * T, exact=exact, factored=factored))
    return points


def mistakes(points: list[dict], passes: int, overhead: int) -> tuple[int, float]:
    """How many points the rule decides wrongly with these constants, and the seconds that costs."""
    wrong = [
        p
        for p in points
        if low_rank.factorizing_pays(p["rows"], p["d_out"], p["d_in"], p["K"], RANK, (passes, overhead))
        != (p["factored"] < p["exact"])
    ]
    return len(wrong), sum(abs(p["factored"] - p["exact"]) for p in wrong)


def main() -> None:
    torch.set_num_threads(1)
    points = sweep()
    pays = sum(p["factored"] < p["exact"] for p in points)
    print(f"{len(points)} shapes timed; factorising pays in {pays}")
    current = (low_rank.FACTORIZE_PASSES, low_rank.FACTORIZE_OVERHEAD)
    n, lost = mistakes(points, *current)
    print(f"current constants {current}: {n} wrong, {lost * 1e3:.2f} ms lost over the sweep")
    overheads = (2_000_000, 5_000_000, 10_000_000, 20_000_000, 40_000_000)
    grid = itertools.product((4, 6, 8, 12, 16, 24), overheads)
    best = min(grid, key=lambda c: mistakes(points, *c)[1])
    n, lost = mistakes(points, *best)
    print(f"best of the grid {best}: {n} wrong, {lost * 1e3:.2f} ms lost over the sweep")


if __name__ == "__main__":
    main()
