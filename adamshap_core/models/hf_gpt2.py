"""transformers' GPT-2, built from the recipe's sizes (no weights are downloaded), behind the same
interface as the built-in GPT: token ids [B, T] → next-token logits [B, T, vocab_size].

Its projections are transformers' ``Conv1D`` (valued by ``engine/transformers_conv1d.py``), the rest
``nn.Embedding``, ``nn.LayerNorm`` and a head (tied to the token embedding with ``tie_weights``).
Needs the optional extra: ``pip install 'adamshap[hf]'``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .gpt import positions

INSTALL_HINT = "pip install 'adamshap[hf]' (or pip install transformers)"


def transformers_missing() -> bool:
    return importlib.util.find_spec("transformers") is None


class HFGPT2(nn.Module):
    """Token ids [B, T] → next-token logits [B, T, vocab_size], through ``GPT2LMHeadModel``."""

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
        if transformers_missing():
            raise UserError(f"`model.kind` hf-gpt2 needs the transformers package: {INSTALL_HINT}")
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
        except ImportError as e:  # installed, but not for this torch or Python, say
            raise UserError(
                f"`model.kind` hf-gpt2 needs the transformers package, which is installed but does not "
                f"import ({e}); expected one that imports: {INSTALL_HINT}"
            ) from None

        settings: dict[str, Any] = dict(
            vocab_size=vocab_size,
            n_positions=block_size,
            n_embd=d_model,
            n_layer=n_layer,
            n_head=n_head,
            n_inner=mlp_ratio * d_model,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            tie_word_embeddings=tie_weights,
            # GPT-2's own ids (50256) lie outside a small vocabulary; the tokenizer has its own
            bos_token_id=None,
            eos_token_id=None,
            use_cache=False,
            # attention written out: scaled_dot_product_attention has no vmap batching rule on the CPU
            # (a slow fallback, with warnings), which per-query validation gradients use
            attn_implementation="eager",
        )
        self.block_size = block_size
        self.lm = GPT2LMHeadModel(GPT2Config(**settings))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # GPT-2's own default is one row of positions for the whole batch, which the engine cannot split
        return self.lm(input_ids=idx, position_ids=positions(idx, self.block_size)).logits
