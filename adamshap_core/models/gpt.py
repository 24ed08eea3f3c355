"""A small GPT, as plain as nanoGPT: token and position embeddings, pre-LayerNorm blocks
of causal self-attention and an MLP, a final LayerNorm and an LM head that may share the
token embedding's weights.

Only ``nn.Embedding``, ``nn.Linear`` and ``nn.LayerNorm`` carry parameters, so the ghost
engine values every example through every weight. Every layer is called on tensors that
carry the batch dimension (positions are expanded to [B, T]), so the engine can tell the
examples apart.

Padding sits at the end of each sequence, and attention is causal, so real tokens never
see padding; the sequence loss masks padded targets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..tokenizer import IGNORE


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example loss [B]: the mean next-token cross-entropy over the example's real tokens.

    ``logits`` [B, T, V], ``targets`` [B, T] with ``IGNORE`` at padded positions.
    """
    mask = (targets != IGNORE).to(logits.dtype)
    # clamp keeps the padded targets in range; their loss is multiplied by 0 (vmap-safe, no ignore_index)
    per_token = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def positions(idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """The position of every token of ``idx`` [B, T], [B, T]: expanded, not broadcast, since the ghost
    engine needs the batch dimension on every layer call; a sequence longer than the context is refused."""
    B, T = idx.shape
    if T > block_size:
        raise ValueError(f"a sequence of {T} tokens is longer than the model's context ({block_size})")
    return torch.arange(T, device=idx.device).expand(B, T)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)
        self.out_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.n_head

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, h, D // h).transpose(1, 2)  # [B, h, T, D/h]

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # written out rather than F.scaled_dot_product_attention, which has no vmap batching
        # rule on the CPU (the per-query validation gradients are computed under vmap)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(D // h)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        weights = self.attn_drop(torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1))
        y = weights @ v  # [B, h, T, D/h]
        return self.out_drop(self.out(y.transpose(1, 2).reshape(B, T, D)))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, mlp_hidden: int, dropout: float):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, mlp_hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    """Token ids [B, T] → next-token logits [B, T, vocab_size]."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        *,
        n_layer: int = 2,
        n_head: int = 2,
        d_model: int = 64,
        mlp_ratio: int = 4,
        tie_weights: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_head ({n_head})")
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, mlp_ratio * d_model, dropout) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.tok.weight
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        # nanoGPT's scheme: N(0, 0.02) weights, zero biases, residual projections scaled by depth
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            assert isinstance(block, Block)  # (a ModuleList's items are typed as any module)
            for proj in (block.attn.out, block.mlp.down):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(idx) + self.pos(positions(idx, self.block_size)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
