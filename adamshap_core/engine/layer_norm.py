"""LayerNorm / RMSNorm affine weights: the per-example gradient Σ_t b ⊙ x̂ is small."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import LayerKernel, n_targets, register


def _affine_values(module, x_hat: torch.Tensor, b: torch.Tensor, M) -> torch.Tensor:
    """Σ_t ⟨M_w, b ⊙ x̂⟩ + Σ_t ⟨M_b, b⟩ over the normalised trailing dims."""
    B = b.shape[0]
    n = 1
    for s in module.normalized_shape:
        n *= s
    b = b.reshape(B, -1, n)
    out = b.new_zeros(B, n_targets(M))
    if "weight" in M:
        out += (b * x_hat.reshape(B, -1, n)).sum(dim=1) @ M["weight"].reshape(-1, n).T
    if "bias" in M:
        out += b.sum(dim=1) @ M["bias"].reshape(-1, n).T
    return out


@register(nn.LayerNorm)
class LayerNormKernel(LayerKernel):
    param_names = ("weight", "bias")

    def values(self, module, a, b, M):
        x_hat = F.layer_norm(a, module.normalized_shape, None, None, module.eps)
        return _affine_values(module, x_hat, b, M)


if hasattr(nn, "RMSNorm"):  # torch >= 2.4

    @register(nn.RMSNorm)
    class RMSNormKernel(LayerKernel):
        param_names = ("weight",)

        def values(self, module, a, b, M):
            # eps=None: torch uses the input dtype's machine epsilon (the model's, for float32)
            eps = module.eps if module.eps is not None else torch.finfo(a.dtype).eps
            x_hat = F.rms_norm(a, module.normalized_shape, None, eps)
            return _affine_values(module, x_hat, b, M)
