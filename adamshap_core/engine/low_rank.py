"""Low-rank M for the fast mode: M ≈ U·Vᵀ by a randomised range finder.

With M of rank k, ⟨M, g_i⟩ = Σ_t (b_tᵀU)·(a_tᵀV) costs B·T·k·(d_in + d_out)
instead of B·T·d_in·d_out. Its own torch.Generator keeps the global random
stream (dropout, data order) exactly as plain training leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POWER_ITERS = 1
# What a factorisation costs, in multiply-adds of the exact contraction that take as long:
# FACTORIZE_PASSES·(rank+4)·d_out·d_in per matrix, plus FACTORIZE_OVERHEAD per call. Its QRs and
# SVD run far below GEMM speed, and its dozen small calls cost about as much as 20 M multiply-adds
# whatever their size. Fitted on a CPU (one thread) by ``tools/calibrate_low_rank.py``, which also
# prints how often the rule then chooses wrongly.
FACTORIZE_PASSES = 12
FACTORIZE_OVERHEAD = 20_000_000


def factorizing_pays(
    rows: int, d_out: int, d_in: int, K: int, rank: int, costs: tuple[int, int] | None = None
) -> bool:
    """Whether contracting K matrices [d_out, d_in] with ``rows`` positions (B·T) through
    rank-``rank`` factors, the factorisation included, costs less than contracting them exactly.
    ``costs``: (passes, overhead) to weigh instead of FACTORIZE_PASSES and FACTORIZE_OVERHEAD."""
    passes, overhead = costs or (FACTORIZE_PASSES, FACTORIZE_OVERHEAD)
    exact = K * rows * d_out * d_in
    factored = K * (rows * rank * (d_in + d_out) + passes * (rank + 4) * d_out * d_in)
    return factored + overhead < exact


@dataclass
class LowRank:
    """A stack of K matrices M_k ≈ U_k V_kᵀ: U [K, d_out, k], V [K, d_in, k]."""

    U: torch.Tensor
    V: torch.Tensor


def factorize(
    M: torch.Tensor, rank: int, generator: torch.Generator, power_iters: int = POWER_ITERS
) -> LowRank:
    """Rank-``rank`` factors of each M_k in a stack [K, d_out, d_in] (Halko et al., 2011)."""
    K, d_out, d_in = M.shape
    q = min(rank + 4, d_out, d_in)  # a few extra directions make the top ``rank`` accurate
    omega = torch.randn(d_in, q, generator=generator, device=M.device, dtype=M.dtype)
    Y = M @ omega  # [K, d_out, q]
    for _ in range(power_iters):  # sharpen the spectrum; re-orthonormalise for stability
        Y = M @ (M.transpose(1, 2) @ torch.linalg.qr(Y).Q)
    Qy = torch.linalg.qr(Y).Q  # [K, d_out, q], an orthonormal basis of M's range
    small = Qy.transpose(1, 2) @ M  # [K, q, d_in]
    Us, S, Vh = torch.linalg.svd(small, full_matrices=False)
    r = min(rank, q)
    U = (Qy @ Us[..., :r]) * S[:, None, :r]
    return LowRank(U, Vh[:, :r, :].transpose(1, 2))
