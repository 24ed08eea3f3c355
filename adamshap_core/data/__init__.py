"""Datasets: built-in sources and a registry for more (see ``registry.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError
from . import tabular  # noqa: F401  (registers sklearn:, csv:, parquet:)
from .dataset import Dataset
from .registry import SOURCES, check_source, known_sources, register_source, split_source

if TYPE_CHECKING:
    from ..recipe import DataCfg

__all__ = [
    "Dataset",
    "SOURCES",
    "check_source",
    "known_sources",
    "load_dataset",
    "register_source",
    "split_source",
]


def load_dataset(cfg: DataCfg, *, image: bool = False) -> Dataset:
    """Build the dataset a recipe's ``data`` section describes (``image``: the model wants images)."""
    try:
        check_source(cfg.source)
    except ValueError as e:
        raise UserError(f"`data.source`: {e}.") from None
    scheme, rest = split_source(cfg.source)
    return SOURCES[scheme].loader(rest, cfg, image=image)
