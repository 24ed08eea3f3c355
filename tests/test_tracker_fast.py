"""The fast mode: exact where its approximations are exact, and training left untouched."""

import copy
import math

import numpy as np
import pytest
import torch
from cases import CASES
from conftest import rel_err
from pydantic import ValidationError
from torch import nn

from adamshap_core import FastMode, InRunShapley, training_step
from adamshap_core.fast import CHECKS_KEPT, MAX_CHECK_WAIT, MIN_CHECK_ROWS, ReuseSchedule
from adamshap_core.tracker import lowest_pearson

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
    fast = FastMode(refresh_every=3, warmup=2, rank=None, min_pearson=None)
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
    "case",
    [c for c in CASES if c.name in ("linear-seq", "conv2d", "stacked", "hf-gpt2")],
    ids=lambda c: c.name,
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


def _factored_use(module: nn.Module, name: str) -> bool:
    """Whether this module's use of its parameter ``name`` may go through low-rank factors, by layer
    type (written out here, not asked of the kernels): the weight of a Linear, of transformers' Conv1D,
    or of an ungrouped Conv2d; not an embedding's (a tied head's weight is factored in the head alone)."""
    if name != "weight":
        return False
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


LOW_RANK_CASES = (
    "mlp-bias",
    "mlp-nobias",
    "linear-seq",  # a Linear with bias and one without, on sequences, one called by keyword
    "conv2d",  # strided with bias; dilated "same" without; a grouped one, never factored
    "conv2d-valid-nobias",
    "lm-tied",  # the head factored, the embedding tied to it not
    "stacked",  # one Linear called twice, both calls through its factors
    "hf-gpt2",  # transformers' Conv1D (the stored layout transposed), and a tied head
    "hf-gpt2-frozen",  # a Conv1D weight-only, another bias-only
)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in LOW_RANK_CASES], ids=lambda c: c.name)
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("rank", [2, 64], ids=["rank-2", "full-rank"])
def test_factored_contraction_matches_per_example_gradients(case, chunked, rank, float64, monkeypatch):
    """Every weight a kernel may factor, factored (the cost rule forced), against torch.func: at rank 2
    the values are ⟨M̃, g_i⟩, M̃ = U Vᵀ the factors the engine made (far from M), at a rank above every
    dimension ⟨M, g_i⟩; a tied weight's factored use with M̃ and its other use with M. Two methods (a
    scalar and an elementwise scale) × three validation targets; the batch whole, or one example at a
    time (chunked)."""
    from bruteforce import dot_products, per_example_grads

    from adamshap_core.engine import GhostEngine, ghost, linear

    monkeypatch.setattr(ghost, "factorizing_pays", lambda *args: True)
    batches = []  # the examples of each factored contraction (Conv2d and Conv1D reach it too)
    contract_low_rank = linear.contract_low_rank
    monkeypatch.setattr(
        linear, "contract_low_rank", lambda a, b, M: batches.append(a.shape[0]) or contract_low_rank(a, b, M)
    )
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    model = case.model()
    B, Q = 5, 3
    x, y = case.data(B, gen)
    engine = GhostEngine(model)
    if chunked:  # below one example's intermediates: one example at a time, every call alone
        engine.contract_chunk, engine.stack_floats = 1, 0
    val = [torch.randn(Q, *p.shape, generator=gen) for p in engine.parameters]
    elementwise = [torch.rand(p.shape, generator=gen) for p in engine.parameters]
    scales = [
        (engine.slice_of(p), [1.0, s.reshape(-1)])
        for p, s in zip(engine.parameters, elementwise, strict=True)
    ]
    with engine.capture():
        case.loss(model(x), y).mean().backward()
        M = engine.matrices(engine.flatten(val, rows=Q), scales, 2, rank=rank)
        got = engine.contract(M, B)
    # each parameter's M from the definition, method-major [2·Q, *shape], and the factors' U Vᵀ
    exact = {
        id(p): torch.cat([v, s * v]) for p, v, s in zip(engine.parameters, val, elementwise, strict=True)
    }
    low = {key: (f.U @ f.V.transpose(1, 2)).reshape(exact[key].shape) for key, f in M.factors.items()}
    uses = [
        (f"{path}.{name}" if path else name, module, name, p)
        for path, module in model.named_modules()
        for name, p in module.named_parameters(recurse=False)
        if id(p) in exact
    ]
    assert set(low) == {id(p) for _, module, name, p in uses if _factored_use(module, name)}
    by_use = {
        full: low[id(p)] if rank == 2 and _factored_use(module, name) else exact[id(p)]
        for full, module, name, p in uses
    }
    want = dot_products(per_example_grads(model, case.loss, x, y, tied_apart=True), by_use)
    assert got.shape == (B, 2 * Q)
    assert rel_err(got, want) <= 1e-10
    if rank == 2:  # the factors are far from M where it has more than two dimensions' rank: M̃ is what counts
        assert max(rel_err(low[key], exact[key]) for key in low) > 0.1
    assert batches and set(batches) == {1 if chunked else B}


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
        assert (a - b).abs().max() <= (1e-10 if fuse else 0.0)  # fused rows round .grad (test_fused.py)


