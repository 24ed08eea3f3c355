"""nn.Linear: ⟨M, g_i⟩ = Σ_t b_{i,t}ᵀ M a_{i,t}, for all K matrices at once, in the cheaper exact order;
per-row gradients Σ_t b_{r,t} a_{r,t}ᵀ for the validation rows. Calls of equal shapes (the attention
projections of every block, say) are contracted together, stacked: one batched product instead of one
small product each, which on a small model is most of the cost."""

from __future__ import annotations

import torch
from torch import nn

from .low_rank import LowRank
from .registry import LayerKernel, register, split_stacked

# per-example weight gradients of one layer (and the rows' ghost products) are formed in chunks of at
# most this many floats
PER_EXAMPLE_CHUNK = 1 << 24
# how many times fewer multiply-adds the rows' ghost dot-product must take to be chosen over M
ROWS_MARGIN = 4
# a bias is contracted in its weight's product (one op less, which is what a small layer's cost is)
# also where that puts the product on the wider side, while its intermediate stays within this many
# floats (about what a core's cache holds; past it the wider intermediate costs more than the op)
FOLD_FLOATS = 1 << 18


def contract(a: torch.Tensor, b: torch.Tensor, Mw: torch.Tensor) -> torch.Tensor:
    """Σ_t b_{i,t}ᵀ M_k a_{i,t} for a [B,T,d_in], b [B,T,d_out], Mw [K,d_out,d_in] → [B,K]."""
    return contract_stacked(a[None], b[None], Mw[None])


def contract_stacked(
    a: torch.Tensor, b: torch.Tensor, Mw: torch.Tensor, Mb: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_g Σ_t b_{g,i,t}ᵀ (M_{g,k} a_{g,i,t} + m_{g,k}) for G stacked layers (or layer groups): a
    [G,B,T,d_in], b [G,B,T,d_out], Mw [G,K,d_out,d_in] and the bias's Mb [G,K,d_out] (None: no bias
    valued) → [B,K].

    Two exact orders, the cheaper one taken (as an einsum path optimiser would):
    through M, B·T·K·d_in·d_out multiply-adds per layer; or through the layer's per-example
    gradients Σ_t b_t a_tᵀ, formed a chunk of examples at a time and dropped at once,
    B·(T + K)·d_in·d_out. The second wins when both T and K exceed 1 (sequences valued
    for several methods or queries).
    """
    G, B, T, d_in = a.shape
    d_out, K = b.shape[-1], Mw.shape[1]
    if T + K < T * K:
        out = _through_per_example_gradients(a, b, Mw)
        return out if Mb is None else out + contract_bias_stacked(b, Mb)
    if d_in > d_out or (Mb is not None and G * B * T * K * d_out <= FOLD_FLOATS):
        # a side: M a + m, the bias added by the same product; the intermediate is [G,B,T,K,d_out]
        Mt = Mw.permute(0, 3, 1, 2).reshape(G, d_in, K * d_out)
        a2 = a.reshape(G, B * T, d_in)
        am = a2 @ Mt if Mb is None else torch.baddbmm(Mb.reshape(G, 1, K * d_out), a2, Mt)
        return _summed(am, b)
    # b side, one batched GEMM for all K; the intermediate is [G,B,T,K,d_in]
    bm = b.reshape(G, B * T, d_out) @ Mw.permute(0, 2, 1, 3).reshape(G, d_out, K * d_in)
    out = _summed(bm, a)
    return out if Mb is None else out + contract_bias_stacked(b, Mb)


def _summed(product: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Σ_g Σ_t Σ_j product[g,i,t,k,j]·other[g,i,t,j] → [B,K], for product [G, B·T, K·d], other [G,B,T,d]."""
    G, B, T, d = other.shape
    K = product.shape[-1] // d
    if K == 1:  # one reduction over a contiguous run per (g, i)
        return (product.view(G, B, T * d) * other.reshape(G, B, T * d)).sum(dim=(0, 2)).unsqueeze(1)
    return (product.view(G, B, T, K, d) * other.unsqueeze(3)).sum(dim=(0, 2, 4))


