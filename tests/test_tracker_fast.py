"""The fast mode: exact where its approximations are exact, and training left untouched."""

import copy

import numpy as np
import pytest
import torch
from cases import CASES
from conftest import rel_err
from torch import nn

from adamshap_core import FastMode, InRunShapley
from adamshap_core.errors import UserError

WIDE = CASES[0].__class__(  # an MLP wide enough for factors to be cheaper than M
    "wide-mlp",
    lambda: nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 3)),
    lambda n, g: (torch.randn(n, 40, generator=g), torch.randint(0, 3, (n,), generator=g)),
)


def _pair(fast, methods, opt=torch.optim.Adam, steps=6, n_val=3, sched=False):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model_a = WIDE.model()
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = opt(model_a.parameters(), lr=1e-2), opt(model_b.parameters(), lr=1e-2)
    vx, vy = WIDE.data(n_val, gen)
    exact = InRunShapley(model_a, opt_a, WIDE.loss, vx, vy, methods)
    approx = InRunShapley(model_b, opt_b, WIDE.loss, vx, vy, methods, fast=fast)
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1, 0.7) for o in (opt_a, opt_b)] if sched else []
    pairs = []
    for _ in range(steps):
        x, y = WIDE.data(8, gen)
        pairs.append((exact.step(x, y), approx.step(x, y)))
        for s in scheds:
            s.step()
    return pairs, (model_a, model_b)


def test_low_rank_is_exact_when_m_has_that_rank(float64):
    # sgd: M = lr·∇val, of rank <= 3 with 3 validation rows, so rank-3 factors are exact
    pairs, _ = _pair(FastMode(rank=3, refresh_every=1, warmup=0), ("sgd",))
    for exact, fast in pairs:
        assert rel_err(fast.values["sgd"], exact.values["sgd"]) <= 1e-8


def test_cached_m_is_rescaled_by_the_learning_rate(float64):
    # plain SGD with a frozen validation gradient: M only moves through lr, so reuse is exact
    # when the weights do not move ∇val: check on the first reused step against the refresh
    pairs, _ = _pair(
        FastMode(rank=3, refresh_every=100, warmup=1), ("sgd",), opt=torch.optim.SGD, steps=2, sched=True
    )
    (e1, f1), (e2, f2) = pairs
    assert rel_err(f1.values["sgd"], e1.values["sgd"]) <= 1e-8  # refresh step: exact
    # reused step: lr halved-ish (0.7); values track the exact ones closely, not a stale scale
    corr = np.corrcoef(f2.values["sgd"].numpy(), e2.values["sgd"].numpy())[0, 1]
    assert corr > 0.99
    assert rel_err(f2.values["sgd"], e2.values["sgd"]) < 0.05


def test_fast_mode_leaves_training_exactly_as_plain(float64):
    _, (model_a, model_b) = _pair(True, ("adam", "sgd"), steps=12)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert (a - b).abs().max() <= 1e-10


def test_fast_mode_tracks_exact_values(float64):
    pairs, _ = _pair(True, ("adam",), steps=10)
    for exact, fast in pairs:
        corr = np.corrcoef(fast.values["adam"].numpy(), exact.values["adam"].numpy())[0, 1]
        assert corr > 0.98


def test_bad_fast_settings_are_clear_errors():
    with pytest.raises(UserError, match="rank >= 1"):
        FastMode(rank=0)
