"""The in-memory dataset every recipe trains on: three splits plus per-example bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np
import torch

DatasetT = TypeVar("DatasetT", bound="Dataset")  # a subset is of the same class


@dataclass
class Dataset:
    """Train/val/test tensors and what is known about each training example.

    ``example_id[i]`` names training row ``i`` in every output (0..n_train-1 for
    built-in and tabular sources); ``is_noisy[i]`` says whether its label was
    flipped by ``data.label_noise``; ``clean_label`` keeps the label before that.
    ``input_shape`` is the shape of one example (``(64,)`` or ``(1, 8, 8)``).
    """

    source: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    example_id: torch.Tensor  # int64 [n_train]
    is_noisy: torch.Tensor  # bool [n_train]
    clean_label: torch.Tensor  # int64 [n_train]
    source_row: torch.Tensor  # int64 [n_train]: the row of the source each training example came from
    n_classes: int
    input_shape: tuple[int, ...]
    is_image: bool = False
    class_names: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what loading did that the user should hear about

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_features(self) -> int:
        n = 1
        for s in self.input_shape:
            n *= s
        return n

    def example_columns(self) -> dict[str, object]:
        """What ``values.parquet`` says about each training example besides its id and values."""
        return {
            "label": self.y_train.numpy().astype(np.int64),
            "is_noisy": self.is_noisy.numpy().astype(bool),
            "clean_label": self.clean_label.numpy().astype(np.int64),
            "source_row": self.source_row.numpy().astype(np.int64),
        }

    def run_files(self) -> dict[str, object]:
        """JSON files the run folder keeps for this dataset ({file name: object}), e.g. a tokenizer."""
        return {}

    def subset(self: DatasetT, keep) -> DatasetT:
        """The same dataset with only the training rows ``keep`` (positions, not ids); every other
        field, a subclass's too, is kept as it is."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        per_row = ("x_train", "y_train", "example_id", "is_noisy", "clean_label", "source_row")
        return replace(self, **{name: getattr(self, name)[keep] for name in per_row})
