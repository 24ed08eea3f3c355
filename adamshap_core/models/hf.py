"""transformers' causal language models, built from the recipe's sizes (no weights are downloaded),
behind the same interface as the built-in GPT: token ids [B, T] → next-token logits [B, T, vocab_size].

- ``hf-gpt2``: ``GPT2LMHeadModel``. Its projections are transformers' ``Conv1D`` (valued by
  ``engine/transformers_conv1d.py``), the rest ``nn.Embedding`` and ``nn.LayerNorm``.
- ``hf-llama``: ``LlamaForCausalLM``, rotary positions and a gated MLP. Its layers are ``nn.Linear``,
  ``nn.Embedding`` and Llama's RMSNorm (``engine/transformers_rms_norm.py``).

Both may tie the head to the token embedding (``tie_weights``). Needs the optional extra:
``pip install 'adamshap[hf]'``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..choices import INSTALL_HINT, transformers_missing
from ..errors import UserError
from .gpt import positions

# model kind → transformers' (config, model) class names
HF_MODELS = {
    "hf-gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "hf-llama": ("LlamaConfig", "LlamaForCausalLM"),
}


def _config(
    kind: str,
    vocab_size: int,
    block_size: int,
    *,
    n_layer: int,
    n_head: int,
    d_model: int,
    mlp_ratio: int,
    tie_weights: bool,
    dropout: float,
) -> dict[str, Any]:
    """The transformers config of ``kind`` with these sizes."""
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        tie_word_embeddings=tie_weights,
        # the model families' own special ids lie outside a small vocabulary; the tokenizer has its own
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=False,
        # attention written out: scaled_dot_product_attention has no vmap batching rule on the CPU
        # (a slow fallback, with warnings), which per-query validation gradients use
        attn_implementation="eager",
    )
    if kind == "hf-gpt2":
        return dict(
            common,
            n_positions=block_size,
            n_embd=d_model,
            n_layer=n_layer,
            n_head=n_head,
            n_inner=mlp_ratio * d_model,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
    return dict(
        common,
        max_position_embeddings=block_size,
        hidden_size=d_model,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        intermediate_size=mlp_ratio * d_model,
        attention_dropout=dropout,
    )


class HFCausalLM(nn.Module):
    """Token ids [B, T] → next-token logits [B, T, vocab_size], through transformers' model of ``kind``."""

    def __init__(
        self,
        kind: str,
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
            raise UserError(f"`model.kind` {kind} needs the transformers package: {INSTALL_HINT}")
        try:
            import transformers
        except ImportError as e:  # installed, but not for this torch or Python, say
            raise UserError(
                f"`model.kind` {kind} needs the transformers package, which is installed but does not "
                f"import ({e}); expected one that imports: {INSTALL_HINT}"
            ) from None
        config_class, model_class = (getattr(transformers, name) for name in HF_MODELS[kind])
        sizes = dict(n_layer=n_layer, n_head=n_head, d_model=d_model, mlp_ratio=mlp_ratio)
        config = config_class(**_config(kind, vocab_size, block_size, **sizes, tie_weights=tie_weights,
                                        dropout=dropout))  # fmt: skip
        self.block_size = block_size
        self.lm = model_class(config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # GPT-2's own default is one row of positions for the whole batch, which the engine cannot split
        return self.lm(input_ids=idx, position_ids=positions(idx, self.block_size)).logits
