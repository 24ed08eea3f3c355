"""A small convolutional net for small images such as digits (1x8x8).

Conv2d(C, c1, 3, padding=1) -> ReLU, then for each further channel count a
Conv2d(., c, 3, stride=2, padding=1) -> ReLU; flatten; optional Linear + ReLU
hidden layers; a Linear classifier.
"""

from __future__ import annotations

from torch import nn


def _conv_out(size: int, stride: int) -> int:
    return (size + 2 * 1 - 3) // stride + 1


class SmallCNN(nn.Module):
    def __init__(
        self, input_shape: tuple[int, int, int], channels: list[int], hidden: list[int], n_classes: int
    ):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for k, out in enumerate(channels):
            stride = 1 if k == 0 else 2
            layers += [nn.Conv2d(c, out, 3, stride=stride, padding=1), nn.ReLU()]
            c, h, w = out, _conv_out(h, stride), _conv_out(w, stride)
        layers.append(nn.Flatten())
        width = c * h * w
        for hid in hidden:
            layers += [nn.Linear(width, hid), nn.ReLU()]
            width = hid
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
