"""LayerNorm / RMSNorm affine weights: the per-example gradient Σ_t b ⊙ x̂ is small, so it is built."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import LayerKernel, register, split_stacked


def _affine_gradients(shape: tuple[int, ...], x_hat: torch.Tensor, b: torch.Tensor, names) -> dict:
    """{weight: Σ_t b ⊙ x̂, bias: Σ_t b} per row, [R, n] over the n normalised elements (of ``shape``),
    for the R rows of b (and x̂) along their first dimension."""
    n = math.prod(shape)
    R = b.shape[0]
    b = b.reshape(R, -1, n)
    out = {}
    if "weight" in names:
        out["weight"] = (b * x_hat.reshape(R, -1, n)).sum(dim=1)
    if "bias" in names:
        out["bias"] = b.sum(dim=1)
    return out


def _affine_values_stacked(shape: tuple[int, ...], x_hat: torch.Tensor, b: torch.Tensor, M) -> torch.Tensor:
    """Σ_g Σ_t ⟨M_w, b ⊙ x̂⟩ + Σ_t ⟨M_b, b⟩, each example's gradient dotted with M, summed over G
    stacked calls: x̂, b [G, B, ...], M {name: [G, K, ...]} → [B, K]."""
    G, B = b.shape[:2]
    n = math.prod(shape)
    K = next(iter(M.values())).shape[1]
    if K == 1:  # Σ b ⊙ (x̂ ⊙ M_w + M_b), the few ops a small model's cost is counted in
        b, x_hat = b.reshape(G, B, -1, n), x_hat.reshape(G, B, -1, n)
        Mw, Mb = (M[name].reshape(G, 1, 1, n) if name in M else None for name in ("weight", "bias"))
        if Mw is None:
            scaled = Mb
        else:
            scaled = x_hat * Mw if Mb is None else torch.addcmul(Mb, x_hat, Mw)
        assert scaled is not None  # M holds the weight's or the bias's: a call without either is not valued
        return (scaled * b).sum(dim=(0, 2, 3)).unsqueeze(1)
    grads = _affine_gradients(shape, x_hat.flatten(0, 1), b.flatten(0, 1), M)  # [G·B, n]
    out = None
    for name, g in grads.items():
        v = (g.view(G, B, -1) @ M[name].reshape(G, -1, g.shape[1]).transpose(1, 2)).sum(dim=0)
        out = v if out is None else out + v
    assert out is not None  # M holds the weight's or the bias's: a call without either is not valued
    return out


def _shaped(shape: tuple[int, ...], grads: dict) -> dict:
    return {name: g.view(g.shape[0], *shape) for name, g in grads.items()}


class AffineNormKernel(LayerKernel):
    """A norm layer's affine parameters, from its input normalised again (``normalized``) over its
    last dimensions (``shape``, its parameters' shape)."""

    def normalized(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shape(self, module: Any) -> tuple[int, ...]:
        return tuple(module.normalized_shape)

    def eps(self, module: Any) -> float | None:
        return module.eps

    def values(self, module, a, b, M):
        x_hat = self.normalized(module, a)
        M = {name: m[None] for name, m in M.items()}
        return _affine_values_stacked(self.shape(module), x_hat[None], b[None], M)

    def gradients(self, module, a, b, names, summed):
        R = 1 if summed else a.shape[0]  # summed: the rows as more positions of one row
        x_hat = self.normalized(module, a).reshape(R, -1)
        shape = self.shape(module)
        return _shaped(shape, _affine_gradients(shape, x_hat, b.reshape(R, -1), names))

    def group_key(self, module, a, b):
        return (a.shape, b.shape, self.shape(module), self.eps(module))

    def values_stacked(self, modules, a, b, M):
        return _affine_values_stacked(self.shape(modules[0]), self.normalized(modules[0], a), b, M)

    def gradients_stacked(self, modules, a, b, names, summed):
        G = a.shape[0]
        rows = G if summed else G * a.shape[1]  # per call one summed row, or each of its rows
        x_hat = self.normalized(modules[0], a).reshape(rows, -1)
        shape = self.shape(modules[0])
        grads = _affine_gradients(shape, x_hat, b.reshape(rows, -1), names)
        return split_stacked(_shaped(shape, grads), G)


@register(nn.LayerNorm)
class LayerNormKernel(AffineNormKernel):
    param_names = ("weight", "bias")

    def normalized(self, module, a):
        return _normalized(module, a)


def _normalized(module: nn.LayerNorm, a: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(a, module.normalized_shape, None, None, module.eps)


if hasattr(nn, "RMSNorm"):  # torch >= 2.4

    @register(nn.RMSNorm)
    class RMSNormKernel(AffineNormKernel):
        param_names = ("weight",)

        def normalized(self, module, a):
            return _rms_normalized(module, a)

    def _rms_normalized(module: nn.RMSNorm, a: torch.Tensor) -> torch.Tensor:
        # eps=None: torch uses the input dtype's machine epsilon (the model's, for float32)
        eps = module.eps if module.eps is not None else torch.finfo(a.dtype).eps
        return F.rms_norm(a, module.normalized_shape, None, eps)