def test_low_rank_factors_leave_training_and_the_random_stream_as_plain(float64, monkeypatch):
    """Every weight factorised: the factors' random draws come from the engine's own stream, so a model
    that drops out draws the same masks as in plain training, its parameters move bit for bit alike,
    and torch's random state after each step is plain training's."""
    from adamshap_core.engine import ghost

    monkeypatch.setattr(ghost, "factorizing_pays", lambda *args: True)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 3))
    plain = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, plain)]
    vx, vy = WIDE.data(3, gen)
    fast = FastMode(warmup=1, refresh_every=2, rank=2)
    tracker = InRunShapley(model, opts[0], WIDE.loss, vx, vy, ("adam", "sgd"), fast=fast)
    for _ in range(4):
        x, y = WIDE.data(8, gen)
        before = torch.get_rng_state()
        tracker.step(x, y)
        assert tracker.engine.last_factored == 2  # both weights through their factors
        valued = torch.get_rng_state()
        torch.set_rng_state(before)
        training_step(plain, opts[1], WIDE.loss, x, y)
        assert torch.equal(torch.get_rng_state(), valued)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters(), strict=True))


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
    fast = FastMode(refresh_every=3, warmup=2, rank=None, min_pearson=None)
    opt = torch.optim.Adam(model.parameters())
    tracker = InRunShapley(model, opt, WIDE.loss, vx, vy, ("adam",), fast=fast, fuse_validation=True)
    for _ in range(9):
        tracker.step(*WIDE.data(8, gen))
    # the checks at start-up: rows a, b, a of the validation set with gradients (coverage.py), then
    # the validation rows in eval and in train mode, then once with gradients; before step 2, the
    # check of rows a, b, a of its training batch (coverage.recheck_due)
    assert rows[:4] == [3, 3, 3, 3]
    rows = rows[4:]
    # refreshed at steps 1, 2, 5 and 8; steps 1 and 2 first run the batch and the rows, each beside
    # copies of its own rows, and the two joined (fused.join_blocker)
    joined = [11, 11, 11]
    assert rows == [*joined, 11, 3, *joined, 11, 8, 8, 11, 8, 8, 11, 8]


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


