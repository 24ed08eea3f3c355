"""A multi-layer perceptron: Linear + ReLU layers, then a Linear classifier."""

from __future__ import annotations

from torch import nn


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], n_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
