"""The contraction runs with subnormals flushed (engine/subnormals.py): the thread's mode is back
afterwards, whatever it was, and values change by no more than the flushed terms' size."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from cases import cross_entropy
from torch import nn

from adamshap_core import InRunShapley
from adamshap_core.engine import ghost
from adamshap_core.engine.subnormals import flushing


@pytest.fixture
def restore_mode():
    yield
    torch.set_flush_denormal(False)


def _tracker(loss_fn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    vx, vy = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return InRunShapley(model, optimizer, loss_fn, vx, vy, methods=("adam",))


@pytest.mark.parametrize("before", [False, True], ids=["off-before", "on-before"])
def test_the_contraction_flushes_and_the_mode_is_restored(before, monkeypatch, restore_mode):
    torch.set_flush_denormal(before)
    seen = []
    contract = ghost.GhostEngine.contract

    def recording(self, *args, **kwargs):
        seen.append(flushing())
        return contract(self, *args, **kwargs)

    monkeypatch.setattr(ghost.GhostEngine, "contract", recording)
    tracker = _tracker(cross_entropy)
    gen = torch.Generator().manual_seed(2)
    tracker.step(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
    assert seen == [True] and flushing() == before


def test_flushing_changes_values_only_by_the_flushed_terms(monkeypatch):
    """Examples whose loss is scaled by 2^-140 have subnormal output-gradients: flushed, their
    values drop to 0 from below 1e-30; every other value is unchanged, bit for bit."""
    weights = torch.ones(8)
    weights[::2] = 2.0**-140

    def weighted(out, y):  # the training batches only (the validation set has 4 rows)
        losses = cross_entropy(out, y)
        return losses * weights.to(out.dtype) if len(y) == len(weights) else losses

    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(3)]
    flushed, kept = _tracker(weighted), _tracker(weighted)
    for x, y in batches:
        a = flushed.step(x, y).values["adam"]
        monkeypatch.setattr(ghost, "subnormals_flushed", lambda device: nullcontext())
        b = kept.step(x, y).values["adam"]
        monkeypatch.undo()
        assert (a[::2] == 0).all() and (b[::2] != 0).any() and b[::2].abs().max() < 1e-30
        assert torch.equal(a[1::2], b[1::2])
    for p, q in zip(flushed.model.parameters(), kept.model.parameters(), strict=True):
        assert torch.equal(p, q)  # training never saw the flush
