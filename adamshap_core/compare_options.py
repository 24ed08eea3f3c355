"""``adamshap compare``'s options and their defaults, apart from the comparison itself so that the
command line can show the defaults in ``--help`` without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

# Permutations per step: the evaluated steps are compared one by one, so their estimates must be
# precise; the cumulative sums add ~10 steps per example, which averages the noise away (on the
# default recipe, se/sd of the sums is ~5e-5 with 4 permutations per step), and there are hundreds.
DEFAULT_PERMUTATIONS = 32
DEFAULT_CUMULATIVE_PERMUTATIONS = 4


@dataclass
class CompareOptions:
    baseline: str | None = None  # None: sgd where the run valued it, else its first method after adam
    steps: str = "auto"  # "auto" (the recorded steps) or a list such as "1-5,50,100"
    permutations: int = DEFAULT_PERMUTATIONS  # at the evaluated steps
    cumulative: bool = True
    cumulative_permutations: int = DEFAULT_CUMULATIVE_PERMUTATIONS  # at the other steps of the run
    seed: int = 0  # seeds the permutations (one generator per step)
