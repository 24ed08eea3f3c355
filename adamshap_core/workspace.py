"""Scratch tensors reused from one training step to the next."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch

Views = TypeVar("Views")


class Workspace:
    """Scratch tensors kept from one step to the next, so that the rules allocate nothing large
    after the first step: a fresh large CPU allocation is page-faulted in, which costs more
    than the arithmetic done in it."""

    def __init__(self) -> None:
        self._buffers: dict[object, torch.Tensor] = {}
        # key -> (where the buffer was, its views): each key's views are what its own make returns
        self._views: dict[object, tuple[tuple, Any]] = {}

    def get(
        self, key: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A tensor of ``shape`` to be overwritten: ``key``'s buffer, or the front of it where a smaller
        shape is asked for (blocks of different sizes share one); it grows to the largest asked for."""
        buf = self._buffers.get(key)
        if buf is not None and buf.shape == shape and buf.dtype == dtype and buf.device == device:
            return buf  # the common case: the shape of the step before
        numel = math.prod(shape)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
            return buf
        return buf.view(-1)[:numel].view(shape)

    def views(self, key: object, buf: torch.Tensor, make: Callable[[torch.Tensor], Views]) -> Views:
        """``make(buf)``, views of a buffer from ``get``, kept under ``key`` and made again only when
        the buffer has moved or changed shape or dtype: on a small model a view per tensor per step
        costs more than the arithmetic done in it. A kept view holds its storage, so no other
        buffer can take its address."""
        where = (buf.data_ptr(), buf.shape, buf.dtype)
        kept = self._views.get(key)
        if kept is None or kept[0] != where:
            kept = self._views[key] = (where, make(buf))
        return kept[1]
