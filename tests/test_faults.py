"""Numerical faults: a non-finite loss, gradient or value stops the run naming the step, keeps the
values of the steps before (run marked incomplete), and never writes NaN into a value table; the
Adam preconditioners stay finite and exact for gradients scaled by 1e-30 and 1e+30."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import cli, tiny, write_recipe
from test_compiled import compiles

from adamshap_core import InRunShapley, runio
from adamshap_core.recipe import recipe_from_dict
from adamshap_core.train import TrainingDiverged, prepare, run

# --------------------------------------------------------------------------- faults in the training loop


def diverge_at(step: int, fault):
    """An on_step observer that injects ``fault(ctx)`` just before step ``step``."""

    def on_step(s, batch, ctx):
        if s == step:
            fault(ctx)

    return on_step


def poison_gradient(ctx):
    """The loss stays finite; the gradient of the first layer's output, and with it its weight's,
    becomes NaN in the backward pass (a hook on the parameter itself would be refused)."""

    def poison(module, args, out):
        if out.requires_grad:  # not in the evaluation's passes, which have no backward
            out.register_hook(lambda g: g * float("nan"))

    next(m for m in ctx.model.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(poison)


def poison_validation(ctx):
    """Training stays finite; the validation target (and with it every value) does not."""
    ctx.tracker.set_validation(ctx.tracker.val_inputs * float("inf"), ctx.tracker.val_targets)


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        (poison_gradient, r"the gradient of parameter `[\w.]+weight` has non-finite entries"),
        (poison_validation, r"the `adam` values of \d+ of the \d+ examples \(example_id [\d, .]+\) are "),
    ],
    ids=["nan-gradient", "non-finite-values"],
)
def test_a_non_finite_step_stops_the_run_and_keeps_the_steps_before(fault, says):
    recipe = recipe_from_dict(tiny(train={"epochs": 2}))
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 3 \(epoch 1\): " + says) as info:
        run(prepare(recipe), on_step=diverge_at(3, fault))
    assert "The values of steps 1-2 are kept" in str(info.value)
    partial = info.value.partial
    clean = run(prepare(recipe), max_steps=2)  # the same two steps, no fault
    assert partial.steps_done == 2 and partial.steps["step"].tolist() == [1, 2]
    for m in clean.methods:
        assert np.isfinite(partial.values[m]).all()
        assert np.array_equal(partial.values[m], clean.values[m])
    assert np.array_equal(partial.n_steps, clean.n_steps)


def test_without_attribution_a_divergence_keeps_the_step_rows_and_says_so():
    recipe = recipe_from_dict(tiny(train={"epochs": 2}, attribution={"enabled": False}))
    with pytest.raises(TrainingDiverged, match="The step rows of steps 1-2 are kept") as info:
        run(prepare(recipe, attribution=False), on_step=diverge_at(3, poison_gradient))
    assert "values" not in str(info.value) and info.value.partial.steps["step"].tolist() == [1, 2]


def test_cli_divergence_exits_2_names_the_step_and_keeps_finite_values(tmp_path):
    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path, tiny(optim={"name": "sgd", "lr": 1e30}, train={"epochs": 3}))
    res = cli("train", recipe, "--quiet", "--runs-dir", runs)
    assert res.exit_code == 2 and "Traceback" not in res.output
    flat = " ".join(res.output.split())
    assert "training diverged at step 2 (epoch 1): the training loss is nan" in flat
    run_dir = runs / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "incomplete" and "at step 2" in metrics["error"] and metrics["steps"] == 1
    values = pd.read_parquet(run_dir / "values.parquet")
    value_cols = [c for c in values.columns if c.startswith("value_")]
    assert value_cols and np.isfinite(values[value_cols].to_numpy()).all()
    assert values["n_steps"].sum() == 16  # the one finished step's batch
    assert pd.read_parquet(run_dir / "steps.parquet")["step"].tolist() == [1]


def test_divergence_at_the_first_step_leaves_valid_empty_tables(tmp_path):
    recipe = recipe_from_dict(tiny())
    with pytest.raises(TrainingDiverged, match="at step 1 .* No step finished") as info:
        run(prepare(recipe), on_step=diverge_at(1, poison_gradient))
    folder = runio.RunFolder(runio.create_run_dir(tmp_path, "r"))
    header = runio.start_run(folder, recipe)
    runio.fail_run(folder, header, info.value, partial=info.value.partial)  # checks every table's schema
    assert len(pd.read_parquet(folder.file("steps.parquet"))) == 0
    values = pd.read_parquet(folder.file("values.parquet"))
    assert (values["n_steps"] == 0).all() and (values["value_adam"] == 0).all()
    assert json.loads(folder.file("metrics.json").read_text())["status"] == "incomplete"


# --------------------------------------------------------------------------- extreme gradient scales


def scaled_run(scale: float, dtype: torch.dtype, steps: int = 3, eps: float = 1e-8, compile: bool = False):
    """InRunShapley on a small MLP whose loss (so every gradient) is multiplied by ``scale``.

    With eps scaled too, Adam's step is exactly scale-invariant: u(s·g; s·ε) = u(g; ε), so the
    Adam-aware values (η·⟨P·∇val, x_i⟩, P ~ 1/s, ∇val and x_i ~ s) must come out ``scale`` times
    the unscaled ones and the parameters must follow the same trajectory.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8 * (steps + 1), 5, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (8 * (steps + 1),), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=eps * scale)

    def loss_fn(out, t):
        return scale * F.cross_entropy(out, t, reduction="none")

    tracker = InRunShapley(model, opt, loss_fn, x[:8], y[:8], methods=("adam", "adam_fixed"), compile=compile)
    values = []
    for k in range(1, steps + 1):
        res = tracker.step(x[8 * k : 8 * (k + 1)], y[8 * k : 8 * (k + 1)])
        values.append({m: v.detach().clone() for m, v in res.values.items()})
    assert tracker.compile_failed is None
    tracker.close()
    return values, torch.cat([p.detach().flatten() for p in model.parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_adam_values_are_exact_at_extreme_gradient_scales_float64(scale):
    base, base_params = scaled_run(1.0, torch.float64)
    values, params = scaled_run(scale, torch.float64)
    assert torch.allclose(params, base_params, rtol=1e-12, atol=1e-14)
    for k, step in enumerate(values):
        for m, v in step.items():
            assert torch.isfinite(v).all(), (k, m)
            assert rel_err(v / scale, base[k][m]) < 1e-10, (k, m)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_adam_values_stay_finite_and_exact_at_extreme_scales_float32_first_step(scale):
    """float32: at the first step (Adam's moments still zero) 1e±30 gradients neither underflow nor
    overflow in the preconditioners (√(d·g²) is taken as a hypot, and P·∇val divides twice)."""
    base, _ = scaled_run(1.0, torch.float32, steps=1)
    values, _ = scaled_run(scale, torch.float32, steps=1)
    for m, v in values[0].items():
        assert torch.isfinite(v).all(), m
        assert rel_err(v / scale, base[0][m]) < 1e-5, m


# the compiled valuation normalises without reading a value: the same cases, compiled (slow: compiling
# takes seconds; skipped without the C++ compiler torch.compile needs on a CPU)
compiled = pytest.param(True, marks=[pytest.mark.slow, compiles], id="compiled")


@pytest.mark.parametrize("compile", [False, compiled])
def test_tiny_gradients_float32_later_steps_stay_finite(compile):
    """float32, 1e-30: torch's own exp_avg_sq underflows to 0 after the first step (the real Adam
    step then differs from the unscaled one), but the values stay finite numbers."""
    values, _ = scaled_run(1e-30, torch.float32, compile=compile)
    for step in values:
        for v in step.values():
            assert torch.isfinite(v).all()


@pytest.mark.parametrize("compile", [False, compiled])
def test_huge_gradients_float32_after_adams_state_overflows(compile):
    """torch's own exp_avg_sq overflows to inf after step 1, so its real step there is 0:
    the secant rule must give P = 0 there, not inf/inf."""
    values, _ = scaled_run(1e30, torch.float32, steps=2, compile=compile)
    assert torch.isfinite(values[1]["adam"]).all()
    if compile:  # exactly the eager values: P = 0 where the second moment overflowed, nowhere else
        eager, _ = scaled_run(1e30, torch.float32, steps=2)
        for got, want in zip(values, eager, strict=True):
            for m in want:  # at step 2 every second moment overflowed: all values are 0
                assert (got[m] - want[m]).abs().max() <= 1e-5 * want[m].abs().max(), m


def test_adams_secant_where_the_normaliser_underflows_float32():
    """v = 0 with a momentum left and gradients whose squares underflow float32: the normaliser's
    sum underflows, and the secant's ratio is bounded by its clamp (|q′| ≤ 1/√d) where it would
    otherwise blow up by 1e14; P then equals the float64 one."""
    from adamshap_core.precond import AdamState, adam_rule

    def P(dtype):
        g = torch.tensor([1e-23, -3e-23, 5e-24, 1e-30], dtype=dtype)
        m = torch.tensor([1e-3, -2e-3, 3e-3, 1e-6], dtype=dtype)
        return adam_rule(AdamState(1e-3, g, None, 0.9, 0.999, 1e-8, 3, m, torch.zeros(4, dtype=dtype)), 1.0)

    assert rel_err(P(torch.float32).double(), P(torch.float64)) <= 1e-6


def test_a_model_too_large_for_memory_is_bad_input(tmp_path):
    recipe = write_recipe(tmp_path, tiny(model={"kind": "mlp", "hidden": [10**10]}))
    res = cli("train", recipe, "--quiet", "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2, res.output
    assert "does not fit in memory" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
