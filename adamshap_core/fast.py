"""Fast-mode settings, shared by the library API (``InRunShapley(fast=...)``) and recipes
(``attribution.fast``). It needs pydantic only, as the recipe schema does."""

from __future__ import annotations

from collections.abc import Mapping
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
