"""Fast-mode settings, shared by the library API (``InRunShapley(fast=...)``) and recipes
(``attribution.fast``). It needs pydantic only, as the recipe schema does."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class FastMode(BaseModel):
    """Cheaper, approximate values (their fidelity is measured by ``adamshap bench``, and
    ``adamshap compare`` on a run made with them shows what they cost against ground truth).

    The validation gradient is recomputed only every ``refresh_every`` steps (after the
    first ``warmup`` steps, where the weights move fastest) and reused in between; the
    preconditioner P is always this step's, so Adam's reaction to the batch is never stale.
    Weight matrices large enough for it to pay are contracted through a rank-``rank``
    factorisation of M (``rank: null``: never).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    refresh_every: StrictInt = Field(4, ge=1)
    warmup: StrictInt = Field(10, ge=0)
    rank: Annotated[StrictInt, Field(ge=1)] | None = 8
