"""Built-in models. Only Linear, Conv2d, Embedding and LayerNorm layers carry parameters,
so the ghost engine can value every example through them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .cnn import SmallCNN
from .mlp import MLP

if TYPE_CHECKING:
    from ..data import Dataset
    from ..recipe import ModelCfg

__all__ = ["MLP", "SmallCNN", "build_model", "per_example_loss"]


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, shape [B]; the training loss is its mean."""
    return F.cross_entropy(outputs, targets, reduction="none")


def build_model(cfg: ModelCfg, data: Dataset) -> nn.Module:
    """The model a recipe's ``model`` section describes, sized for ``data``. Seed torch first."""
    if cfg.kind == "mlp":
        return MLP(data.n_features, list(cfg.hidden), data.n_classes)
    if cfg.kind == "cnn":
        if not data.is_image or len(data.input_shape) != 3:
            raise UserError(
                f"`model.kind` is cnn, which needs image data, but {data.source!r} is not an image dataset; "
                "expected model.kind: mlp."
            )
        return SmallCNN(data.input_shape, list(cfg.channels), list(cfg.hidden), data.n_classes)
    raise UserError(f"`model.kind` is {cfg.kind!r}; expected mlp or cnn.")
