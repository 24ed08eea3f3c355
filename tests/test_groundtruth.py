"""The ground-truth code against answers known in closed form and against torch itself."""

import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adamshap_core import InRunShapley
from adamshap_core import groundtruth as gt
from adamshap_core.errors import UserError


def loss_fn(out, y):
    return F.cross_entropy(out, y, reduction="none")


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, eps=1e-6),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=5e-2),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=5e-2, momentum=0.9, dampening=0.1),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam-groups": lambda ps: torch.optim.Adam(
        [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "betas": (0.5, 0.9), "weight_decay": 0.2}],
        lr=1e-2,
    ),
}


def warm_up(model, opt, steps):
    """Real training steps so that the optimizer state is not empty."""
    for s in range(steps):
        x, y = batch(6, seed=10 + s)
        opt.zero_grad()
        loss_fn(model(x), y).mean().backward()
        opt.step()


def real_step(model, opt, flat_grad, slots):
    """One torch optimizer.step() on copies of model and optimizer, with .grad set from a flat vector."""
    model2, opt2 = copy.deepcopy((model, opt))  # one deepcopy keeps the optimizer's map to the parameters
    params2 = dict(model2.named_parameters())
    for s in slots:
        params2[s.name].grad = flat_grad[s.span].view(s.param.shape).clone()
    opt2.step()
    return torch.cat([params2[s.name].detach().reshape(-1) for s in slots])


@pytest.mark.parametrize("warm", [0, 3])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_is_torch_optimizer_step(float64, name, warm):
    model = small_model()
    opt = OPTIMIZERS[name](list(model.parameters()))
    warm_up(model, opt, warm)
    slots = gt.param_slots(model, opt)
    state_before = copy.deepcopy(opt.state_dict())
    update = gt.optimizer_update(slots, opt)
    grads = torch.randn(3, update.w.numel(), generator=torch.Generator().manual_seed(5))
    got = update(grads)
    for k in range(3):
        want = real_step(model, opt, grads[k], slots)
        assert torch.allclose(got[k], want, rtol=1e-12, atol=1e-15), k
    assert not torch.equal(got[0], update.w)  # the step moved the weights
    # reading the optimizer changed nothing in it
    after = opt.state_dict()
    for key, st in state_before["state"].items():
        for field, value in st.items():
            if value is None:  # older torch keeps SGD's momentum_buffer as None without momentum
                assert after["state"][key][field] is None
                continue
            assert torch.equal(torch.as_tensor(after["state"][key][field]), torch.as_tensor(value))


def test_clip_factor_is_recomputed_for_each_subset(float64):
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = batch(6)
    slots = gt.param_slots(model, opt)
    flat = gt.FlatModel(model, slots, loss_fn, torch.device("cpu"))
    update = gt.optimizer_update(slots, opt)
    grads, _ = flat.per_example_grads(update.w, x, y)
    game = gt.StepGame(flat, update, grads, *batch(4, seed=2), max_grad_norm=0.3)
    masks = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.float64)
    got = game.data_gradients(masks)
    for k, mask in enumerate(masks.bool()):
        model.zero_grad()
        (loss_fn(model(x[mask]), y[mask]).sum() / len(y)).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.3)
        want = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(got[k], want, rtol=1e-10, atol=1e-14), k
    assert float(game.clip_factors(masks @ grads / 6)[0]) < 1.0  # clipping is really on here


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd-momentum"])
def test_game_utility_is_the_real_step_on_the_real_validation_loss(float64, name):
    """U(S) against an independent reference: autograd on the subset, torch's clip, a real step."""
    model = small_model()
    opt = OPTIMIZERS[name](list(model.parameters()))
    warm_up(model, opt, 2)
    x, y = batch(6)
    vx, vy = batch(9, seed=3)
    slots = gt.param_slots(model, opt)
    flat = gt.FlatModel(model, slots, loss_fn, torch.device("cpu"))
    update = gt.optimizer_update(slots, opt)
    grads, _ = flat.per_example_grads(update.w, x, y)
    game = gt.StepGame(flat, update, grads, vx, vy, max_grad_norm=0.5)
    masks = (torch.rand(5, 6, generator=torch.Generator().manual_seed(4)) < 0.5).double()
    masks[0] = 1.0
    got = game(masks)
    with torch.no_grad():
        base = float(loss_fn(model(vx), vy).mean())
    for k, mask in enumerate(masks.bool()):
        model2, opt2 = copy.deepcopy((model, opt))
        opt2.zero_grad()
        (loss_fn(model2(x[mask]), y[mask]).sum() / len(y)).backward()
        torch.nn.utils.clip_grad_norm_(list(model2.parameters()), 0.5)
        opt2.step()
        with torch.no_grad():
            want = base - float(loss_fn(model2(vx), vy).mean())
        assert math.isclose(float(got[k]), want, rel_tol=1e-9, abs_tol=1e-14), k


