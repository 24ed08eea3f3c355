"""A batch's inputs or targets as the library API takes them: a tensor, or a dict, list or tuple (a
named tuple too) of them, nested as a model's ``forward`` or a loss needs, with the rows along the
first dimension of each tensor. Anything else in them (a flag, a string, a 0-d tensor) is passed
along unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Any

import torch


def row_tensors(batch: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``batch`` that have rows, in order."""
    if isinstance(batch, torch.Tensor):
        if batch.dim():
            yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from row_tensors(value)
    elif isinstance(batch, list | tuple):
        for value in batch:
            yield from row_tensors(value)


def n_rows(batch: Any) -> int | None:
    """The rows of ``batch``: its first tensor's first dimension (None: it holds no tensor with rows)."""
    first = next(row_tensors(batch), None)
    return None if first is None else first.shape[0]


def check_rows(inputs: Any, targets: Any, what: str) -> None:
    """Raise ``ValueError`` unless ``targets`` hold one row per row of ``inputs``: the valuation
    takes examples apart by row, as a per-row loss does."""
    n_in, n_out = n_rows(inputs), n_rows(targets)
    if n_in is not None and n_out is not None and n_in != n_out:
        raise ValueError(
            f"{what}'s inputs hold {n_in} rows but its targets {n_out}: expected one target row per "
            "input row (targets flattened over positions, say, must keep the batch dimension)"
        )


def is_empty(batch: Any) -> bool:
    """Whether ``batch`` holds no row (a container without tensors: whether it holds nothing)."""
    rows = n_rows(batch)
    return rows == 0 if rows is not None else isinstance(batch, Sized) and len(batch) == 0


def take_rows(batch: Any, start: int, stop: int) -> Any:
    """``batch`` with every tensor cut to its rows ``start:stop``."""
    return _map(batch, lambda t: t[start:stop])


def first_row_again(batch: Any) -> Any:
    """``batch`` with its first row appended again to every tensor with its rows; a tensor of another
    length (one row broadcast over the batch, such as ``position_ids`` of shape [1, T]) is left as
    it is, as ``take_rows`` leaves it whole."""
    rows = n_rows(batch)
    return _map(batch, lambda t: torch.cat([t, t[:1]]) if t.shape[0] == rows else t)


def pick_rows(batch: Any, index: torch.Tensor) -> Any:
    """``batch`` with every tensor reduced to the rows ``index`` (under ``vmap``, a batched index picks
    each row in turn)."""
    return _map(batch, lambda t: t.index_select(0, index))


def _map(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to each tensor that has rows, its containers rebuilt."""
    if isinstance(batch, torch.Tensor):
        return fn(batch) if batch.dim() else batch
    if isinstance(batch, dict):
        return type(batch)((k, _map(v, fn)) for k, v in batch.items())
    if isinstance(batch, Mapping):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(_map(v, fn) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_map(v, fn) for v in batch)
    return batch
