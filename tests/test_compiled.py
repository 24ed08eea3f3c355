"""attribution.compile: compiled values equal eager ones, training stays plain training's, and
where compiling fails the run goes on eagerly after one warning."""

import logging
import math
import os
import shutil
import warnings
from contextlib import contextmanager

import pytest
import torch
from conftest import rel_err

from adamshap_core import InRunShapley, compiled, training_step
from adamshap_core.errors import UserError
from adamshap_core.models import GPT, sequence_loss
from adamshap_core.precond import AdamState, _norm, adam_coefficients, adam_fixed_rule, adam_rule
from adamshap_core.recipe import recipe_from_dict

METHODS = ("adam", "adam_fixed", "sgd")
# torch.compile builds CPU kernels with a C++ compiler; without one only the fallback can be tested.
# Before torch 2.9 it cannot trace the valuation (id(), next(it, default), Counter), which then computes
# eagerly with one warning: there too only the fallback can be tested
compiles = pytest.mark.skipif(
    not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++"))
    or tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 9),
    reason="no C++ compiler for torch.compile's CPU kernels, or a torch before 2.9",
)


def gpt():
    return GPT(13, 8, n_layer=1, n_head=2, d_model=8, mlp_ratio=2)


def batches(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(1, 13, (n, 6), generator=gen), torch.randint(0, 13, (n, 6), generator=gen))
        for n in sizes
    ]


def run(sizes, optimizer, tracker_kw=None, clip=None):
    """Steps on batches of ``sizes`` from the same start: valued when ``tracker_kw`` is given, else
    plain. Returns (model, tracker or None, per-step values)."""
    torch.manual_seed(0)
    model = gpt()
    opt = optimizer(model.parameters())
    vx, vy = batches([2], seed=1)[0]
    tracker = None
    if tracker_kw is not None:
        tracker = InRunShapley(model, opt, sequence_loss, vx, vy, METHODS, max_grad_norm=clip, **tracker_kw)
    values = []
    for x, y in batches(sizes):
        if tracker is None:
            training_step(model, opt, sequence_loss, x, y, clip)
        else:
            values.append(tracker.step(x, y).values)
    return model, tracker, values


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def adam_coupled_decay(params):
    """Decay on the matrices only, as is common: two param groups, so two segments of the layout."""
    params = list(params)
    matrices, rest = [p for p in params if p.dim() > 1], [p for p in params if p.dim() < 2]
    return torch.optim.Adam([{"params": matrices, "weight_decay": 0.1}, {"params": rest}], lr=1e-2)


def assert_same_values(got, want, tol):
    for a, b in zip(got, want, strict=True):
        for m in METHODS:
            assert rel_err(a[m], b[m]) <= tol, m


@pytest.mark.slow
@compiles
@pytest.mark.parametrize(
    "optimizer,tracker_kw,clip",
    [
        (adam, {"fuse_validation": True}, 0.5),
        (adam_coupled_decay, {"fuse_validation": False, "per_target": True}, None),
    ],
    ids=["fused-clipped", "separate-per-target-coupled-decay-two-groups"],
)
def test_compiled_values_and_updates_equal_eager_ones(optimizer, tracker_kw, clip, float64):
    """Four full batches and a smaller last one (a second graph); nothing falls back to eager."""
    sizes = [5, 5, 5, 5, 3]
    plain, _, _ = run(sizes, optimizer, clip=clip)
    eager_model, _, eager = run(sizes, optimizer, tracker_kw, clip)
    model, tracker, compiled = run(sizes, optimizer, {**tracker_kw, "compile": True}, clip)
    assert tracker.compile_failed is None and tracker.compile_seconds > 0
    per_shape = 2 if tracker_kw["fuse_validation"] else 1  # the rows' gradients, the values
    assert tracker.compiled_graphs == 2 * per_shape  # the full batches' and the last batch's
    assert_same_values(compiled, eager, 1e-10)
    for p, q, r in zip(plain.parameters(), eager_model.parameters(), model.parameters(), strict=True):
        assert (p - r).abs().max() <= 1e-10
        if not tracker_kw["fuse_validation"]:  # the update itself is never compiled then
            assert torch.equal(q, r)


