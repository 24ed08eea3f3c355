"""A model's buffers, kept across a pass the valuation adds (the validation pass, a check).

Plain training runs one forward per step. A module that updates a buffer in its forward (a running
mean of its inputs, a quantisation observer's range, a call counter) would see every extra pass too,
and training would then depart from plain training's. So each extra pass leaves the buffers as it
found them: in place where a buffer was changed in place, and as the same tensor where one was
replaced or added.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class Buffers:
    """The modules' buffers as they are when this is made: which a pass then changed, and putting
    them back."""

    def __init__(self, modules: Sequence[nn.Module]):
        self._names = [(m, set(m._buffers)) for m in modules]
        self._kept = [
            (m, name, buf, _version(buf), buf.clone())
            for m in modules
            for name, buf in m._buffers.items()
            if buf is not None
        ]

    def changed(self) -> list[tuple[nn.Module, str]]:
        """(module, name) of every buffer changed in place, replaced or added since."""
        out = [
            (m, name)
            for m, name, buf, version, copy in self._kept
            if m._buffers.get(name) is not buf or _changed_in_place(buf, version, copy)
        ]
        return out + [(m, name) for m, names in self._names for name in m._buffers.keys() - names]

    def restore(self) -> None:
        for m, names in self._names:
            if m._buffers.keys() != names:
                for name in m._buffers.keys() - names:
                    del m._buffers[name]
        for m, name, buf, version, copy in self._kept:
            m._buffers[name] = buf
            if _changed_in_place(buf, version, copy):
                with torch.inference_mode():  # which may write into an inference tensor, as into any other
                    buf.copy_(copy)


@contextmanager
def buffers_kept(modules: Sequence[nn.Module]) -> Iterator[Buffers]:
    """Afterwards every module's buffers are as before the block."""
    kept = Buffers(modules)
    try:
        yield kept
    finally:
        kept.restore()


def _changed_in_place(buf: torch.Tensor, version: int | None, copy: torch.Tensor) -> bool:
    if version is None:
        return not torch.equal(buf, copy)
    return _version(buf) != version


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter, which every in-place change advances (None: an inference
    tensor, which keeps none)."""
    return None if t.is_inference() else t._version
