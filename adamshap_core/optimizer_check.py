"""Whether the optimizer steps as the torch class whose rule the values read.

``OptimizerView`` reads a live optimizer by its torch base class (Adam, AdamW or SGD). A subclass
whose ``step`` computes another update (another rule, a rescaled step, state kept under other names)
would be valued by the base class's rule, silently. So the tracker's first steps replay a sample of
every parameter's coordinates through the base class itself and compare the two updates. The rules
are elementwise (clipping happens before the step), so a sample shows a departure, at a cost that
does not grow with the model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

# coordinates sampled per parameter, spread evenly over it
SAMPLE = 64
# the tracker's first steps that are checked: the first (zero moments) and one with moments
CHECKED_STEPS = 2
# the real and the replayed update may differ by rounding: a relative tolerance on the update, and one
# on the weights, where the update is below their rounding
UPDATE_RTOL = 1e-3
WEIGHT_RTOL = 1e-6

Base = type[torch.optim.Adam] | type[torch.optim.SGD]  # AdamW is an Adam
BASES: tuple[Base, ...] = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


def base_class(optimizer: torch.optim.Optimizer) -> Base:
    """The torch class whose rule ``OptimizerView`` reads this optimizer by: the first of its MRO that
    is one of ``BASES``."""
    return next(base for t in type(optimizer).__mro__ for base in BASES if t is base)


def gradient_hook(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> str | None:
    """Why the gradients the values are read from might not be those the optimizer steps with: a
    hook that runs on a parameter's summed gradient (``p.register_hook``, a post-accumulate-grad
    hook) or before the update (an optimizer step pre-hook) may change them, by clipping each
    coordinate, say, or compressing them; each example's part of the changed gradient is then
    unknown (None: no such hook). Read every step: a hook may be registered at any time."""
    expected = "expected none: clip by norm with max_grad_norm=, and leave other hooks to after the step"
    for p in params:
        # where torch keeps them: dicts, or None
        for kind, hooks in (
            ("a", p._backward_hooks),
            ("a post-accumulate-grad", p._post_accumulate_grad_hooks),
        ):
            if hooks:
                return (
                    f"a parameter of shape {tuple(p.shape)} has {kind} hook, which may change its gradient "
                    f"after the examples' parts were summed into it; {expected}"
                )
    if getattr(optimizer, "_optimizer_step_pre_hooks", None) or _global_step_pre_hooks():
        return (
            f"{type(optimizer).__name__} has a step pre-hook, which runs inside optimizer.step() and may "
            f"change the gradients after the values read them; {expected}"
        )
    return None


def _global_step_pre_hooks() -> dict:
    """The hooks ``torch.optim.optimizer.register_optimizer_step_pre_hook`` registers for every optimizer."""
    return getattr(torch_optimizer, "_global_optimizer_pre_hooks", None) or {}


class StepSample:
    """A sample of the coordinates of every parameter the optimizer is about to step: the weights, their
    gradient and the optimizer's state there. Take it after the backward pass and clipping, just before
    ``optimizer.step()``; ``gap`` after it."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        self.base = base_class(optimizer)
        self.kind = type(optimizer).__name__
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.taken: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.groups: list[dict] = []
        self.state: dict[torch.Tensor, dict] = {}
        for group in optimizer.param_groups:
            samples = []
            for p in group["params"]:
                if p.grad is None or p.grad.is_sparse or p.numel() == 0:
                    continue  # the optimizer does not move it, or a rule for dense weights cannot
                at = _spread(p.numel(), p.device)
                weights = _take(p.detach(), at)
                sample = weights.clone()
                sample.grad = _take(p.grad, at)
                self.state[sample] = {
                    k: _take(v, at) if _per_coordinate(v, p) else (v.clone() if torch.is_tensor(v) else v)
                    for k, v in optimizer.state.get(p, {}).items()
                }
                samples.append(sample)
                self.taken.append((p, at, weights, sample))
            self.groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": samples})

    def gap(self) -> str | None:
        """After ``optimizer.step()``: why the real step departs from the base class's on the sample
        (None: it does not)."""
        if not self.taken:
            return None
        base = f"torch.optim.{self.base.__name__}"
        try:
            replay = self.base(self.groups)
            replay.state.update(self.state)
            with torch.no_grad():
                replay.step()
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            return self._message(base, f"its state is not {base}'s ({type(e).__name__}: {e})")
        for p, at, before, want in self.taken:
            got = _take(p.detach(), at)
            if not _agree(got, want, before):
                name = self.names.get(id(p), f"a parameter of shape {tuple(p.shape)}")
                return self._message(base, f"it moved '{name}' otherwise than {base}'s step would")
        return None

    def _message(self, base: str, what: str) -> str:
        return (
            f"optimizer {self.kind} is valued by the rule of {base}, and {what} (does a subclass change "
            "the update?); expected an optimizer whose step is that of torch.optim.Adam, AdamW or SGD"
        )


def _agree(got: torch.Tensor, want: torch.Tensor, before: torch.Tensor) -> bool:
    """Whether the real step ``got`` is the replayed ``want`` up to rounding, and non-finite at the same
    coordinates (a diverging step is the training loop's to report)."""
    finite = want.isfinite() & before.isfinite()
    if not torch.equal(got.isfinite(), want.isfinite()):
        return False
    got, want, before = got[finite], want[finite], before[finite]
    tolerance = UPDATE_RTOL * float((want - before).norm()) + WEIGHT_RTOL * float(before.norm())
    return float((got - want).norm()) <= tolerance


def _spread(n: int, device: torch.device) -> torch.Tensor:
    """At most ``SAMPLE`` flat indices, spread evenly over n coordinates (whole numbers throughout: a
    float32 ``linspace`` rounds n − 1 up to n past 2^24 coordinates)."""
    k = min(n, SAMPLE)
    return (torch.arange(k, device=device) * (n - 1) // max(k - 1, 1)).unique()


def _take(t: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)[at].detach()


def _per_coordinate(value: object, p: torch.Tensor) -> bool:
    """Whether a state entry holds one number per coordinate of the parameter (a moment, a buffer)."""
    return torch.is_tensor(value) and value.shape == p.shape
