"""A model's buffers, kept across a pass the valuation adds (the validation pass, a check).

Plain training runs one forward per step. A module that updates a buffer in its forward (a running
mean of its inputs, a quantisation observer's range, a call counter) would see every extra pass too,
and training would then depart from plain training's. So each extra pass leaves the buffers as it
found them: in place where a buffer was changed in place, and as the same tensor where one was
replaced. A buffer a pass adds (state a module makes on its first call) cannot be taken back with
the rest of that module's state, so it is refused.

Copying every buffer before every pass would cost a large constant buffer (an attention mask of
4096² floats) far more than the pass itself; ``copied`` names the buffers to copy, and the others
are watched by their version counters alone (``GhostEngine`` copies those the first pass changed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ..errors import UserError


class Buffers:
    """The model's buffers as they are when this is made: which a pass then changed, and putting
    them back. ``copied``: the ids of the buffers to copy (None: all), the only ones that can be put
    back after an in-place change; a lazy module's uninitialised buffer is left to it (plain training
    initialises it the same way at its first call)."""

    def __init__(self, model: nn.Module, copied: set[int] | None = None):
        modules = list(model.named_modules())
        self._names = [(path, m, set(m._buffers)) for path, m in modules]
        self._kept = [
            (path, m, name, buf, _version(buf), _copy(buf, copied))
            for path, m in modules
            for name, buf in m._buffers.items()
            if buf is not None and not is_lazy(buf)
        ]

    def changed(self) -> list[tuple[str, str, torch.Tensor]]:
        """(module path, name, the buffer as it was) of every buffer replaced or changed in place since."""
        return [
            (path, name, buf)
            for path, m, name, buf, version, copy in self._kept
            if m._buffers.get(name) is not buf or _changed_in_place(buf, version, copy)
        ]

    def restore(self) -> None:
        """Every buffer as it was; a ``UserError`` after that where one cannot be: added, or changed in
        place without a copy."""
        added = [(path, m, name) for path, m, names in self._names for name in m._buffers.keys() - names]
        for _, m, name in added:
            del m._buffers[name]
        lost = []
        for path, m, name, buf, version, copy in self._kept:
            m._buffers[name] = buf
            if _changed_in_place(buf, version, copy):
                if copy is None:
                    lost.append((path, name))
                    continue
                with torch.inference_mode():  # which may write into an inference tensor, as into any other
                    buf.copy_(copy)
        if added:
            path, _, name = added[0]
            raise UserError(
                f"'{path or '<root>'}' registered a buffer '{name}' in a pass the valuation added (the "
                "validation pass or a check), before training's own first call could; expected the "
                "module's buffers made in its __init__"
            )
        if lost:
            path, name = lost[0]
            raise UserError(
                f"'{path or '<root>'}' changed its buffer '{name}' in the validation pass, which it left "
                "alone on the first one, so it was not copied and cannot be put back: this run would now "
                "depart from plain training's; expected a module that updates a buffer on every pass or "
                "on none"
            )


@contextmanager
def buffers_kept(model: nn.Module, copied: set[int] | None = None) -> Iterator[Buffers]:
    """Afterwards every buffer of the model is as before the block (``Buffers.restore``)."""
    kept = Buffers(model, copied)
    try:
        yield kept
    finally:
        kept.restore()


def _copy(buf: torch.Tensor, copied: set[int] | None) -> torch.Tensor | None:
    # an inference tensor keeps no version counter: only a copy can tell whether it changed
    if copied is None or id(buf) in copied or buf.is_inference():
        return buf.clone()
    return None


def _changed_in_place(buf: torch.Tensor, version: int | None, copy: torch.Tensor | None) -> bool:
    if version is not None:
        return _version(buf) != version
    assert copy is not None  # _copy keeps one of every inference tensor
    same = buf == copy
    if buf.is_floating_point() or buf.is_complex():
        same |= buf.isnan() & copy.isnan()  # a NaN left alone is not a change
    return not bool(same.all())


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter, which every in-place change advances (None: an inference
    tensor, which keeps none)."""
    return None if t.is_inference() else t._version
