"""nn.Linear: ⟨M, g_i⟩ = Σ_t b_{i,t}ᵀ M a_{i,t}, for all K matrices at once, in the cheaper exact order;
per-row gradients Σ_t b_{r,t} a_{r,t}ᵀ for the validation rows."""

from __future__ import annotations

import torch
from torch import nn

from .low_rank import LowRank
from .registry import LayerKernel, register

# per-example weight gradients of one layer are formed in chunks of at most this many floats
PER_EXAMPLE_CHUNK = 1 << 24


def contract(a: torch.Tensor, b: torch.Tensor, Mw: torch.Tensor) -> torch.Tensor:
    """Σ_t b_{i,t}ᵀ M_k a_{i,t} for a [B,T,d_in], b [B,T,d_out], Mw [K,d_out,d_in] → [B,K].

    Two exact orders, the cheaper one taken (as an einsum path optimiser would):
    through M, B·T·K·d_in·d_out multiply-adds; or through this layer's per-example
    gradients Σ_t b_t a_tᵀ, formed a chunk of examples at a time and dropped at once,
    B·(T + K)·d_in·d_out. The second wins when both T and K exceed 1 (sequences valued
    for several methods or queries).
    """
    B, T, d_in = a.shape
    d_out, K = b.shape[-1], Mw.shape[0]
    if T + K < T * K:
        return _through_per_example_gradients(a, b, Mw)
    if d_in <= d_out:  # one GEMM for all K; the intermediate is [B,T,K,min(d_in,d_out)]
        bm = b.reshape(B * T, d_out) @ Mw.permute(1, 0, 2).reshape(d_out, K * d_in)
        return (bm.view(B, T, K, d_in) * a.unsqueeze(2)).sum(dim=(1, 3))
    am = a.reshape(B * T, d_in) @ Mw.permute(2, 0, 1).reshape(d_in, K * d_out)
    return (am.view(B, T, K, d_out) * b.unsqueeze(2)).sum(dim=(1, 3))


def _through_per_example_gradients(a: torch.Tensor, b: torch.Tensor, Mw: torch.Tensor) -> torch.Tensor:
    B, _, d_in = a.shape
    d_out, K = b.shape[-1], Mw.shape[0]
    flat_M = Mw.reshape(K, d_out * d_in).T  # [d_out·d_in, K]
    chunk = max(1, PER_EXAMPLE_CHUNK // (d_out * d_in))
    parts = []
    for s in range(0, B, chunk):
        g = b[s : s + chunk].transpose(1, 2) @ a[s : s + chunk]  # [chunk, d_out, d_in]
        parts.append(g.reshape(g.shape[0], -1) @ flat_M)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


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
        out = contract_weight(a, b, M["weight"]) if "weight" in M else None
        if "bias" in M:
            bias = contract_bias(b, M["bias"])
            out = bias if out is None else out + bias
        return out

    def gradients(self, module, a, b, names, summed):
        # summed: the rows as more positions of one row, so each sum over rows is one product
        R = 1 if summed else a.shape[0]
        a = a.reshape(R, -1, a.shape[-1])
        b = b.reshape(R, -1, b.shape[-1])
        out = {}
        if "weight" in names:
            out["weight"] = b.transpose(1, 2) @ a  # [R, d_out, d_in]
        if "bias" in names:
            out["bias"] = b.sum(dim=1)
        return out
