"""nn.Linear: ⟨M, g_i⟩ = Σ_t b_{i,t}ᵀ M a_{i,t}, one GEMM for all K matrices."""

from __future__ import annotations

import torch
from torch import nn

from .low_rank import LowRank
from .registry import LayerKernel, n_targets, register


def contract(a: torch.Tensor, b: torch.Tensor, Mw: torch.Tensor) -> torch.Tensor:
    """Σ_t b_{i,t}ᵀ M_k a_{i,t} for a [B,T,d_in], b [B,T,d_out], Mw [K,d_out,d_in] → [B,K].

    One GEMM over all K: multiply through the smaller side so the
    intermediate is [B,T,K,min(d_in,d_out)].
    """
    B, T, d_in = a.shape
    d_out = b.shape[-1]
    K = Mw.shape[0]
    if d_in <= d_out:
        # b @ M_k: [B,T,d_in]
        bm = b.reshape(B * T, d_out) @ Mw.permute(1, 0, 2).reshape(d_out, K * d_in)
        return (bm.view(B, T, K, d_in) * a.unsqueeze(2)).sum(dim=(1, 3))
    am = a.reshape(B * T, d_in) @ Mw.permute(2, 0, 1).reshape(d_in, K * d_out)
    return (am.view(B, T, K, d_out) * b.unsqueeze(2)).sum(dim=(1, 3))


def contract_low_rank(a: torch.Tensor, b: torch.Tensor, M: LowRank) -> torch.Tensor:
    """Σ_t (b_tᵀ U_k)·(a_tᵀ V_k) for M_k ≈ U_k V_kᵀ (fast mode) → [B,K]."""
    B, T, d_in = a.shape
    K, d_out, r = M.U.shape
    bu = b.reshape(B * T, d_out) @ M.U.permute(1, 0, 2).reshape(d_out, K * r)
    av = a.reshape(B * T, d_in) @ M.V.permute(1, 0, 2).reshape(d_in, K * r)
    return (bu * av).view(B, T, K, r).sum(dim=(1, 3))


def contract_weight(a: torch.Tensor, b: torch.Tensor, Mw: torch.Tensor | LowRank) -> torch.Tensor:
    """⟨M, g_i⟩ of a weight matrix, exact or through its low-rank factors."""
    return contract_low_rank(a, b, Mw) if isinstance(Mw, LowRank) else contract(a, b, Mw)


def contract_bias(b: torch.Tensor, Mb: torch.Tensor) -> torch.Tensor:
    """Σ_t ⟨m_k, b_{i,t}⟩ for b [B,T,d_out], Mb [K,d_out] → [B,K]."""
    return b.sum(dim=1) @ Mb.T


@register(nn.Linear)
class LinearKernel(LayerKernel):
    param_names = ("weight", "bias")

    def low_rank_params(self, module):
        return ("weight",)

    def values(self, module, a, b, M):
        B = a.shape[0]
        a = a.reshape(B, -1, a.shape[-1])
        b = b.reshape(B, -1, b.shape[-1])
        out = a.new_zeros(B, n_targets(M))
        if "weight" in M:
            out += contract_weight(a, b, M["weight"])
        if "bias" in M:
            out += contract_bias(b, M["bias"])
        return out
