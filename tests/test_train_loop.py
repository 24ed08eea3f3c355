"""The training loop: determinism, schedules, the observer hook, value accumulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny, tiny_gpt

from adamshap_core.errors import UserError
from adamshap_core.recipe import recipe_from_dict
from adamshap_core.train import evaluate, lr_factor, prepare, run, sample_record_steps, train


def R(**sections):
    return recipe_from_dict(tiny(**sections))


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_plain_training_is_deterministic():
    r = R(attribution={"enabled": False}, train={"epochs": 2})
    a, b = train(r), train(r)
    assert torch.equal(params(a.model), params(b.model))
    assert a.steps["train_loss"].tolist() == b.steps["train_loss"].tolist()
    assert a.steps_done == 2 * math.ceil(a.data.n_train / 16) == len(a.steps)
    c = train(R(attribution={"enabled": False}, train={"epochs": 2, "seed": 1}))
    assert not torch.equal(params(a.model), params(c.model))


def test_training_reports_its_progress_and_prints_nothing(capfd):
    calls = []
    result = train(R(train={"epochs": 2}), on_progress=lambda *args: calls.append(args))
    total = result.steps_done
    assert calls[0][:2] == (0, total) and math.isnan(calls[0][2]) and calls[0][3] == 0.0
    assert [c[0] for c in calls[1:]] == list(range(1, total + 1)) and {c[1] for c in calls} == {total}
    assert [c[2] for c in calls[1:]] == result.steps["train_loss"].tolist()
    assert all(c[3] > 0 for c in calls[1:])
    out, err = capfd.readouterr()
    assert out == err == ""


@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_attribution_does_not_change_training(fuse):
    off = train(R(attribution={"enabled": False}))
    on = train(R(attribution={"fuse_validation": fuse}))
    assert torch.allclose(params(off.model), params(on.model), atol=1e-6, rtol=0)
    assert np.allclose(off.steps["train_loss"], on.steps["train_loss"], atol=1e-6)


def test_with_dropout_a_plain_run_trains_as_a_valued_one_and_measures_its_validation_loss_alike():
    """The loss a plain run records is measured in eval mode, as a tracker measures it: measured in
    train mode, its dropout drew random numbers that the training forward then lacked (a parameter
    gap of 0.09 after 5 steps), so a prune retrain did not reproduce the valued run it prunes."""
    recipe = tiny_gpt(model={"dropout": 0.2}, train={"epochs": 1})
    off = train(recipe_from_dict({**recipe, "attribution": {**recipe["attribution"], "enabled": False}}))
    on = train(recipe_from_dict(recipe))
    assert torch.equal(params(off.model), params(on.model))
    assert off.steps["train_loss"].tolist() == on.steps["train_loss"].tolist()
    # at the first step both measure the same weights (later, the tracker's float64 ∇val pass rounds apart)
    assert off.steps["val_loss"].iloc[0] == pytest.approx(on.steps["val_loss"].iloc[0], rel=1e-6)


def test_fused_validation_rows_give_the_separate_pass_values():
    separate = train(R())
    fused_prep = prepare(R(attribution={"fuse_validation": True}))
    fused = run(fused_prep)
    assert fused_prep.tracker.fusion_blocked is None  # the recipe key reached the tracker
    for m in separate.methods:
        scale = np.abs(separate.values[m]).max()
        assert np.abs(fused.values[m] - separate.values[m]).max() <= 1e-4 * scale, m
    assert np.allclose(fused.steps["val_loss"], separate.steps["val_loss"], rtol=1e-5)


def test_the_steps_table_records_what_the_fast_modes_checks_found():
    exact = train(R(train={"epochs": 2}))
    fast = train(R(train={"epochs": 2}, attribution={"fast": {"warmup": 1, "rank": None}}))
    assert exact.steps["reuse_pearson"].isna().all()
    found = fast.steps.set_index("step")["reuse_pearson"]
    assert found.notna().any() and (found.dropna() <= 1.0).all()
    assert np.isfinite(found[2])  # the first step after the warm-up checks the one before it
    assert found.notna().sum() <= fast.steps["val_loss"].notna().sum() - 1  # only where ∇val was recomputed


def test_values_accumulate_over_steps():
    r = R(train={"epochs": 2}, attribution={"record_steps": 1000})
    res = train(r)
    assert (res.n_steps == 2).all()  # two epochs: every example in two batches, whose values add up
    sv = res.steps_values
    assert sorted(sv["step"].unique()) == list(range(1, res.steps_done + 1))
    for m in res.methods:
        per_example = sv.groupby("example_id")[f"value_{m}"].sum().reindex(range(res.data.n_train))
        assert np.allclose(per_example.to_numpy(), res.values[m], rtol=0, atol=1e-12)
        assert np.isfinite(res.values[m]).all() and np.abs(res.values[m]).sum() > 0
    vf = res.values_frame()
    assert list(vf.columns[:4]) == ["example_id", "value_adam", "value_adam_fixed", "value_sgd"]
    assert {"n_steps", "label", "is_noisy"} <= set(vf.columns)


def test_two_epochs_count_steps_per_example():
    res = train(R(train={"epochs": 2}, attribution={"methods": ["sgd"], "record_steps": 0}))
    assert (res.n_steps == 2).all() and res.steps_values.empty
    assert list(res.steps_values.columns) == ["step", "example_id", "value_sgd"]


def test_record_step_sampling():
    assert sample_record_steps(100, 8) == [1, 2, 3, 4, 5, 6, 53, 100]
    assert sample_record_steps(100, 3) == [1, 2, 3]
    assert sample_record_steps(4, 8) == [1, 2, 3, 4]
    assert sample_record_steps(10, 0) == []
    s = sample_record_steps(1000, 20)
    assert len(s) == 20 and s[:5] == [1, 2, 3, 4, 5] and s[-1] == 1000 and s == sorted(set(s))


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_schedules(schedule):
    r = R(
        optim={"schedule": schedule, "warmup_steps": 3, "lr": 0.01},
        train={"epochs": 3},
        attribution={"enabled": False},
    )
    res = train(r)
    lrs = res.steps["lr"].to_numpy()
    f = lr_factor(schedule, 3, res.total_steps)
    assert np.allclose(lrs, [0.01 * f(s) for s in range(res.total_steps)])
    assert np.allclose(lrs[:3], [0.01 / 3, 0.02 / 3, 0.01])
    assert (lrs > 0).all()
    if schedule != "constant":
        assert lrs[-1] < 0.01 * 0.1 and (np.diff(lrs[3:]) <= 1e-12).all()


def test_on_step_sees_the_state_before_each_step():
    seen = []

    def hook(step, batch, ctx):
        state = ctx.optimizer.state[next(iter(ctx.model.parameters()))]
        done = int(state["step"]) if "step" in state else 0
        seen.append((step, len(batch), done, ctx.lr, ctx.tracker is not None, ctx.inputs.shape[0]))

    res = train(R(train={"epochs": 1}), on_step=hook, max_steps=4)
    assert res.steps_done == 4 and len(res.steps) == 4
    assert [s[0] for s in seen] == [1, 2, 3, 4]
    assert all(s[2] == s[0] - 1 for s in seen)  # the optimizer has made step-1 updates
    assert all(s[1] == 16 == s[5] and s[3] == pytest.approx(0.01) and s[4] for s in seen)


def test_keep_subset_and_optimizers():
    r = R(optim={"name": "sgd", "lr": 0.1, "momentum": 0.9}, attribution={"enabled": False})
    res = train(r, keep=list(range(0, 100, 2)))
    assert res.data.n_train == 50 and res.data.example_id.tolist() == list(range(0, 100, 2))
    assert isinstance(prepare(r).optimizer, torch.optim.SGD)
    aw = prepare(R(optim={"name": "adamw", "weight_decay": 0.1}))
    assert isinstance(aw.optimizer, torch.optim.AdamW) and aw.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert aw.tracker is not None
    aw.tracker.close()


def test_val_batch_limits_the_validation_target():
    prep = prepare(R(attribution={"val_batch": 5}))
    assert torch.equal(prep.val_x, prep.data.x_val[:5]) and torch.equal(prep.val_y, prep.data.y_val[:5])
    prep.tracker.close()


def test_evaluate_is_the_mean_loss_per_example_and_the_accuracy_of_every_real_target():
    """A classifier: every label counts, class 0 included. A language model: the mean of the
    per-sequence losses, and next-token accuracy over the tokens that are not padding (-100)."""
    from adamshap_core.models import per_example_loss, sequence_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 3, generator=gen)
    y = torch.arange(50) % 3
    loss, acc = evaluate(lambda x: x, logits, y, batch=16)
    assert loss == pytest.approx(float(per_example_loss(logits, y).mean()))
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    seq = torch.randn(6, 5, 7, generator=gen)
    ty = torch.randint(0, 7, (6, 5), generator=gen)
    ty[:, 3:] = -100  # the last two positions are padding
    loss, acc = evaluate(lambda x: x, seq, ty, loss_fn=sequence_loss, batch=4)
    assert loss == pytest.approx(float(sequence_loss(seq, ty).mean()))
    real = ty >= 0
    assert acc == pytest.approx(float((seq.argmax(-1) == ty)[real].float().mean()))


def test_cnn_on_digits():
    r = recipe_from_dict(
        tiny(
            data={"source": "sklearn:digits", "val_size": 50, "test_size": 50},
            model={"kind": "cnn", "channels": [4, 8], "hidden": []},
        )
    )
    res = train(r, max_steps=3)
    assert res.steps_done == 3 and all(np.isfinite(res.values[m]).all() for m in res.methods)
    assert tuple(res.data.x_train.shape[1:]) == (1, 8, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_absent_is_a_user_error():
    with pytest.raises(UserError, match="`train.device` is cuda"):
        prepare(R(train={"device": "cuda"}))


def test_divergence_is_reported_with_the_step():
    r = R(optim={"name": "sgd", "lr": 1e30}, attribution={"enabled": False}, train={"epochs": 3})
    with pytest.raises(UserError, match="at step"):
        train(r)


def test_the_tracker_and_the_replay_stand_in_are_what_the_loop_asks_for():
    """Both have every member of ``StepValuer`` (isinstance checks their presence, not their types),
    and the stand-in's checkpoint state brings back its sums."""
    from adamshap_core.attribute import QueryValues
    from adamshap_core.train import StepValuer

    prep = prepare(R())
    assert isinstance(prep.tracker, StepValuer)
    x, y = prep.val_x[:2], prep.val_y[:2]
    stand_in = QueryValues(prep.tracker, x, y, prep.data.n_train)
    assert isinstance(stand_in, StepValuer) and not stand_in.fuse_validation and stand_in.rows_blocked is None
    prep.tracker = stand_in
    result = run(prep, max_steps=3, on_step=lambda step, batch, ctx: stand_in.observe(batch))
    assert result.steps_done == 3 and stand_in.sums["adam"].any()
    state = stand_in.state_dict()
    again = QueryValues(prepare(R()).tracker, x, y, prep.data.n_train)
    again.load_state_dict(state)
    assert all(np.array_equal(again.sums[m], stand_in.sums[m]) for m in stand_in.methods)
    stand_in.close()
    again.close()


