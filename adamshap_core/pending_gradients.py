"""Gradients written into ``.grad`` that no optimizer step has used yet: a backward pass of the
user's own before ``InRunShapley.step``, such as the first micro-batches of an accumulated step.
``step`` computes its batch's gradient itself and zeroes ``.grad`` first, as ``zero_grad()`` does,
so it would silently drop them and update on its batch alone; it refuses instead.

Every optimizer step, whoever takes it (the tracker's, or a plain step of the user's between
valued ones), marks the gradients it leaves in ``.grad`` as used; a gradient is pending where it
is not the tensor an optimizer step left, or has been written to since, and is not all zeros.
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
        for name, p, used in zip(self.names, self.params, self.used, strict=True):
            grad = p.grad
            if grad is None or (used is not None and grad._version == used[1] and used[0]() is grad):
                continue  # none, or the one an optimizer step left
            if bool(grad.any()):  # else zeroed in place (zero_grad(set_to_none=False)): nothing to drop
                return (
                    f"'{name}' holds a gradient that no optimizer step has used (a backward pass since the "
                    "last step: accumulating micro-batches?); step computes its batch's gradient itself "
                    "and would drop it. Expected the micro-batches joined into one batch for step, or "
                    "optimizer.zero_grad() before it"
                )
        return None

    def remove(self) -> None:
        self.handle.remove()
