"""nn.Embedding: ⟨M, g_i⟩ = Σ_t b_{i,t} · M[token_{i,t}] (a gather)."""

from __future__ import annotations

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
        B = a.shape[0]
        tokens = a.reshape(B, -1)
        b = b.reshape(B, tokens.shape[1], -1)
        if module.padding_idx is not None:
            # torch gives the padding row no gradient
            b = b * (tokens != module.padding_idx).unsqueeze(-1)
        rows = M["weight"][:, tokens]  # [K, B, T, D]
        return (rows * b.unsqueeze(0)).sum(dim=(2, 3)).T
