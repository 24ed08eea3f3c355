"""Datasets: built-in sources and a registry for more (see ``registry.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError
from . import tabular, text  # noqa: F401  (registration: sklearn:, csv:, parquet:, jsonl:, text:, builtin:)
from .dataset import Dataset
from .registry import (
    SOURCES,
    check_source,
    register_source,
    split_source,
    takes_path,
)
from .text import TextDataset

if TYPE_CHECKING:
    from ..recipe import DataCfg

__all__ = [
    "Dataset",
    "SOURCES",
    "TextDataset",
    "check_source",
    "load_dataset",
    "register_source",
    "split_source",
    "takes_path",
]


def load_dataset(cfg: DataCfg, *, image: bool = False) -> Dataset:
    """Build the dataset a recipe's ``data`` section describes (``image``: the model wants images)."""
    try:
        check_source(cfg.source)
    except ValueError as e:
        raise UserError(f"`data.source`: {e}.") from None
    scheme, rest = split_source(cfg.source)
    return SOURCES[scheme].loader(rest, cfg, image=image)