@pytest.mark.slow
@compiles
def test_one_graph_serves_every_step_of_a_batch_shape(float64):
    """The learning rate, Adam's betas (OneCycleLR cycles β1) and the step count change every step: they
    must not compile new graphs."""
    _, tracker, _ = run([5], adam, {"fuse_validation": True, "compile": True})
    assert tracker.compiled_graphs == 2 and tracker.compile_failed is None
    x, y = batches([5], seed=3)[0]
    for i in range(3):
        group = tracker.optimizer.param_groups[0]
        group["lr"] *= 0.5
        group["betas"] = (0.85 + 0.01 * i, 0.99 - 0.001 * i)
        tracker.step(x, y)
    assert tracker.compiled_graphs == 2


def test_where_compiling_fails_one_warning_then_eager_values(monkeypatch, float64):
    """No C++ compiler (simulated): the run goes on, with exactly the values of compile=False."""

    def no_compiler(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\ndetails")

        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    sizes = [5, 5, 3]
    eager_model, _, eager = run(sizes, adam, {"fuse_validation": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tracker, got = run(sizes, adam, {"fuse_validation": True, "compile": True})
    notices = [w for w in caught if "attribution.compile" in str(w.message)]
    assert len(notices) == 1 and "No working C++ compiler" in str(notices[0].message)
    assert tracker.compile_failed.startswith("RuntimeError: InvalidCxxCompiler")
    for a, b in zip(got, eager, strict=True):
        assert all(torch.equal(a[m], b[m]) for m in METHODS)
    for p, q in zip(eager_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_recipe_key_is_off_by_default_and_strict():
    base = {"name": "x", "data": {"source": "sklearn:digits"}}
    assert recipe_from_dict(base).attribution.compile is False
    on = recipe_from_dict({**base, "attribution": {"compile": True}})
    assert on.attribution.compile is True
    with pytest.raises(UserError, match="valid boolean"):
        recipe_from_dict({**base, "attribution": {"compile": "yes"}})


# ---- the traced normaliser: plain tensor code, so it is tested here without compiling


def traced(monkeypatch):
    """Run precond's traced branches eagerly (they take no other input from the compiler)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_traced_normaliser_equals_hypot_at_extreme_values(dtype, monkeypatch):
    """Per element, whatever the other elements: no square overflows, a small element next to a
    huge one keeps its value, and inf stays inf (never NaN)."""
    finfo = torch.finfo(dtype)
    x = torch.tensor(
        [1e-3, 0.5, 1e20, 0.0, 0.0, 3.0, finfo.max, math.inf, 0.0, finfo.tiny, 1e30], dtype=dtype
    )
    y = torch.tensor(
        [0.0, 0.0, 0.0, 0.0, 2e-3, -4.0, finfo.max, 1.0, -math.inf, finfo.tiny, -1e30], dtype=dtype
    )
    y = torch.cat([y, -y])
    x = torch.cat([x, x])
    for scale in (1.0, 0.25, torch.tensor(0.03, dtype=torch.float64)):
        want = torch.hypot(x, y * scale)
        eager, eager_finite = _norm(x, y, scale, 1e-8, torch.empty_like(x))
        traced(monkeypatch)
        got, _ = _norm(x, y, scale, 1e-8, torch.empty_like(x))
        monkeypatch.undo()
        assert got.dtype == dtype and not got.isnan().any()
        assert torch.equal(got == math.inf, want == math.inf) and torch.equal(got == 0, want == 0)
        finite = want.isfinite()
        assert torch.allclose(got[finite], want[finite], rtol=4 * finfo.eps, atol=0)
        assert torch.allclose(eager[finite], want[finite], rtol=4 * finfo.eps, atol=0)
        assert not eager_finite  # these values overflow a plain multiply-add: the hypot was taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normaliser_is_a_multiply_add_where_nothing_overflows(dtype):
    """The eager fast path: ordinary magnitudes, zeros and subnormal squares give hypot's value and
    are known to be finite (so the rules skip their check for overflowed second moments)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, generator=g, dtype=dtype) * 1e-3
    y = torch.randn(1000, generator=g, dtype=dtype) * torch.logspace(-30, 3, 1000, dtype=dtype)
    x[:10], y[5:15] = 0.0, 0.0
    S, finite = _norm(x, y, 0.03, 1e-8, torch.empty_like(x))
    assert finite
    assert torch.allclose(S, torch.hypot(x, y * 0.03), rtol=4 * torch.finfo(dtype).eps, atol=1e-18)


@pytest.mark.parametrize("rule", [adam_rule, adam_fixed_rule])
def test_traced_rules_give_the_eager_P_where_adams_second_moment_overflowed(rule, monkeypatch):
    """float32: where torch's exp_avg_sq is inf its step is 0, so P = 0 there; elsewhere in the same
    segment, small and huge gradients alike, P is the eager one (not NaN for the whole segment)."""
    g = torch.tensor([1e-3, 0.5, 1e20, -2e18, 3.0, 1e-30])
    m = torch.tensor([1e-4, -0.1, 1e19, 1e18, 0.0, 0.0])
    v = torch.tensor([1e-6, 0.2, math.inf, 1e36, math.inf, 0.0])
    r = torch.tensor([0.0, 1e-3, 1.0, -5.0, 1e20, 0.0])
    for decay in (None, r):
        state = AdamState(1e-3, g, decay, 0.9, 0.999, 1e-8, 5, m, v)
        want = rule(state, 0.5)
        traced(monkeypatch)
        got = rule(state, 0.5)
        monkeypatch.undo()
        assert want.isfinite().all() and (want[v == math.inf] == 0).all()
        assert torch.equal(got == 0, want == 0)
        assert torch.allclose(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("rule", [adam_rule, adam_fixed_rule])
@pytest.mark.parametrize("decay", [False, True], ids=["decoupled", "coupled-l2"])
def test_rules_give_the_same_P_with_the_step_scalars_as_tensors(rule, decay, float64):
    """A compiled valuation passes lr, the coefficients and k as 0-d tensors (one graph for every
    step), which take other branches of the rules' arithmetic; run eagerly, they give the same P."""
    gen = torch.Generator().manual_seed(0)
    g, m, r = (torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(3))
    v = torch.rand(50, generator=gen, dtype=torch.float64)
    coeffs = adam_coefficients(0.9, 0.999, 5)

    def state(as_tensor):
        scalar = torch.tensor if as_tensor else float
        return AdamState(
            scalar(1e-3), g, r if decay else None, 0.9, 0.999, 1e-8, 5, m, v,
            coeffs=tuple(scalar(c) for c in coeffs),
        )  # fmt: skip

    want = rule(state(False), 0.5)
    got = rule(state(True), torch.tensor(0.5, dtype=torch.float64))
    assert rel_err(got, want) <= 1e-13


# ---- what a failure means: compiling (the step goes on eagerly) or a built graph (raised)


def fake_compile(fail_on_call, compiling=False):
    """A ``torch.compile`` whose "graph" runs the function itself. Call number ``fail_on_call`` of
    the "rows" graph fails: after it ran (its in-place subtraction from .grad done), or with
    ``compiling``, while compiling (torch starts a compile for a new shape, then fails)."""

    def compile_(fn, **kwargs):
        calls = []

        def graph(*args):
            calls.append(1)
            fails = fn.__name__ == "rows_gradients" and len(calls) == fail_on_call
            if fails and compiling:  # as torch's compiler does: start callbacks, then fail
                from torch._dynamo import callback

                if not hasattr(callback, "CallbackTrigger"):  # older torch: callbacks without arguments
                    callback.callback_handler.run_start_callbacks()
                    raise RuntimeError("the graph failed")
                with callback.callback_handler.install_callbacks(callback.CallbackTrigger.DYNAMO, "0/1"):
                    raise RuntimeError("the graph failed")
            out = fn(*args)
            if fails:
                raise RuntimeError("the graph failed")
            return out

        return graph

    return compile_


def test_a_graph_that_ran_before_and_then_fails_is_raised_not_rerun(monkeypatch, float64):
    """The "rows" graph has already taken the rows out of .grad when it fails: rerunning it eagerly
    would take them out twice, so the step raises."""
    monkeypatch.setattr(torch, "compile", fake_compile(fail_on_call=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback notice either
        with pytest.raises(RuntimeError, match="the graph failed"):
            run([5, 5], adam, {"fuse_validation": True, "compile": True})


def test_a_failure_while_compiling_a_new_shape_goes_on_eagerly(monkeypatch, float64):
    """A failure in a call that compiled (here the second shape's) is compiling's: one warning, and
    the step's values and update are exactly the eager ones."""
    monkeypatch.setattr(torch, "compile", fake_compile(fail_on_call=2, compiling=True))
    eager_model, _, eager = run([5, 3], adam, {"fuse_validation": True})
    with pytest.warns(RuntimeWarning, match="cannot compile here .*the graph failed"):
        model, tracker, got = run([5, 3], adam, {"fuse_validation": True, "compile": True})
    assert tracker.compile_failed == "RuntimeError: the graph failed"
    for a, b in zip(got, eager, strict=True):
        assert all(torch.equal(a[m], b[m]) for m in METHODS)
    for p, q in zip(eager_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


# ---- many trackers, many shapes: torch's recompile limit


def mlp_run(sizes, **tracker_kw):
    """A small MLP's valued steps on batches of ``sizes``; returns the tracker."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    vx, vy = torch.randn(2, 4, generator=gen), torch.randint(0, 3, (2,), generator=gen)
    tracker = InRunShapley(model, opt, cross_entropy, vx, vy, ("adam",), compile=True, **tracker_kw)
    for n in sizes:
        tracker.step(torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))
    tracker.close()
    return tracker


def cross_entropy(out, y):
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


@pytest.mark.slow
@compiles
def test_many_trackers_and_shapes_in_one_process_keep_compiling(float64):
    """Each tracker builds graphs of its own (they are guarded on its engine): more trackers, and
    more batch shapes for one tracker, than torch's default limit of 8 recompiles; and torch does
    not log a refusal at its limit (which reads as if compiling had failed)."""
    limit = torch._dynamo.config.recompile_limit
    for _ in range(limit + 1):
        tracker = mlp_run([3])
        assert tracker.compile_failed is None and tracker.compiled_graphs == 1
    with logged("torch._dynamo.convert_frame") as records:
        tracker = mlp_run(range(1, limit + 3))
    assert tracker.compile_failed is None and tracker.compiled_graphs == limit + 2
    assert not [r for r in records if "recompile_limit" in r.getMessage()]


@contextmanager
def logged(name: str):
    """The records logger ``name`` emits inside the block (torch's loggers do not reach the root's)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.mark.slow
@compiles
def test_past_the_most_graphs_a_tracker_builds_it_says_so_and_goes_on_eagerly(monkeypatch, float64):
    monkeypatch.setattr(compiled, "MAX_GRAPHS", 2)
    # torch's own patch: pytest 9.2's monkeypatch undo deletes the entry (not in the config's __dict__)
    with (
        torch._dynamo.config.patch(recompile_limit=1),
        pytest.warns(RuntimeWarning, match="'values' needs more than 2 graphs .one per batch shape"),
    ):
        tracker = mlp_run([3, 4, 5, 6])
    assert tracker.compiled_graphs == 2 and "FailOnRecompileLimitHit" in tracker.compile_failed