def test_a_non_finite_gradient_under_a_finite_loss_is_divergence():
    """Found at its step, naming the parameter, also without attribution."""
    from adamshap_core.train import non_finite_problem

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert non_finite_problem(0.5, model, {}, 0.5) == ""
    model[1].weight.grad[0, 1] = math.inf
    assert non_finite_problem(0.5, model, {}, 0.5) == (
        "the gradient of parameter `1.weight` has non-finite entries; expected finite gradients"
    )


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_an_infinite_value_is_divergence_as_a_nan_is(bad):
    from adamshap_core.train import non_finite_problem

    values = {"adam": np.array([0.1, bad, 0.3])}
    assert non_finite_problem(0.5, torch.nn.Linear(2, 1), values, 0.5) == (
        "the `adam` values of 1 of the 3 examples are non-finite"
    )
    # named by their example ids, the first five
    assert non_finite_problem(0.5, torch.nn.Linear(2, 1), values, 0.5, np.array([7, 41, 3])) == (
        "the `adam` values of 1 of the 3 examples (example_id 41) are non-finite"
    )
    many = {"sgd": np.full(7, bad)}
    assert non_finite_problem(0.5, torch.nn.Linear(2, 1), many, math.nan, np.arange(10, 17)) == (
        "the `sgd` values of 7 of the 7 examples (example_id 10, 11, 12, 13, 14, ...) are non-finite"
        " (the validation loss is nan)"
    )


