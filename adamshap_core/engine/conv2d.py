"""nn.Conv2d: unfold the input into patches, then it is a Linear over positions (per group)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .linear import contract_bias, contract_rows, contract_weight, rows_cheaper
from .low_rank import LowRank
from .registry import LayerKernel, n_targets, register, unsupported


@register(nn.Conv2d)
class Conv2dKernel(LayerKernel):
    param_names = ("weight", "bias")

    def check(self, module, path):
        if module.padding_mode != "zeros":
            raise unsupported(path, module, f"padding_mode '{module.padding_mode}' (only 'zeros')")
        if module.padding == "same" and any(s != 1 for s in module.stride):
            raise unsupported(path, module, "padding='same' with stride > 1")

    def low_rank_params(self, module):
        return ("weight",) if module.groups == 1 else ()

    def keep(self, module, inputs):
        x = inputs[0].detach()
        return x if x.dim() == 4 else x.unsqueeze(0)  # unbatched input → batch of one

    def keep_output_gradient(self, module, grad):
        return grad if grad.dim() == 4 else grad.unsqueeze(0)  # as keep: a batch of one

    def intermediate_floats(self, module, a, b, K):
        # the unfolded patches (kh·kw times the input where patches overlap), then [L, K, ·] products
        if not len(b):
            return 0
        L = b[0].numel() // module.out_channels
        patches = module.in_channels * math.prod(module.kernel_size) * L
        return (K + 1) * patches + K * b[0].numel()

    def values(self, module, a, b, M):
        B = a.shape[0]
        G = module.groups
        patches, grads = _per_group(module, a, b)
        L = patches.shape[2]
        out = patches.new_zeros(B, n_targets(M))
        Mw = M.get("weight")
        if isinstance(Mw, LowRank):  # groups == 1, factors of the [C_out, C_in·kh·kw] matrix
            out += contract_weight(patches[:, 0], grads[:, 0], Mw)
        elif Mw is not None:
            K, C_out = Mw.shape[:2]
            Mw = Mw.reshape(K, G, C_out // G, -1)
            for g in range(G):
                out += contract_weight(patches[:, g], grads[:, g], Mw[:, g])
        if "bias" in M:
            out += contract_bias(b.reshape(B, -1, L).transpose(1, 2), M["bias"])
        return out

    def rows_params(self, module):
        return ("weight",)

    def rows_values(self, module, a, b, a_rows, b_rows, K):
        # a Linear per group over the L positions; the cost is judged from shapes, before unfolding
        G, positions = module.groups, b[0].numel() // module.out_channels
        d_in = module.in_channels // G * math.prod(module.kernel_size)
        rows = len(b_rows) * (b_rows[0].numel() // module.out_channels)
        if not rows_cheaper(positions, d_in, module.out_channels // G, rows, K):
            return None
        patches, grads = _per_group(module, a, b)
        row_patches, row_grads = _per_group(module, a_rows, b_rows)
        return sum(
            contract_rows(patches[:, g], grads[:, g], row_patches[:, g], row_grads[:, g]) for g in range(G)
        )

    def gradients(self, module, a, b, names, summed):
        R, G = a.shape[0], module.groups
        out = {}
        if "weight" in names:
            patches, grads = _per_group(module, a, b)
            if summed:  # the rows as more positions of one row: one product per group
                patches = patches.transpose(0, 1).reshape(1, G, -1, patches.shape[-1])
                grads = grads.transpose(0, 1).reshape(1, G, -1, grads.shape[-1])
            w = grads.transpose(2, 3) @ patches  # [R or 1, G, O, I]
            out["weight"] = w.reshape(w.shape[0], *module.weight.shape)
        if "bias" in names:
            bias = b.reshape(R, module.out_channels, -1).sum(dim=2)
            out["bias"] = bias.sum(dim=0, keepdim=True) if summed else bias
        return out


def _per_group(module: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches [R, G, L, I] and output-gradients [R, G, L, O] of each group, over the L positions."""
    R, G = a.shape[0], module.groups
    patches = _patches(module, a)  # [R, C_in/G·kh·kw·G, L]
    L = patches.shape[-1]
    return patches.view(R, G, -1, L).transpose(2, 3), b.reshape(R, G, -1, L).transpose(2, 3)


def _patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    padding: str | int | tuple[int, ...] = module.padding
    if padding == "valid":
        padding = 0
    elif padding == "same":
        # Same as Conv2d: total padding d·(k−1) per side pair, the extra one on the right.
        pads = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        padding = 0
    assert not isinstance(padding, str)  # Conv2d takes no padding string but these two
    return F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