# ---- Shapley machinery against closed forms ---------------------------------------------------


def table_game(table: dict[tuple[int, ...], float], n: int):
    """A game given by its value on every coalition (as sorted tuples of players)."""

    def game(masks):
        values = [table[tuple(int(i) for i in torch.nonzero(m).flatten())] for m in masks]
        return torch.tensor(values, dtype=torch.float64)

    return game


# A 3-player game; Shapley by hand: φ_0 = 1/3·1 + 1/6·(4−2) + 1/6·(3−0) + 1/3·(6−2) = 2.5,
# φ_1 = 1/3·2 + 1/6·(4−1) + 1/6·(2−0) + 1/3·(6−3) = 2.5, φ_2 = 0 + 1/6·(3−1) + 1/6·(2−2) + 1/3·(6−4) = 1.
THREE = {(): 0.0, (0,): 1.0, (1,): 2.0, (2,): 0.0, (0, 1): 4.0, (0, 2): 3.0, (1, 2): 2.0, (0, 1, 2): 6.0}


def test_three_player_game_enumerated_exactly():
    game = table_game(THREE, 3)
    assert torch.allclose(gt.exact_shapley(game, 3), torch.tensor([2.5, 2.5, 1.0], dtype=torch.float64))
    # LOO_i = U(N) − U(N∖i)
    assert torch.allclose(gt.leave_one_out(game, 3), torch.tensor([4.0, 3.0, 2.0], dtype=torch.float64))


def test_monte_carlo_on_three_players_converges_to_the_enumeration():
    game = table_game(THREE, 3)
    est = gt.monte_carlo_shapley(game, 3, 2000, torch.Generator().manual_seed(0), pairs_per_call=200)
    assert est.permutations == 2000
    assert torch.allclose(est.values, torch.tensor([2.5, 2.5, 1.0], dtype=torch.float64), atol=0.1)
    assert float(est.values.sum()) == pytest.approx(6.0, abs=1e-12)  # efficient in every permutation


def test_linear_game_shapley_equals_loo_equals_closed_form():
    a = torch.tensor([0.3, -1.2, 2.0, 0.0, 0.7], dtype=torch.float64)

    def game(masks):
        return masks @ a + 5.0  # U(∅) = 5 is not attributed

    assert torch.allclose(gt.exact_shapley(game, 5), a)
    assert torch.allclose(gt.leave_one_out(game, 5), a)
    est = gt.monte_carlo_shapley(game, 5, 6, torch.Generator().manual_seed(0))
    assert torch.allclose(est.values, a)
    assert torch.allclose(est.se, torch.zeros(5, dtype=torch.float64), atol=1e-12)  # no variance
    assert (est.u_empty, est.u_full) == pytest.approx((5.0, 5.0 + float(a.sum())))


