"""Scratch tensors reused from one training step to the next."""

from __future__ import annotations

import math

import torch


class Workspace:
    """Scratch tensors kept from one step to the next, so that the rules allocate nothing large
    after the first step: a fresh large CPU allocation is page-faulted in, which costs more
    than the arithmetic done in it."""

    def __init__(self):
        self._buffers: dict[object, torch.Tensor] = {}

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
