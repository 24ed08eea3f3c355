"""Fast-mode settings, shared by the library API (``InRunShapley(fast=...)``) and recipes
(``attribution.fast``). It imports pydantic only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class FastMode(BaseModel):
    """Cheaper, approximate values (their fidelity is measured by ``adamshap bench``, and
    ``adamshap compare`` on a run made with them shows what they cost against ground truth).

    The validation gradient is recomputed at most every ``refresh_every`` steps (after the
    first ``warmup`` steps, where the weights move fastest) and reused in between; the
    preconditioner P is always this step's, so Adam's reaction to the batch is never stale.
    With ``min_pearson``, a step that recomputes ∇val also values its batch with the ∇val it
    replaces and correlates the two; where that falls below ``min_pearson``, ∇val is reused
    for fewer steps (``ReuseSchedule``; ``min_pearson: null``: always ``refresh_every``).
    Weight matrices large enough for it to pay are contracted through a rank-``rank``
    factorisation of M (``rank: null``: never).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    refresh_every: StrictInt = Field(4, ge=1)
    warmup: StrictInt = Field(10, ge=0)
    rank: Annotated[StrictInt, Field(ge=1)] | None = 8
    min_pearson: Annotated[float, Field(ge=0, le=1, strict=True)] | None = 0.99

    @classmethod
    def of(cls, value: bool | FastMode | Mapping | None) -> FastMode | None:
        """The fast mode ``InRunShapley(fast=value)`` asks for: True its defaults, a mapping its settings
        (as the recipe key takes them), False or None none (exact values)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls.model_validate(dict(value))  # pydantic's ValidationError is a ValueError
        raise TypeError(
            f"fast is {value!r}; expected True, False, a FastMode or a mapping of its settings "
            f"({', '.join(cls.model_fields)})"
        )


# while every step recomputes ∇val, the steps between two checks of reuse double after each check,
# up to this: a model where reuse never pays is then checked about every 64 steps
MAX_CHECK_WAIT = 64
# the checks the interval is set from: the worst of these sets it
CHECKS_KEPT = 4
# the fewest examples a check correlates over: a Pearson over two is always ±1, over a few it is noise
MIN_CHECK_ROWS = 8


@dataclass
class ReuseSchedule:
    """Which steps of a fast-mode tracker recompute ∇val, and which of those check what reusing it costs.

    ∇val serves ``interval`` steps, the one that computed it included: it is reused at ages 1 to
    interval − 1. A step that recomputes it after the warm-up may check: it values its batch with the
    ∇val being replaced (of age a) as well, and ``record`` takes the lowest Pearson ρ between the two.
    A stale ∇val's error grows about as its age squared (ρ ≈ 1 − ½θ², the angle θ it drifted by growing
    with each step), so each check gives a drift rate (1 − ρ)/a²; the worst of the last ``CHECKS_KEPT``
    sets the interval to the longest (at most ``refresh_every``) whose oldest reuse it predicts at
    ρ ≥ ``min_pearson``. It starts at 1: the first step after the warm-up checks the ∇val of the step
    before. Every recomputing step checks while ∇val is reused; at interval 1 (every step recomputes
    it, as exact mode) the checks are ``wait`` steps apart, a wait that doubles each time. A batch of
    fewer than ``MIN_CHECK_ROWS`` examples cannot be checked: with only such batches, nothing is reused.
    """

    fast: FastMode
    interval: int = field(init=False)
    age: int = 0  # steps since the kept ∇val was computed
    wait: int = 1
    since_check: int = 0
    rates: list[float] = field(default_factory=list)  # the last checks' drift rates, oldest first
    checked_age: int = 0  # the age of the ∇val this step's check values with

    def __post_init__(self) -> None:
        # with checks, ∇val is reused only once a check has found that it may be: the first step after
        # the warm-up checks the one before it
        self.interval = 1 if self.fast.min_pearson is not None else self.fast.refresh_every

    def advance(self, step: int, kept: bool) -> tuple[bool, bool]:
        """Enter ``step`` (from 1): whether it recomputes ∇val, and whether it checks the reuse.
        ``kept``: a ∇val of an earlier step for this validation target is at hand."""
        self.since_check += 1
        age = self.age + 1
        refresh = not kept or step <= self.fast.warmup or age >= self.interval
        self.age = 0 if refresh else age
        check = (
            refresh
            and kept
            and step > self.fast.warmup
            and self.fast.min_pearson is not None
            and self.fast.refresh_every > 1  # else nothing is ever reused
            and (self.interval > 1 or self.since_check >= self.wait)
        )
        if check:
            self.since_check, self.checked_age = 0, age
        return refresh, check

    def record(self, pearson: float) -> None:
        """This step's check: the lowest Pearson. NaN (constant values, or a batch of fewer than
        ``MIN_CHECK_ROWS`` examples) allows no more reuse than before, and at interval 1 the next
        check still waits longer."""
        floor = self.fast.min_pearson
        if floor is None:
            return
        if not math.isnan(pearson):
            self.rates = [*self.rates, (1 - pearson) / self.checked_age**2][-CHECKS_KEPT:]
            worst = max(self.rates)
            oldest = self.fast.refresh_every - 1  # the oldest reuse the interval may allow
            if worst > 0:
                oldest = min(oldest, math.floor(math.sqrt((1 - floor) / worst)))
            self.interval = oldest + 1
        # at interval 1 each check, with a Pearson or without, puts the next one further off
        self.wait = min(2 * self.wait, MAX_CHECK_WAIT) if self.interval == 1 else 1

    def state_dict(self) -> dict:
        return {"settings": self.fast.model_dump(), **{name: getattr(self, name) for name in _SCHEDULE_STATE}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``. A schedule saved under other fast-mode settings gives only
        the kept ∇val's age: its interval and checks say nothing under these settings."""
        self.age = int(state["age"])
        if state.get("settings") != self.fast.model_dump():
            return
        self.interval, self.wait = int(state["interval"]), int(state["wait"])
        self.since_check = int(state["since_check"])
        self.rates = [float(r) for r in state["rates"]]


_SCHEDULE_STATE = ("interval", "age", "wait", "since_check", "rates")