def _copies(n: int):
    """A seeded data generator and ``n`` equal WIDE models, each with its Adam."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    first = WIDE.model()
    models = [first] + [copy.deepcopy(first) for _ in range(n - 1)]
    return gen, [(m, torch.optim.Adam(m.parameters(), lr=1e-2)) for m in models]


@pytest.mark.parametrize("per_target", [False, True], ids=["mean", "per-target"])
@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_a_check_values_exactly_and_measures_what_reusing_would_have_given(fuse, per_target, float64):
    """With checks, the step after the warm-up recomputes ∇val and also values its batch with the
    warm-up's ∇val: its values are the exact tracker's, and its Pearson is that of the exact values
    with those of a tracker that reuses the warm-up's ∇val on that step."""
    gen, ((m_c, o_c), (m_e, o_e), (m_r, o_r)) = _copies(3)
    vx, vy = WIDE.data(3, gen)
    methods = ("adam", "sgd")
    kw = {"per_target": per_target, "fuse_validation": fuse}
    checking = InRunShapley(m_c, o_c, WIDE.loss, vx, vy, methods, fast=FastMode(warmup=1, rank=None), **kw)
    exact = InRunShapley(m_e, o_e, WIDE.loss, vx, vy, methods, **kw)
    reusing = FastMode(warmup=1, refresh_every=2, rank=None, min_pearson=None)
    stale = InRunShapley(m_r, o_r, WIDE.loss, vx, vy, methods, fast=reusing, **kw)
    for step in (1, 2):
        x, y = WIDE.data(8, gen)
        got, want, old = (t.step(x, y) for t in (checking, exact, stale))
        for m in methods:
            assert rel_err(got.values[m], want.values[m]) <= 1e-10, (step, m)
    assert math.isnan(old.val_loss) and not math.isnan(got.val_loss)  # step 2: reused; recomputed
    per_method = [lowest_pearson(want.values[m][:, None], old.values[m][:, None]) for m in methods]
    if per_target:  # the lowest over every method and target
        per_method = [lowest_pearson(want.values[m], old.values[m]) for m in methods]
    assert got.reuse_pearson == pytest.approx(min(per_method), abs=1e-12)
    assert got.reuse_pearson < 1 - 1e-6  # the weights moved: the stale values differ
    assert all(np.isnan(r.reuse_pearson) for r in (want, old))


def test_lowest_pearson_is_taken_per_column_over_the_examples():
    x = torch.tensor([[1.0, 1.0], [2.0, 3.0], [3.0, 2.0]])
    y = torch.tensor([[2.0, 5.0], [4.0, 5.0], [6.0, 5.0]])  # column 1 is constant: no correlation
    assert lowest_pearson(x, y) == pytest.approx(1.0)
    assert lowest_pearson(x, -y) == pytest.approx(-1.0)
    assert lowest_pearson(x[:, :1], torch.tensor([[1.0], [3.0], [2.0]])) == pytest.approx(0.5)
    assert math.isnan(lowest_pearson(x[:, 1:], y[:, 1:])) and math.isnan(lowest_pearson(x[:1], y[:1]))


def _walk(schedule: ReuseSchedule, steps: int, pearson) -> list[tuple[bool, bool]]:
    """Each step's (recomputes ∇val, checks); ``pearson(age)`` is what a check finds."""
    out = []
    for step in range(1, steps + 1):
        refresh, check = schedule.advance(step, kept=step > 1)
        out.append((refresh, check))
        if check:
            schedule.record(pearson(schedule.checked_age))
    return out


def test_reuse_starts_once_a_check_allows_it_and_checks_every_refresh_while_it_lasts():
    schedule = ReuseSchedule(FastMode(warmup=2, refresh_every=4))
    steps = _walk(schedule, 11, lambda age: 1.0)  # nothing drifts: reuse as long as allowed
    R, C, reuse = (True, False), (True, True), (False, False)
    assert steps == [R, R, C, reuse, reuse, reuse, C, reuse, reuse, reuse, C]
    assert schedule.interval == 4 and schedule.checked_age == 4


def test_the_interval_is_the_longest_whose_oldest_reuse_the_worst_recent_drift_allows():
    fast = FastMode(warmup=0, refresh_every=8, min_pearson=0.99)
    schedule = ReuseSchedule(fast)
    schedule.checked_age = 1
    schedule.record(1 - 0.0025)  # 0.0025 per age²: 0.99 reached at age 2
    assert schedule.interval == 3
    schedule.checked_age = 3
    schedule.record(1 - 0.0009 * 9)  # a gentler check: the worst of the kept ones still rules
    assert schedule.interval == 3
    for _ in range(CHECKS_KEPT - 1):
        schedule.record(1 - 0.0009 * 9)
    assert schedule.interval == 4  # the steep one has left the last CHECKS_KEPT: 0.01/0.0009 → age 3
    schedule.record(1 - 0.02 * 9)
    assert schedule.interval == 1
    schedule.record(math.nan)  # constant values say nothing, and the next check waits longer
    assert schedule.interval == 1 and len(schedule.rates) == CHECKS_KEPT and schedule.wait == 4


