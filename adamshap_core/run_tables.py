"""The schema of a run folder's files (README: Run folders), checked on write and before a run is read.

``check_frame(name, df)`` checks one table against its schema: the required columns, their
kinds, unique example ids and (where the frame has rows) that no value is NaN or infinite.
``runio.RunFolder.write_parquet`` calls it on every table it knows before writing, so a
malformed table or a NaN value is never written silently. ``RunFolder.require_complete`` checks
a finished run's tables with ``table_problems`` before a command reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SCHEMA_VERSION = 1  # written into every run's metrics.json
KNOWN_SCHEMA_VERSIONS = (1,)
VALUE_PREFIX = "value_"


def value_column(method: str) -> str:
    """The column of ``method``'s values in values.parquet and steps_values.parquet."""
    return VALUE_PREFIX + method


def reused_val_grads(steps: pd.DataFrame) -> pd.Series:
    """Per row of steps.parquet: whether that step's values reused the validation gradient of an
    earlier step (the fast mode's reuse), which such a step records as no validation loss (NaN)."""
    return steps["val_loss"].isna()


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "int", "float", "bool" or "any"
    required: bool = True


TABLES: dict[str, tuple[Column, ...]] = {
    "values.parquet": (
        Column("example_id", "int"),
        Column("n_steps", "int"),
        Column("label", "any", required=False),  # a text corpus has texts instead of labels
        Column("is_noisy", "bool", required=False),
        Column("clean_label", "any", required=False),
        Column("source_row", "int", required=False),
    ),
    "steps.parquet": (  # in the order the training loop records a step (STEP_COLUMNS)
        Column("step", "int"),
        Column("epoch", "int", required=False),
        Column("lr", "float"),
        Column("train_loss", "float"),
        Column("val_loss", "float"),
        Column("clip_factor", "float", required=False),
        Column("seconds", "float"),
        Column("reuse_pearson", "float", required=False),
    ),
    "steps_values.parquet": (Column("step", "int"), Column("example_id", "int")),
}
# a step's row as the training loop records it, and the order of steps.parquet's columns; a checkpoint
# keeps the rows by position, so a change of this order is a new checkpoint FORMAT (a test pins it)
STEP_COLUMNS = tuple(c.name for c in TABLES["steps.parquet"])
UNIQUE_KEYS = {"values.parquet": ("example_id",), "steps_values.parquet": ("step", "example_id")}

_KIND_CHECKS = {
    "int": pd.api.types.is_integer_dtype,
    "float": pd.api.types.is_float_dtype,
    "bool": pd.api.types.is_bool_dtype,
    "any": lambda dtype: True,
}


def table_problems(name: str, df: pd.DataFrame, methods: list[str] | None = None) -> list[str]:
    """What is wrong with table ``name`` (empty when it matches its schema, or has none).

    ``methods``: the methods whose ``value_<method>`` columns must be there; every
    ``value_*`` column present must hold finite floats either way.
    """
    if name not in TABLES:
        return []
    problems = []
    for col in TABLES[name]:
        if col.name not in df.columns:
            if col.required:
                problems.append(f"column `{col.name}` is missing")
        elif not _KIND_CHECKS[col.kind](df[col.name].dtype):
            problems.append(f"column `{col.name}` has type {df[col.name].dtype}; expected {col.kind}")
    if name != "steps.parquet":
        problems += _value_problems(df, methods or [])
    key = [k for k in UNIQUE_KEYS.get(name, ()) if k in df.columns]
    if key and len(key) == len(UNIQUE_KEYS[name]) and df.duplicated(subset=key).any():
        problems.append(f"rows repeat the key ({', '.join(key)})")
    return problems


def _value_problems(df: pd.DataFrame, methods: list[str]) -> list[str]:
    problems = [f"column `{value_column(m)}` is missing" for m in methods if value_column(m) not in df]
    for c in (c for c in df.columns if str(c).startswith(VALUE_PREFIX)):
        if not pd.api.types.is_float_dtype(df[c].dtype):
            problems.append(f"column `{c}` has type {df[c].dtype}; expected float")
        else:
            bad = int((~np.isfinite(df[c].to_numpy(dtype=np.float64))).sum())
            if bad:
                problems.append(f"column `{c}` holds {bad} NaN or infinite value(s)")
    return problems


def check_frame(name: str, df: pd.DataFrame, methods: list[str] | None = None) -> None:
    """Raise ``ValueError`` when table ``name`` does not match its schema (never write it then)."""
    problems = table_problems(name, df, methods)
    if problems:
        raise ValueError(f"refusing to write {name}: " + "; ".join(problems))
