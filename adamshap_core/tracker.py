"""The public in-loop API: one training step that also values every example.

``InRunShapley.step`` makes exactly the update plain training makes
(``loss_fn(model(x), y).mean().backward(); clip; optimizer.step()``) and, in
the same pass, returns each example's per-step value under every method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .engine import GhostEngine
from .errors import UserError
from .precond import METHODS, OptimizerView, check_methods, scales


@dataclass(frozen=True)
class FastMode:
    """Cheaper, approximate values (their fidelity is measured by ``adamshap bench``).

    Weight matrices are contracted through a rank-``rank`` factorisation of M.
    Optionally (``refresh_every`` > 1) ∇val with P (hence M) is recomputed only
    every ``refresh_every`` steps after the first ``warmup`` steps, and the
    cached M is rescaled by the current learning rate and clip factor in
    between; that saves the validation pass but P then lags the batch, which
    costs fidelity early in training (measure it before relying on it).
    """

    rank: int = 8
    refresh_every: int = 1
    warmup: int = 0

    def __post_init__(self):
        if self.rank < 1 or self.refresh_every < 1 or self.warmup < 0:
            raise UserError(f"fast mode needs rank >= 1, refresh_every >= 1 and warmup >= 0; got {self}")


@dataclass
class _Cached:
    """M from the last refresh, with the learning rates and clip factor folded into it."""

    matrices: object
    lrs: list[float]
    clip: float
    val_loss: float


@dataclass
class StepResult:
    """What one valued step returns."""

    loss: float  # the batch training loss (mean of per-example losses)
    val_loss: float  # validation loss at the weights before the update
    clip_factor: float  # c = min(1, max_norm / ||g||); 1.0 without clipping
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # [B] or [B, Q]


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    inputs,
    targets,
    max_grad_norm: float | None = None,
    before_update: Callable[[torch.Tensor, float], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """Plain training's step; the one code path both plain and valued training use.

    ``before_update(per_example_losses, clip_factor)`` runs after the backward
    pass and clipping, before ``optimizer.step()``: this is where values are
    computed, from the state the optimizer is about to use.
    Returns the per-example losses (detached) and the clip factor.
    """
    optimizer.zero_grad(set_to_none=True)
    losses = loss_fn(model(inputs), targets)
    if losses.dim() != 1:
        raise ValueError(f"loss_fn must return per-example losses of shape [B], got {tuple(losses.shape)}")
    losses.mean().backward()
    clip = 1.0
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.grad is not None], max_grad_norm
        )
        # torch's own rule: scale by max_norm / (norm + 1e-6) when that is < 1.
        clip = min(1.0, float(max_grad_norm) / (float(norm) + 1e-6))
    if before_update is not None:
        before_update(losses.detach(), clip)
    optimizer.step()
    return losses.detach(), clip


class InRunShapley:
    """Values every training example during training (DESIGN.md §2–3, §7).

    ``loss_fn(outputs, targets)`` returns per-example losses [B]. The
    validation utility is the mean validation loss; with ``per_target=True``
    each validation row is a separate target and values have shape [B, Q].
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable,
        val_inputs,
        val_targets,
        methods: Sequence[str] = ("adam", "sgd"),
        *,
        max_grad_norm: float | None = None,
        per_target: bool = False,
        fast: bool | FastMode = False,
    ):
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.methods = check_methods(methods)
        self.max_grad_norm = max_grad_norm
        self.fast = FastMode() if fast is True else (fast or None)
        self._cache: _Cached | None = None
        self._steps = 0
        self.view = OptimizerView(optimizer)  # validates the optimizer up front
        # validates every trainable parameter up front; the flat layout follows the optimizer
        self.engine = GhostEngine(model, order=[p for g in optimizer.param_groups for p in g["params"]])
        self.set_validation(val_inputs, val_targets, per_target=per_target)

    def set_validation(self, val_inputs, val_targets, *, per_target: bool = False) -> None:
        """Change the validation target(s) the next steps are valued against."""
        self.val_inputs = val_inputs
        self.val_targets = val_targets
        self.per_target = per_target
        self._cache = None  # a new target needs a new ∇val

    def step(self, inputs, targets) -> StepResult:
        """Forward, backward, optimizer.step(), and this step's value per example."""
        self._steps += 1
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        refresh = self._needs_refresh(lrs)
        if refresh:
            val_grads, val_loss = self.engine.validation_gradients(
                self.loss_fn, self.val_inputs, self.val_targets, self.per_target
            )
        else:
            val_loss = math.nan  # not measured on steps that reuse the cached ∇val
        out: dict[str, torch.Tensor] = {}

        def value_batch(losses: torch.Tensor, clip: float) -> None:
            B = len(losses)
            if refresh:
                segments = self.view.segments(self.engine.parameters)
                per_method = [scales(m, segments, clip) for m in self.methods]
                M = self.engine.matrices(val_grads, per_method, rank=self.fast.rank if self.fast else None)
                if self.fast:
                    self._cache = _Cached(M, lrs, clip, val_loss)
                rescale = None
            else:
                M = self._cache.matrices
                rescale = self._rescale(lrs, clip)
            values = self.engine.contract(M, B).view(B, len(self.methods), -1)  # [B, methods, Q]
            if rescale is not None:
                values = values * rescale.to(values)[None, :, None]
            for k, m in enumerate(self.methods):
                v = values[:, k]
                out[m] = v if self.per_target else v[:, 0]

        with self.engine.capture():
            losses, clip = training_step(
                self.model, self.optimizer, self.loss_fn, inputs, targets, self.max_grad_norm, value_batch
            )
        return StepResult(float(losses.mean()), val_loss, clip, out)

    def _needs_refresh(self, lrs: list[float]) -> bool:
        fast, cache = self.fast, self._cache
        if fast is None or cache is None or self._steps <= fast.warmup:
            return True
        if (self._steps - fast.warmup) % fast.refresh_every == 0:
            return True
        # the cached M can be rescaled only if every group's lr moved by the same factor
        ratios = [lr / lr0 if lr0 else math.nan for lr, lr0 in zip(lrs, cache.lrs, strict=True)]
        return not all(math.isclose(r, ratios[0], rel_tol=1e-9) for r in ratios)

    def _rescale(self, lrs: list[float], clip: float) -> torch.Tensor:
        """Per method, the factor that moves the cached η·c into this step's η·c."""
        lr_ratio = lrs[0] / self._cache.lrs[0]
        clip_ratio = clip / self._cache.clip
        return torch.tensor([lr_ratio * (clip_ratio if METHODS[m].clipped else 1.0) for m in self.methods])

    def close(self) -> None:
        """Remove the hooks; the model is as it was before the tracker."""
        self.engine.remove()

    def __enter__(self) -> InRunShapley:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
