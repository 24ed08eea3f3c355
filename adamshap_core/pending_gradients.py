"""Gradients written into ``.grad`` that no optimizer step has used yet: a backward pass of the
user's own before ``InRunShapley.step``, such as the first micro-batches of an accumulated step.
``step`` computes its batch's gradient itself and zeroes ``.grad`` first, as ``zero_grad()`` does,
so it would silently drop them and update on its batch alone; it refuses instead.

Every optimizer step, whoever takes it (the tracker's, or a plain step of the user's between
valued ones), marks the gradients it leaves in ``.grad`` as used; a gradient is pending where it
is not the tensor an optimizer step left, or has been written to since, and is not all zeros. A
step skipped for non-finite gradients (``GradScaler`` on an overflow) leaves them unused, and the
user would drop them too: pending gradients with an inf or NaN among them are not refused.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


class PendingGradients:
    """Watches the optimizer's parameters; ``problem()`` names one that holds a pending gradient."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in held]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.used: list[tuple[weakref.ref, int] | None] = []
        self.mark_used()  # what is in .grad when the tracker starts (a plain step's, say) is not pending
        self.handle = optimizer.register_step_post_hook(lambda *_: self.mark_used())

    def mark_used(self) -> None:
        # weak references: the next step's backward must be free to drop these tensors (set_to_none)
        self.used = [None if (g := p.grad) is None else (weakref.ref(g), g._version) for p in self.params]

    def problem(self) -> str | None:
        """Why the next step would drop gradients of the user's (None: there are none to drop)."""
        pending = [
            (name, grad)
            for name, p, used in zip(self.names, self.params, self.used, strict=True)
            if (grad := p.grad) is not None
            and not (used is not None and grad._version == used[1] and used[0]() is grad)
        ]  # each one an optimizer step did not leave as it is
        pending = [(name, grad) for name, grad in pending if bool(grad.any())]  # else zeroed in place
        if not pending or any(not bool(torch.isfinite(grad).all()) for _, grad in pending):
            return None  # nothing to drop, or a step skipped for non-finite gradients (GradScaler's), dropped
        return (
            f"'{pending[0][0]}' holds a gradient that no optimizer step has used (a backward pass since "
            "the last step: accumulating micro-batches?); step computes its batch's gradient itself and "
            "would drop it. Expected the micro-batches joined into one batch for step, or "
            "optimizer.zero_grad() before it"
        )

    def remove(self) -> None:
        self.handle.remove()