def test_a_run_evaluates_only_the_splits_its_caller_reads(monkeypatch):
    """The training split of a large text source took a minute to evaluate after the last step: a
    replay (compare, attribute) reads only the parameters' digest, a prune retrain the test split."""
    from adamshap_core import prune
    from adamshap_core import train as train_module

    evaluated = []
    real = train_module.evaluate
    monkeypatch.setattr(
        train_module, "evaluate", lambda m, x, *a, **k: evaluated.append(len(x)) or real(m, x, *a, **k)
    )
    recipe = R()
    full = run(prepare(recipe))
    prep = prepare(recipe)
    n_train, n_val, n_test = prep.data.n_train, len(prep.data.y_val), len(prep.data.y_test)
    assert evaluated == [n_train, n_val, n_test] and {"train_loss", "val_accuracy", "test_loss"} <= set(
        full.metrics
    )
    evaluated.clear()
    replayed = run(prep, splits=())
    assert evaluated == [] and replayed.metrics["params_sha256"] == full.metrics["params_sha256"]
    assert not any(key.endswith(("_loss", "_accuracy")) for key in replayed.metrics)
    job = prune.Retrain(prune.FULL, "low", 0.0, 0, recipe.train.seed, np.array([], dtype=np.int64))
    row = prune.retrain(job, recipe, prep.data)
    assert evaluated == [n_test] and row["test_accuracy"] == full.metrics["test_accuracy"]


def test_a_retrain_measures_no_validation_loss_and_a_plain_run_one_per_step(monkeypatch):
    """A prune retrain reads no step's validation loss: measuring it cost 14% of a retrain at 200
    validation rows, and 17 times the retrain itself at 15,000."""
    from adamshap_core import prune
    from adamshap_core import train as train_module

    measured = []
    real = train_module.validation_loss
    monkeypatch.setattr(train_module, "validation_loss", lambda *a: measured.append(1) or real(*a))
    recipe = R(attribution={"enabled": False})
    plain = train(recipe)
    assert len(measured) == plain.steps_done and plain.steps["val_loss"].notna().all()
    measured.clear()
    job = prune.Retrain(prune.FULL, "low", 0.0, 0, recipe.train.seed, np.array([], dtype=np.int64))
    row = prune.retrain(job, recipe, plain.data)
    assert measured == [] and row["test_loss"] == plain.metrics["test_loss"]
