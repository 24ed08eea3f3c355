"""The fast mode: exact where its approximations are exact, and training left untouched."""

import copy

import numpy as np
import pytest
import torch
from cases import CASES
from conftest import rel_err
from pydantic import ValidationError
from torch import nn

from adamshap_core import FastMode, InRunShapley

WIDE = CASES[0].__class__(
    "wide-mlp",
    lambda: nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 3)),
    lambda n, g: (torch.randn(n, 40, generator=g), torch.randint(0, 3, (n,), generator=g)),
)


def _twins(opt=torch.optim.Adam):
    """A seeded data generator and two equal WIDE models, each with its optimizer."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model_a = WIDE.model()
    model_b = copy.deepcopy(model_a)
    return gen, (model_a, opt(model_a.parameters(), lr=1e-2)), (model_b, opt(model_b.parameters(), lr=1e-2))


def _pair(fast, methods, opt=torch.optim.Adam, steps=6, n_val=3, sched=False, fuse=False):
    gen, (model_a, opt_a), (model_b, opt_b) = _twins(opt)
    vx, vy = WIDE.data(n_val, gen)
    exact = InRunShapley(model_a, opt_a, WIDE.loss, vx, vy, methods, fuse_validation=fuse)
    approx = InRunShapley(model_b, opt_b, WIDE.loss, vx, vy, methods, fast=fast, fuse_validation=fuse)
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1, 0.7) for o in (opt_a, opt_b)] if sched else []
    pairs = []
    for _ in range(steps):
        x, y = WIDE.data(8, gen)
        pairs.append((exact.step(x, y), approx.step(x, y)))
        for s in scheds:
            s.step()
    return pairs, (model_a, model_b)


@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_refresh_steps_are_exact_and_reuse_steps_stay_close(fuse, float64):
    fast = FastMode(refresh_every=3, warmup=2, rank=None)
    pairs, _ = _pair(fast, ("adam", "sgd"), steps=9, sched=True, fuse=fuse)
    for step, (exact, approx) in enumerate(pairs, start=1):
        for m in ("adam", "sgd"):
            if step <= 2 or (step - 2) % 3 == 0:  # ∇val recomputed: nothing approximate left
                assert rel_err(approx.values[m], exact.values[m]) <= 1e-10, (step, m)
                assert not np.isnan(approx.val_loss)
            else:  # ∇val from an earlier step, P from this one
                corr = np.corrcoef(approx.values[m].numpy(), exact.values[m].numpy())[0, 1]
                assert corr > 0.9, (step, m)
                assert np.isnan(approx.val_loss)


@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_a_new_validation_target_is_used_from_the_next_step_on(fuse, float64):
    """set_validation between two steps that would reuse ∇val: the next step values against the
    new target exactly, as an exact tracker given the same target does."""
    gen, (model_a, opt_a), (model_b, opt_b) = _twins()
    vx, vy = WIDE.data(3, gen)
    exact = InRunShapley(model_a, opt_a, WIDE.loss, vx, vy, ("adam",), fuse_validation=fuse)
    fast = FastMode(refresh_every=10, warmup=1, rank=None)
    approx = InRunShapley(model_b, opt_b, WIDE.loss, vx, vy, ("adam",), fast=fast, fuse_validation=fuse)
    for _ in range(3):
        x, y = WIDE.data(8, gen)
        exact.step(x, y), approx.step(x, y)
    new_x, new_y = WIDE.data(4, gen)
    for tracker in (exact, approx):
        tracker.set_validation(new_x, new_y)
    x, y = WIDE.data(8, gen)
    want, got = exact.step(x, y), approx.step(x, y)
    assert rel_err(got.values["adam"], want.values["adam"]) <= 1e-10


def test_low_rank_contraction_is_exact_when_m_has_that_rank(float64):
    """sgd's M = lr·∇val has rank <= T for one validation sequence of T positions."""
    from cases import SeqLinear

    from adamshap_core.engine import GhostEngine
    from adamshap_core.precond import OptimizerView, scales

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = SeqLinear(128, 128, 3, bias=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # 192 sequences of 16: enough positions for factorising the 128 × 128 matrix to pay
    x, y = torch.randn(192, 16, 128, generator=gen), torch.randint(0, 3, (192,), generator=gen)
    vx, vy = x[:1], y[:1]
    engine = GhostEngine(model)
    loss = WIDE.loss
    G, _ = engine.validation_gradients(loss, vx, vy, per_target=False)
    with engine.capture():
        loss(model(x), y).mean().backward()
        per_segment = [
            (where, [s]) for where, s in scales("sgd", OptimizerView(opt).segments(engine.parameters), 1.0)
        ]
        M_exact = engine.matrices(G, per_segment, 1)
        M_low = engine.matrices(G, per_segment, 1, rank=16)
        assert id(model.up.weight) in M_low.factors  # the factored path really ran
        assert id(model.down.weight) not in M_low.factors  # too small to pay
        assert rel_err(engine.contract(M_low, 192), engine.contract(M_exact, 192)) <= 1e-9


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("linear-seq", "conv2d", "stacked")], ids=lambda c: c.name
)
def test_factored_contraction_at_full_rank_is_exact(case, float64, monkeypatch):
    """Every weight a kernel may factor, factored at a rank that holds it whole: the contraction
    equals the exact one, for several matrices at once (two methods × three validation targets) and
    for convolutions (a grouped one is not factored: its kernel contracts it per group)."""
    from adamshap_core.engine import GhostEngine, ghost
    from adamshap_core.precond import OptimizerView, scales

    monkeypatch.setattr(ghost, "factorizing_pays", lambda *args: True)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = case.model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = case.data(6, gen)
    vx, vy = case.data(3, gen)
    engine = GhostEngine(model)
    G, _ = engine.validation_gradients(case.loss, vx, vy, per_target=True)
    with engine.capture():
        case.loss(model(x), y).mean().backward()
        segments = OptimizerView(opt).segments(engine.parameters)
        two_methods = [(where, [s, 0.5 * s]) for where, s in scales("sgd", segments, 1.0)]
        exact = engine.contract(engine.matrices(G, two_methods, 2), 6).clone()
        M_low = engine.matrices(G, two_methods, 2, rank=64)  # 64: above every dimension here
        factored = {n for n, p in model.named_parameters() if id(p) in M_low.factors}
        assert factored and exact.shape == (6, 6)
        assert rel_err(engine.contract(M_low, 6), exact) <= 1e-9
    grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert not any(n + ".weight" in factored for n in grouped)


