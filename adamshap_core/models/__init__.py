"""Built-in models. Only Linear, Conv2d, Embedding and LayerNorm layers (and transformers' Conv1D and
RMSNorm, in hf-gpt2 and hf-llama) carry parameters, so the ghost engine can value every example through them.

Each model kind comes with its per-example loss (``loss_for``): cross-entropy over
classes for mlp/cnn, the mean next-token loss over each text's real tokens for the language models."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import LANGUAGE_MODELS, MODEL_KINDS
from ..errors import UserError, listed
from .cnn import SmallCNN
from .gpt import GPT, sequence_loss
from .hf import HFCausalLM
from .mlp import MLP

if TYPE_CHECKING:
    from ..data import Dataset
    from ..recipe import ModelCfg


__all__ = [
    "GPT",
    "HFCausalLM",
    "MLP",
    "SmallCNN",
    "build_model",
    "context_length",
    "loss_for",
    "per_example_loss",
    "sequence_loss",
]


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, shape [B]; the training loss is its mean."""
    return F.cross_entropy(outputs, targets, reduction="none")


def loss_for(cfg: ModelCfg) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-example loss (shape [B]) of the model kind; the training loss is its mean."""
    return sequence_loss if cfg.kind in LANGUAGE_MODELS else per_example_loss


def build_model(cfg: ModelCfg, data: Dataset) -> nn.Module:
    """The model a recipe's ``model`` section describes, sized for ``data``. Seed torch first."""
    text = _is_text(data)
    if text != (cfg.kind in LANGUAGE_MODELS):
        want = listed(LANGUAGE_MODELS, "or") if text else "mlp or cnn"
        raise UserError(
            f"`model.kind` is {cfg.kind}, but {data.source!r} is {'text' if text else 'not text'}; "
            f"expected model.kind: {want}."
        )
    if cfg.kind in LANGUAGE_MODELS:
        return _language_model(cfg, data)
    if cfg.kind == "mlp":
        return MLP(data.n_features, list(cfg.hidden), data.n_classes)
    if cfg.kind == "cnn":
        if not data.is_image or len(data.input_shape) != 3:
            raise UserError(
                f"`model.kind` is cnn, which needs image data, but {data.source!r} is not an image dataset; "
                "expected model.kind: mlp."
            )
        return SmallCNN(data.input_shape, list(cfg.channels), list(cfg.hidden), data.n_classes)
    raise UserError(f"`model.kind` is {cfg.kind!r}; expected {listed(MODEL_KINDS, 'or')}.")


def _is_text(data: Dataset) -> bool:
    from ..data import TextDataset

    return isinstance(data, TextDataset)


def context_length(cfg: ModelCfg, data: Dataset) -> int:
    """The language model's context (``model.block_size``, by default the longest sequence of ``data``)."""
    longest = data.input_shape[0]
    if cfg.block_size is not None and cfg.block_size < longest:
        raise UserError(
            f"`model.block_size` is {cfg.block_size}, but {data.source!r} holds sequences of {longest} "
            f"tokens (the longest text plus <bos>); expected at least {longest}, or null for exactly that."
        )
    return cfg.block_size or longest


def _language_model(cfg: ModelCfg, data: Dataset) -> GPT | HFCausalLM:
    """The built-in GPT or a transformers model, of the same sizes."""
    model = GPT if cfg.kind == "gpt" else partial(HFCausalLM, cfg.kind)
    return model(
        data.n_classes,
        context_length(cfg, data),
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        d_model=cfg.d_model,
        mlp_ratio=cfg.mlp_ratio,
        tie_weights=cfg.tie_weights,
        dropout=float(cfg.dropout),
    )