def test_where_reuse_never_pays_the_checks_thin_out_and_every_step_is_exact():
    schedule = ReuseSchedule(FastMode(warmup=1, refresh_every=4))
    steps = _walk(schedule, 300, lambda age: 0.5)
    assert all(refresh for refresh, _ in steps)
    checked = [i + 1 for i, (_, check) in enumerate(steps) if check]
    gaps = np.diff(checked).tolist()
    assert checked[0] == 2 and gaps[:6] == [2, 4, 8, 16, 32, 64] and set(gaps[6:]) == {MAX_CHECK_WAIT}


def test_without_min_pearson_the_schedule_is_fixed_and_never_checks():
    schedule = ReuseSchedule(FastMode(warmup=1, refresh_every=3, min_pearson=None))
    steps = _walk(schedule, 7, lambda age: 0.0)
    assert [r for r, _ in steps] == [True, False, False, True, False, False, True]
    assert not any(c for _, c in steps)
    one = ReuseSchedule(FastMode(warmup=1, refresh_every=1))  # nothing is ever reused: nothing to check
    assert _walk(one, 5, lambda age: 0.0) == [(True, False)] * 5


def test_the_schedule_travels_in_the_trackers_state(float64):
    gen, ((m_a, o_a), (m_b, o_b)) = _copies(2)
    vx, vy = WIDE.data(3, gen)
    fast = FastMode(warmup=1, refresh_every=4, rank=None, min_pearson=0.5)
    a = InRunShapley(m_a, o_a, WIDE.loss, vx, vy, ("adam",), fast=fast)
    b = InRunShapley(m_b, o_b, WIDE.loss, vx, vy, ("adam",), fast=fast)
    batches = [WIDE.data(8, gen) for _ in range(9)]
    for x, y in batches[:3]:
        a.step(x, y), b.step(x, y)
    state = copy.deepcopy(a.state_dict())
    assert state["reuse"]["interval"] > 1  # step 2's check allowed reuse
    b._reuse = ReuseSchedule(fast)  # as a fresh tracker's
    b.load_state_dict(state)
    for x, y in batches[3:]:
        want, got = a.step(x, y), b.step(x, y)
        assert torch.equal(got.values["adam"], want.values["adam"])
        assert math.isnan(got.val_loss) == math.isnan(want.val_loss)


def test_a_new_validation_target_is_reused_only_once_a_check_allows_it(float64):
    gen, ((model, opt),) = _copies(1)
    vx, vy = WIDE.data(3, gen)
    fast = FastMode(warmup=1, refresh_every=4, rank=None, min_pearson=0.0)  # any positive check allows reuse
    tracker = InRunShapley(model, opt, WIDE.loss, vx, vy, ("adam",), fast=fast)
    results = [tracker.step(*WIDE.data(8, gen)) for _ in range(4)]
    assert math.isnan(results[-1].val_loss)  # step 2's check allowed reuse
    tracker.set_validation(*WIDE.data(4, gen))
    first, second = (tracker.step(*WIDE.data(8, gen)) for _ in range(2))
    assert not math.isnan(first.val_loss) and math.isnan(first.reuse_pearson)  # no ∇val of this target yet
    assert not math.isnan(second.val_loss) and not math.isnan(second.reuse_pearson)  # no reuse before a check


def test_a_schedule_saved_under_other_settings_gives_only_the_age_of_the_kept_gradient():
    saved = ReuseSchedule(FastMode(warmup=0, refresh_every=8, min_pearson=None))
    for step in (1, 2, 3):
        saved.advance(step, kept=step > 1)
    state = saved.state_dict()
    assert (state["interval"], state["age"]) == (8, 2)
    same = ReuseSchedule(FastMode(warmup=0, refresh_every=8, min_pearson=None))
    same.load_state_dict(state)
    assert same.state_dict() == state
    other = ReuseSchedule(FastMode(warmup=0, refresh_every=2, min_pearson=None))
    other.load_state_dict(state)
    assert (other.interval, other.age) == (2, 2)  # never past refresh_every; the next step recomputes
    assert other.advance(4, kept=True) == (True, False)