def quadratic_sign_game(n, seed=0):
    """A nonlinear game (an interaction term and a threshold) with known exact values by enumeration."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)

    def game(masks):
        return (masks @ a) ** 2 + torch.tanh(3 * (masks @ b))

    return game


def test_monte_carlo_converges_as_permutations_grow():
    n = 8
    game = quadratic_sign_game(n)
    exact = gt.exact_shapley(game, n)
    errors, last = [], None
    for perms in (4, 64, 1024):
        est = gt.monte_carlo_shapley(game, n, perms, torch.Generator().manual_seed(1))
        errors.append(float((est.values - exact).abs().max()))
        ends = game(torch.tensor([[0.0] * n, [1.0] * n], dtype=torch.float64))
        assert float(est.values.sum()) == pytest.approx(float(ends[1] - ends[0]), abs=1e-12)
        last = est
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.25 * errors[0]
    # the reported standard error describes the actual error
    z = ((last.values - exact).abs() / last.se).max()
    assert float(z) < 5.0
    assert float(last.se.max()) < float(
        gt.monte_carlo_shapley(game, n, 64, torch.Generator().manual_seed(1)).se.max()
    )


def test_the_standard_error_is_the_spread_of_the_pair_averages_over_root_pairs():
    """Two pairs: their averages e1 (the first pair alone, drawn first from the same seed) and e2;
    the standard error is their sample std over √2, |e1 − e2| / 2."""
    n = 6
    game = quadratic_sign_game(n, seed=3)
    e1 = gt.monte_carlo_shapley(game, n, 2, torch.Generator().manual_seed(5)).values
    both = gt.monte_carlo_shapley(game, n, 4, torch.Generator().manual_seed(5))
    e2 = 2 * both.values - e1
    assert torch.allclose(both.se, (e1 - e2).abs() / 2, rtol=1e-12, atol=1e-15)
    assert float(both.se.max()) > 0


def test_one_player_and_bad_permutation_counts():
    game = table_game({(): 1.0, (0,): 3.0}, 1)
    est = gt.monte_carlo_shapley(game, 1, 2, torch.Generator())
    assert est.values.tolist() == [2.0]
    for bad in (0, 1, 3):
        with pytest.raises(ValueError, match="even"):
            gt.monte_carlo_shapley(game, 1, bad, torch.Generator())


# ---- one step's truth from the live model and optimizer ----------------------------------------------


def test_step_truth_leaves_model_and_optimizer_alone_and_splits_the_engine_values(float64):
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.05)
    vx, vy = batch(9, seed=3)
    tracker = InRunShapley(model, opt, loss_fn, vx, vy, ("adam", "adam_fixed", "sgd"), max_grad_norm=0.5)
    for s in range(2):
        tracker.step(*batch(6, seed=20 + s))
    x, y = batch(6)
    params = copy.deepcopy(list(model.parameters()))
    state = copy.deepcopy(opt.state_dict())
    truth = gt.step_truth(
        3,
        model,
        opt,
        loss_fn,
        x,
        y,
        vx,
        vy,
        max_grad_norm=0.5,
        permutations=8,
        generator=torch.Generator().manual_seed(0),
        methods=("adam", "adam_fixed", "sgd"),
    )
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert str(opt.state_dict()) == str(state)
    assert truth.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert truth.shapley.sum() == pytest.approx(truth.u_full - truth.u_empty, abs=1e-12)
    assert truth.val_loss == pytest.approx(float(loss_fn(model(vx), vy).mean().detach()))
    got = tracker.step(x, y).values
    for m, v in got.items():
        assert torch.allclose(torch.as_tensor(truth.by_param[m].sum(1)), v, rtol=1e-9, atol=1e-15), m
    tracker.close()


def test_small_sgd_steps_make_the_game_linear_and_every_value_agree(float64):
    """With plain SGD and a tiny lr, U is linear in the batch: Shapley = LOO = the sgd formula."""
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    x, y = batch(6)
    vx, vy = batch(9, seed=3)
    truth = gt.step_truth(
        1,
        model,
        opt,
        loss_fn,
        x,
        y,
        vx,
        vy,
        max_grad_norm=None,
        permutations=4,
        generator=torch.Generator().manual_seed(0),
        methods=("sgd",),
    )
    sgd = truth.by_param["sgd"].sum(1)
    scale = abs(sgd).max()
    assert abs(truth.shapley - sgd).max() < 1e-4 * scale
    assert abs(truth.loo - sgd).max() < 1e-4 * scale
    assert truth.shapley_se.max() < 1e-4 * scale


def _first_step_truth(model, opt):
    """The ground truth of a first step of 6 examples, with 9 validation rows."""
    x, y = batch(6)
    vx, vy = batch(9, seed=3)
    return gt.step_truth(
        1, model, opt, loss_fn, x, y, vx, vy, max_grad_norm=0.5, permutations=4,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


def test_a_wide_model_evaluates_fewer_coalitions_at_once_and_the_same_values(float64, monkeypatch):
    """Each coalition in flight holds several vectors of the model's size: a model of millions of
    parameters takes a few at a time, where 64 took tens of GB; how many changes no value."""
    assert gt.coalition_chunk(1_000) == gt.MAX_COALITIONS
    assert gt.coalition_chunk(4_000_000) == 2
    assert gt.coalition_chunk(10**9) == 1
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    truth = functools.partial(_first_step_truth, model, opt)
    wide = truth()
    monkeypatch.setattr(gt, "coalition_chunk", lambda n_params: 1)
    narrow = truth()
    assert wide.shapley.tolist() == narrow.shapley.tolist() and wide.loo.tolist() == narrow.loo.tolist()


def test_large_validation_forwards_take_fewer_coalitions_and_rows_at_a_time_and_the_same_values(
    float64, monkeypatch
):
    """A language model's logits for its validation rows are what a coalition's forward holds most of
    (9 GB for 200 texts and 15 coalitions of a 7,000-word model): where they are large, fewer
    coalitions and fewer validation rows go at once, and no value changes beyond rounding."""
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    flat = gt.FlatModel(model, gt.param_slots(model, opt), loss_fn, torch.device("cpu"))
    # Linear 7, Tanh 7, Linear 3 and the Sequential's own 3, then the output twice more
    row = batch(1, seed=3)[0].double()
    assert flat.row_floats(gt.optimizer_update(flat.slots, opt).w, row) == 7 + 7 + 3 + 3 + 2 * 3
    truth = functools.partial(_first_step_truth, model, opt)
    whole = truth()
    seen = []
    real = gt.FlatModel.mean_losses
    monkeypatch.setattr(
        gt.FlatModel, "mean_losses", lambda self, W, *a: seen.append((W.shape[0], a[2])) or real(self, W, *a)
    )
    monkeypatch.setattr(gt, "ACTIVATION_BYTES", 8 * 26 * 4)  # four rows' forwards
    parts = truth()
    assert max(k for k, _ in seen) == 4  # coalitions at once
    assert all(k * rows <= 4 for k, rows in seen)  # coalitions times validation rows at once
    for got, want in [(parts.shapley, whole.shapley), (parts.loo, whole.loo)]:
        assert np.allclose(got, want, rtol=1e-12, atol=1e-15 * np.abs(want).max())


def test_out_of_memory_in_a_steps_ground_truth_says_what_takes_the_memory(monkeypatch):
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = batch(6)
    n_params = sum(p.numel() for p in model.parameters())

    def short_of_memory(*args):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8463000000 bytes")

    monkeypatch.setattr(gt.FlatModel, "per_example_grads", short_of_memory)
    with pytest.raises(UserError) as e:
        gt.step_truth(
            4, model, opt, loss_fn, x, y, *batch(9, seed=3), max_grad_norm=None, permutations=2,
            generator=torch.Generator(),
        )  # fmt: skip
    said = str(e.value)
    assert said.startswith("out of memory on cpu computing the ground truth of step 4")
    assert f"(6 x {n_params:,} parameters x 8 bytes = 0.0 GiB)" in said and "smaller train.batch_size" in said
    monkeypatch.setattr(gt.FlatModel, "per_example_grads", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # other errors pass as they are
        gt.step_truth(
            4, model, opt, loss_fn, x, y, *batch(9, seed=3), max_grad_norm=None, permutations=2,
            generator=torch.Generator(),
        )  # fmt: skip
