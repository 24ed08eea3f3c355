"""transformers' ``Conv1D`` (the projections of GPT-2 and its kin): despite its name a Linear whose
weight is stored transposed, [d_in, d_out], y = x W + b. Valued as that Linear, with M taken and the
gradients given back in the stored layout. Registered by import path: valuing a model without it
never imports transformers."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .linear import LinearKernel
from .low_rank import LowRank
from .registry import register


@register("transformers.pytorch_utils.Conv1D")
class TransformersConv1DKernel(LinearKernel):
    def values(self, module, a, b, M):
        return super().values(module, a, b, _swap_layout(M))

    def values_stacked(self, modules, a, b, M):
        return super().values_stacked(modules, a, b, _swap_layout(M))

    def gradients(self, module, a, b, names, summed):
        return _swap_layout(super().gradients(module, a, b, names, summed))

    def gradients_stacked(self, modules, a, b, names, summed):
        return [_swap_layout(g) for g in super().gradients_stacked(modules, a, b, names, summed)]


def _swap_layout(tensors: Mapping[str, torch.Tensor | LowRank]) -> dict:
    """The weight's last two dimensions swapped, as a view: the stored layout [.., d_in, d_out] to the
    Linear's [.., d_out, d_in] and back; a low-rank M = U Vᵀ by swapping its factors."""
    out = dict(tensors)
    w = out.get("weight")
    if isinstance(w, LowRank):
        out["weight"] = LowRank(w.V, w.U)
    elif w is not None:
        out["weight"] = w.transpose(-1, -2)
    return out