def _through_per_example_gradients(a: torch.Tensor, b: torch.Tensor, Mw: torch.Tensor) -> torch.Tensor:
    G, B, _, d_in = a.shape
    d_out, K = b.shape[-1], Mw.shape[1]
    flat_M = Mw.reshape(G, K, d_out * d_in).transpose(1, 2)  # [G, d_out·d_in, K]
    chunk = max(1, PER_EXAMPLE_CHUNK // (G * d_out * d_in))
    parts = []
    for s in range(0, B, chunk):
        bs, as_ = b[:, s : s + chunk], a[:, s : s + chunk]
        rows = G * bs.shape[1]  # (layer, example) pairs, as one batch of 3-D products
        g = bs.reshape(rows, -1, d_out).transpose(1, 2) @ as_.reshape(rows, -1, d_in)  # [rows, d_out, d_in]
        parts.append((g.view(G, bs.shape[1], -1) @ flat_M).sum(dim=0))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def contract_rows(
    a: torch.Tensor, b: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor
) -> torch.Tensor:
    """Σ_t Σ_s (a_{i,t}·a_{r,s})(b_{i,t}·b_{r,s}) = ⟨G_r, g_i⟩, G_r = Σ_s b_{r,s} a_{r,s}ᵀ the weight
    gradient of row r, without forming either gradient (the ghost dot-product of In-Run Data Shapley):
    a [B,T,d_in], b [B,T,d_out], a_rows [R,S,d_in], b_rows [R,S,d_out] → [B,R]. It takes
    B·T·R·S·(d_in + d_out) multiply-adds, against B·T·d_in·d_out for one M: fewer where the rows have
    few positions beside wide layers."""
    B, T, d_in = a.shape
    R, S, d_out = b_rows.shape
    a_rows, b_rows = a_rows.reshape(R * S, d_in).T, b_rows.reshape(R * S, d_out).T
    chunk = max(1, PER_EXAMPLE_CHUNK // (2 * T * R * S))  # examples whose two [T, R·S] products fit
    parts = []
    for s in range(0, B, chunk):
        n = min(chunk, B - s)
        inputs = a[s : s + n].reshape(n * T, d_in) @ a_rows  # [n·T, R·S]
        grads = b[s : s + n].reshape(n * T, d_out) @ b_rows
        parts.append((inputs * grads).view(n, T, R, S).sum(dim=(1, 3)))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def rows_cheaper(T: int, d_in: int, d_out: int, rows: int, K: int) -> bool:
    """Whether ``contract_rows`` of a layer (T positions per example, d_in → d_out) against ``rows`` row
    positions in all costs fewer multiply-adds than the cheaper exact order through K matrices M
    (``contract_stacked``), by a margin: its products have only ``rows`` columns, which a CPU runs at a
    fraction of the speed of wider ones."""
    through_m = min(T * K, T + K) * d_in * d_out
    return ROWS_MARGIN * T * rows * (d_in + d_out + 1) < through_m


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
    return contract_bias_stacked(b[None], Mb[None])


def contract_bias_stacked(b: torch.Tensor, Mb: torch.Tensor) -> torch.Tensor:
    """Σ_g Σ_t ⟨m_{g,k}, b_{g,i,t}⟩ for b [G,B,T,d_out], Mb [G,K,d_out] → [B,K]."""
    return (b.sum(dim=2) @ Mb.transpose(1, 2)).sum(dim=0)


@register(nn.Linear)
class LinearKernel(LayerKernel):
    param_names = ("weight", "bias")

    def low_rank_params(self, module):
        return ("weight",)

    def values(self, module, a, b, M):
        if not isinstance(M.get("weight"), LowRank):  # exact: a stack of one call
            return _values_stacked(a[None], b[None], {name: m[None] for name, m in M.items()})
        B = a.shape[0]
        a = a.reshape(B, -1, a.shape[-1])
        b = b.reshape(B, -1, b.shape[-1])
        out = contract_low_rank(a, b, M["weight"])
        return out if "bias" not in M else out + contract_bias(b, M["bias"])

    def group_key(self, module, a, b):
        return (a.shape, b.shape)

    def values_stacked(self, modules, a, b, M):
        return _values_stacked(a, b, M)

    def rows_params(self, module):
        return ("weight",)

    def rows_values(self, module, a, b, a_rows, b_rows, K):
        B, R = a.shape[0], a_rows.shape[0]
        a, b = a.reshape(B, -1, a.shape[-1]), b.reshape(B, -1, b.shape[-1])
        a_rows, b_rows = a_rows.reshape(R, -1, a.shape[-1]), b_rows.reshape(R, -1, b.shape[-1])
        if not rows_cheaper(a.shape[1], a.shape[-1], b.shape[-1], R * a_rows.shape[1], K):
            return None
        return contract_rows(a, b, a_rows, b_rows)

    def gradients(self, module, a, b, names, summed):
        # summed: the rows as more positions of one row, so each sum over rows is one product
        R = 1 if summed else a.shape[0]
        return _row_gradients(a.reshape(R, -1, a.shape[-1]), b.reshape(R, -1, b.shape[-1]), names)

    def gradients_stacked(self, modules, a, b, names, summed):
        G = a.shape[0]
        rows = G if summed else G * a.shape[1]  # per call one summed row, or each of its rows
        grads = _row_gradients(a.reshape(rows, -1, a.shape[-1]), b.reshape(rows, -1, b.shape[-1]), names)
        return split_stacked(grads, G)


def _values_stacked(a: torch.Tensor, b: torch.Tensor, M) -> torch.Tensor:
    """[B, K] of G stacked calls: a [G,B,...,d_in], b [G,B,...,d_out], M {name: [G,K,*shape]} (exact)."""
    G, B = a.shape[:2]
    a = a.reshape(G, B, -1, a.shape[-1])
    b = b.reshape(G, B, -1, b.shape[-1])
    if "weight" in M:
        return contract_stacked(a, b, M["weight"], M.get("bias"))
    return contract_bias_stacked(b, M["bias"])


def _row_gradients(a: torch.Tensor, b: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """{weight: Σ_t b_{r,t} a_{r,t}ᵀ [R, d_out, d_in], bias: Σ_t b_{r,t} [R, d_out]}
    for a [R,T,d_in], b [R,T,d_out]."""
    out = {}
    if "weight" in names:
        out["weight"] = b.transpose(1, 2) @ a
    if "bias" in names:
        out["bias"] = b.sum(dim=1)
    return out