def test_a_state_without_a_schedule_makes_a_fast_tracker_recompute_its_gradient(float64):
    gen, ((m_a, o_a), (m_b, o_b)) = _copies(2)
    vx, vy = WIDE.data(3, gen)
    fast = FastMode(warmup=1, refresh_every=4, rank=None, min_pearson=None)
    a = InRunShapley(m_a, o_a, WIDE.loss, vx, vy, ("adam",), fast=fast)
    b = InRunShapley(m_b, o_b, WIDE.loss, vx, vy, ("adam",), fast=fast)
    a.step(*WIDE.data(8, gen))
    state = {key: value for key, value in a.state_dict().items() if key != "reuse"}  # an older adamshap's
    b.load_state_dict(state)
    assert not math.isnan(b.step(*WIDE.data(8, gen)).val_loss)  # its ∇val's age was unknown


def test_a_check_leaves_the_low_rank_factors_of_later_steps_as_they_were(float64, monkeypatch):
    """With every weight factorised, a tracker whose checks always fail (so that every step recomputes
    ∇val) gives each step the values of one that never checks: a check factorises the replaced ∇val's
    matrices beside the step's own with the same random draws, and draws no more."""
    from adamshap_core.engine import ghost

    monkeypatch.setattr(ghost, "factorizing_pays", lambda *args: True)
    gen, ((m_a, o_a), (m_b, o_b)) = _copies(2)
    vx, vy = WIDE.data(3, gen)
    failing = FastMode(warmup=1, refresh_every=4, rank=2, min_pearson=1.0)  # no check reaches 1
    never = FastMode(warmup=1, refresh_every=1, rank=2)
    a = InRunShapley(m_a, o_a, WIDE.loss, vx, vy, ("adam",), fast=failing)
    b = InRunShapley(m_b, o_b, WIDE.loss, vx, vy, ("adam",), fast=never)
    checks = 0
    for _ in range(6):
        x, y = WIDE.data(8, gen)
        got, want = a.step(x, y), b.step(x, y)
        checks += not math.isnan(got.reuse_pearson)
        assert rel_err(got.values["adam"], want.values["adam"]) <= 1e-10  # other factors: about 1e-2
    assert checks >= 2 and a.engine.last_factored > 0


def test_a_check_prices_factorising_for_the_steps_own_matrices(monkeypatch):
    """On a check step M holds the replaced ∇val's matrices too; whether factorising pays is still
    weighed for the step's own (methods × targets), or a check step could factorise where others
    do not, and its values would differ from them."""
    from adamshap_core.engine import ghost

    weighed = []
    monkeypatch.setattr(
        ghost, "factorizing_pays", lambda rows, d_out, d_in, K, rank: weighed.append(K) and False
    )
    gen, ((model, opt),) = _copies(1)
    vx, vy = WIDE.data(3, gen)
    fast = FastMode(warmup=1, refresh_every=4, rank=2, min_pearson=0.0)
    tracker = InRunShapley(model, opt, WIDE.loss, vx, vy, ("adam", "sgd"), per_target=True, fast=fast)
    results = [tracker.step(*WIDE.data(8, gen)) for _ in range(3)]
    assert not math.isnan(results[1].reuse_pearson)  # step 2 checked
    assert weighed and set(weighed) == {2 * 3}


def test_batches_too_small_to_correlate_are_not_checked_and_reuse_nothing(float64):
    """A Pearson over two examples is always ±1: such a check would allow any reuse. Below
    MIN_CHECK_ROWS no check runs, nothing is reused, and the checks that would run thin out."""
    gen, ((model, opt),) = _copies(1)
    vx, vy = WIDE.data(3, gen)
    tracker = InRunShapley(model, opt, WIDE.loss, vx, vy, ("adam",), fast=FastMode(warmup=1, rank=None))
    results = [tracker.step(*WIDE.data(MIN_CHECK_ROWS - 1, gen)) for _ in range(40)]
    assert not any(math.isnan(r.val_loss) for r in results)  # ∇val recomputed on every step
    assert all(math.isnan(r.reuse_pearson) for r in results)
    assert tracker._reuse is not None and tracker._reuse.wait >= 8  # the checks due thinned out
    checked = [tracker.step(*WIDE.data(MIN_CHECK_ROWS, gen)) for _ in range(tracker._reuse.wait)]
    assert any(not math.isnan(r.reuse_pearson) for r in checked)  # batches large enough are checked
