"""Digests that tie a run to its data and its parameters: SHA-256 of the tensors' raw bytes.

A checkpoint records the training data's and the held-out splits' digests, so that resuming against
changed data is refused; ``metrics.json`` records them and the final parameters', so that ``compare``,
``prune`` and ``attribute`` refuse a data source that changed since the run was trained.
"""

from __future__ import annotations

import hashlib

import torch

from .errors import UserError
from .runio import RunFolder


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """``t``'s raw bytes as a view (hashed in place: a copy of a large training split cost its size)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def params_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape, raw bytes): equal iff bitwise equal."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def data_digest(data) -> str:
    """SHA-256 of the training split (inputs, labels, example ids), to tie a checkpoint to its data."""
    return _digest((data.x_train, data.y_train, data.example_id))


def held_out_digest(data) -> str:
    """SHA-256 of the validation and test splits: a resumed run values against the same validation
    split and reports accuracy on the same test split as the run it continues."""
    return _digest((data.x_val, data.y_val, data.x_test, data.y_test))


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def check_same_data(folder: RunFolder, data) -> None:
    """The recipe's data source still gives the training split the run valued (its digest in
    metrics.json; runs written before it was recorded are checked by their example columns only)."""
    recorded = folder.text_field("data_sha256")
    if recorded is not None and data_digest(data) != recorded:
        raise UserError(
            f"the training split the recipe of run {folder.name!r} loads now differs from the one it valued "
            "(its digest in metrics.json); the data source changed since the run was trained. Retrain it "
            "first."
        )
