"""The schema of a run folder's files (DESIGN.md §7), checked on write and before a run is read.

``check_frame(name, df)`` checks one table against its schema: the required columns, their
kinds, unique example ids and (where the frame has rows) that no value is NaN or infinite.
``runio.RunFolder.write_parquet`` calls it on every table it knows before writing, so a
malformed table or a NaN value is never written silently. ``check_complete_run(folder)`` is
what commands that read a finished run (``compare``, ``prune``, ``attribute``) call, through
``runio.open_complete_run`` / ``RunFolder.require_complete``: it refuses a run whose
``metrics.json`` is missing, carries an unknown ``schema_version`` or says the run is not
complete, and a run whose tables are missing or do not match their schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .errors import UserError

if TYPE_CHECKING:
    from .runio import RunFolder

SCHEMA_VERSION = 1  # written into every run's metrics.json
KNOWN_SCHEMA_VERSIONS = (1,)
VALUE_PREFIX = "value_"


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
    "steps.parquet": (
        Column("step", "int"),
        Column("lr", "float"),
        Column("train_loss", "float"),
        Column("val_loss", "float"),
        Column("seconds", "float"),
        Column("epoch", "int", required=False),
        Column("clip_factor", "float", required=False),
    ),
    "steps_values.parquet": (Column("step", "int"), Column("example_id", "int")),
}
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
    problems = [f"column `{VALUE_PREFIX}{m}` is missing" for m in methods if VALUE_PREFIX + m not in df]
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


# --------------------------------------------------------------------------- reading a finished run


def check_complete_run(folder: RunFolder) -> dict:
    """The run's metrics when it is complete and its files match the schema; else a ``UserError``."""
    metrics = _read_metrics(folder)
    version = metrics.get("schema_version")
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise UserError(
            f"run {folder.name!r} was written with run-folder schema version {version!r}; this adamshap "
            f"reads version {', '.join(map(str, KNOWN_SCHEMA_VERSIONS))}. Train the run again with this "
            "adamshap, or use the adamshap version that wrote it."
        )
    status = metrics.get("status")
    if status != "complete":
        raise UserError(f"run {folder.name!r} is {status or 'of unknown status'}: {_incomplete_hint(folder)}")
    from .runio import RUN_FILES

    missing = [f for f in RUN_FILES if not folder.file(f).is_file()]
    if missing:
        raise UserError(
            f"run {folder.name!r} says it is complete but lacks {', '.join(missing)} (in {folder.path}); "
            "train it again."
        )
    methods = list(metrics.get("methods") or [])
    for name in TABLES:
        problems = table_problems(name, _empty_frame(folder, name), methods)
        if problems:
            raise UserError(
                f"run {folder.name!r}: {name} does not match the run-folder schema ({'; '.join(problems)}); "
                "train the run again."
            )
    return metrics


def _read_metrics(folder: RunFolder) -> dict:
    p = folder.file("metrics.json")
    try:
        metrics = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder.path} has no metrics.json; expected an adamshap run folder.") from None
    except (OSError, ValueError) as e:
        raise UserError(f"run {folder.name!r}: metrics.json cannot be read ({e}); train it again.") from None
    if not isinstance(metrics, dict):
        raise UserError(f"run {folder.name!r}: metrics.json is not a JSON object; train it again.")
    return metrics


def _incomplete_hint(folder: RunFolder) -> str:
    from .checkpoint import CHECKPOINT_FILE
    from .runio import resume_command

    metrics = _read_metrics(folder)
    why = f"it stopped with: {metrics['error']} " if metrics.get("error") else ""
    if folder.file(CHECKPOINT_FILE).is_file():
        return (
            f"{why}Finish it with `{resume_command(folder.path)}` first; commands that read a "
            "run need a complete one."
        )
    return (
        f"{why}It has no checkpoint to resume from; train it again. Commands that read a run need a "
        "complete one."
    )


def _empty_frame(folder: RunFolder, name: str) -> pd.DataFrame:
    """The table's columns and types without reading its rows (cheap for any size of run)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(folder.file(name)).empty_table().to_pandas()
    except Exception as e:  # noqa: BLE001 -- an unreadable file is one problem for the user
        raise UserError(f"run {folder.name!r}: {name} cannot be read ({e}); train the run again.") from None
