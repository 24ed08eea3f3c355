"""nn.Embedding: ⟨M, g_i⟩ = Σ_t b_{i,t} · M[token_{i,t}] (a gather); per-row gradients by scatter-add."""

from __future__ import annotations

import torch
from torch import nn

from .registry import LayerKernel, register, unsupported


@register(nn.Embedding)
class EmbeddingKernel(LayerKernel):
    param_names = ("weight",)

    def check(self, module, path):
        if module.max_norm is not None:
            raise unsupported(path, module, "max_norm renormalises the weights inside forward")
        if module.scale_grad_by_freq:
            raise unsupported(path, module, "scale_grad_by_freq couples the examples of a batch")
        if module.sparse:
            raise unsupported(path, module, "sparse gradients")

    def values(self, module, a, b, M):
        tokens, b = _rows(module, a, b, a.shape[0])
        rows = M["weight"][:, tokens]  # [K, B, T, D]
        return (rows * b.unsqueeze(0)).sum(dim=(2, 3)).T

    def gradients(self, module, a, b, names, summed):
        if "weight" not in names:
            return {}
        tokens, b = _rows(module, a, b, 1 if summed else a.shape[0])  # summed: the rows as more positions
        out = b.new_zeros(tokens.shape[0], module.num_embeddings, b.shape[-1])
        return {"weight": out.scatter_add_(1, tokens.unsqueeze(-1).expand_as(b), b)}


def _rows(module: nn.Embedding, a: torch.Tensor, b: torch.Tensor, R: int) -> tuple[torch.Tensor, ...]:
    """Token ids [R, T] and their output-gradients [R, T, D], zero at the padding index."""
    tokens = a.reshape(R, -1)
    b = b.reshape(R, tokens.shape[1], -1)
    if module.padding_idx is not None:
        # torch gives the padding row no gradient
        b = b * (tokens != module.padding_idx).unsqueeze(-1)
    return tokens, b