def test_factorising_pays_only_for_large_matrices_contracted_with_many_positions():
    """Decisions the rule must get right: each was timed by tools/calibrate_low_rank.py."""
    from adamshap_core.engine.low_rank import factorizing_pays

    assert not factorizing_pays(rows=64 * 9, d_out=185, d_in=32, K=1, rank=8)  # facts-gpt's tied weight, B=64
    assert not factorizing_pays(rows=192, d_out=1024, d_in=256, K=1, rank=8)
    assert factorizing_pays(rows=192, d_out=1024, d_in=256, K=3, rank=8)  # one overhead for K matrices
    assert factorizing_pays(rows=768, d_out=256, d_in=256, K=1, rank=8)


@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_fast_mode_leaves_training_exactly_as_plain(fuse, float64):
    _, (model_a, model_b) = _pair(True, ("adam", "sgd"), steps=12, fuse=fuse)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert (a - b).abs().max() <= 1e-10


def test_fast_mode_tracks_exact_values(float64):
    pairs, _ = _pair(True, ("adam",), steps=24)  # lr 1e-2 on 8 examples: weights move fast
    corrs = [np.corrcoef(f.values["adam"].numpy(), e.values["adam"].numpy())[0, 1] for e, f in pairs]
    assert min(corrs) > 0.95 and np.median(corrs) > 0.99


def test_validation_rows_join_only_the_steps_that_refresh_the_validation_gradient():
    gen = torch.Generator().manual_seed(0)
    model = WIDE.model()
    rows = []
    model.register_forward_pre_hook(lambda m, inputs: rows.append(inputs[0].shape[0]))
    vx, vy = WIDE.data(3, gen)
    fast = FastMode(refresh_every=3, warmup=2, rank=None)
    opt = torch.optim.Adam(model.parameters())
    tracker = InRunShapley(model, opt, WIDE.loss, vx, vy, ("adam",), fast=fast, fuse_validation=True)
    for _ in range(9):
        tracker.step(*WIDE.data(8, gen))
    # the checks at start-up: the first two rows with gradients (coverage.py), then the validation
    # rows in eval and in train mode, then once with gradients; before step 2, the check of two of
    # its training rows (coverage.recheck_due)
    rows = rows[4:]
    assert rows == [11, 2, 11, 8, 8, 11, 8, 8, 11, 8]  # refreshed at steps 1, 2, 5 and 8


def test_bad_fast_settings_are_clear_errors():
    with pytest.raises(ValidationError, match="rank"):
        FastMode(rank=0)
    with pytest.raises(ValidationError, match="refresh_every"):
        FastMode(refresh_every=0)


def test_fast_takes_a_mapping_as_the_recipe_key_does_and_refuses_anything_else_at_construction(float64):
    settings = {"refresh_every": 2, "warmup": 1, "rank": None}
    as_mapping, _ = _pair(settings, ("adam",), steps=4)
    as_model, _ = _pair(FastMode(**settings), ("adam",), steps=4)
    for (_, a), (_, b) in zip(as_mapping, as_model, strict=True):
        assert torch.equal(a.values["adam"], b.values["adam"])
    model = WIDE.model()
    gen = torch.Generator().manual_seed(0)
    args = (model, torch.optim.Adam(model.parameters()), WIDE.loss, *WIDE.data(3, gen))
    with pytest.raises(ValueError, match="refresh_every"):
        InRunShapley(*args, fast={"refresh_every": 0})
    with pytest.raises(ValueError, match="refresh_evry"):
        InRunShapley(*args, fast={"refresh_evry": 2})
    with pytest.raises(TypeError, match="fast is 'true'; expected True, False, a FastMode or a mapping"):
        InRunShapley(*args, fast="true")
    assert not any(m._forward_hooks for m in model.modules())
