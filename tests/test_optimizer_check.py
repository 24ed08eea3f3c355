"""An optimizer is valued by the rule of its torch base class (Adam, AdamW or SGD); one whose step
computes another update is refused on the tracker's first steps (optimizer_check.py), and one that
steps as its base class is valued as it."""

import pytest
import torch
from cases import cross_entropy
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from adamshap_core import InRunShapley
from adamshap_core.errors import UserError
from adamshap_core.optimizer_check import CHECKED_STEPS, SAMPLE


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3))


def _batch(gen, n=6):
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _batches(n_steps, gen):
    return [_batch(gen) for _ in range(n_steps)]


def _train(model, opt, n_steps, methods=("adam", "sgd")):
    gen = torch.Generator().manual_seed(1)
    val = _batches(1, gen)[0]
    tracker = InRunShapley(model, opt, cross_entropy, *val, methods)
    return [tracker.step(x, y).values for x, y in _batches(n_steps, gen)]


class LoggedAdamW(torch.optim.AdamW):
    """Wraps the step without changing it."""

    def step(self, closure=None):
        self.logged = getattr(self, "logged", 0) + 1
        return super().step(closure)


class ScaledAdam(torch.optim.Adam):
    """Steps 1% further than Adam: a departure of the size rounding never makes."""

    def step(self, closure=None):
        for group in self.param_groups:
            group["lr"] *= 1.01
        out = super().step(closure)
        for group in self.param_groups:
            group["lr"] /= 1.01
        return out


class DepartsFrom(ScaledAdam):
    """Adam until step ``start``, then 1% further on every step from there."""

    start = 2

    def step(self, closure=None):
        self.taken = getattr(self, "taken", 0) + 1
        return super().step(closure) if self.taken >= self.start else torch.optim.Adam.step(self, closure)


def state_renamed(key: str, name: str) -> type[torch.optim.Adam]:
    """Adam's rule with one entry of its state, ``key``, kept under another ``name`` between steps."""

    class Renamed(torch.optim.Adam):
        def step(self, closure=None):
            for state in self.state.values():
                state[key] = state.pop(name)
            out = super().step(closure)
            for state in self.state.values():
                state[name] = state.pop(key)
            return out

    Renamed.__name__ = f"{key.title().replace('_', '')}Renamed"
    return Renamed


class CenteredSGD(torch.optim.SGD):
    """Subtracts each gradient's mean before the step (a gradient-centralising optimizer)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.dim() > 1:
                    p.grad.sub_(p.grad.mean(dim=1, keepdim=True))
        return super().step(closure)


def _cpu_fused_adam() -> bool:
    """Whether this torch has Adam's fused kernel on the CPU (torch 2.4 on)."""
    try:
        torch.optim.Adam([nn.Parameter(torch.zeros(1))], fused=True)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, foreach=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6),
        pytest.param(
            lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
            marks=pytest.mark.skipif(not _cpu_fused_adam(), reason="this torch has no fused Adam on the CPU"),
        ),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    ],
    ids=["adam", "adam-l2-foreach", "adamw", "adam-fused", "sgd-momentum", "sgd-nesterov"],
)
def test_the_torch_optimizers_pass_the_check(make):
    model = _model()
    first, rest = model[0].parameters(), model[2].parameters()
    opt = make([{"params": list(first)}, {"params": list(rest), "lr": 3e-3}])  # groups of their own
    _train(model, opt, CHECKED_STEPS + 1, methods=("sgd",))


def test_a_subclass_that_steps_as_its_base_class_is_valued_as_it():
    model = _model()
    want = _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), 4)
    model = _model()
    opt = LoggedAdamW(model.parameters(), lr=1e-2)
    got = _train(model, opt, 4)
    assert opt.logged == 4
    for w, g in zip(want, got, strict=True):
        for method in w:
            assert torch.equal(w[method], g[method])


@pytest.mark.parametrize(
    ("cls", "step", "match"),
    [
        (
            ScaledAdam,
            1,
            r"optimizer ScaledAdam is valued by the rule of torch\.optim\.Adam, and it moved "
            r"'0\.weight' otherwise than torch\.optim\.Adam's step would",
        ),
        (DepartsFrom, 2, "optimizer DepartsFrom .* moved '0.weight' otherwise"),
        (state_renamed("exp_avg", "first"), 2, r"its state after a step holds no 'exp_avg'"),
        (state_renamed("step", "count"), 2, r"its state is not torch\.optim\.Adam's \(KeyError: 'step'\)"),
        (CenteredSGD, 1, r"optimizer CenteredSGD is valued by the rule of torch\.optim\.SGD"),
    ],
)
def test_a_subclass_that_changes_the_update_is_refused_on_a_checked_step(cls, step, match):
    model = _model()
    opt = cls(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    tracker = InRunShapley(model, opt, cross_entropy, *_batches(1, gen)[0], ("adam", "sgd"))
    batches = _batches(step, gen)
    for x, y in batches[:-1]:
        tracker.step(x, y)
    with pytest.raises(UserError, match=match):
        tracker.step(*batches[-1])
    # a later step would go unchecked, so the check's refusal closes the tracker (a state the view cannot
    # read is refused by every step again)
    later = (RuntimeError, "this tracker is closed") if "holds no" not in match else (UserError, match)
    with pytest.raises(later[0], match=later[1]):
        tracker.step(*batches[-1])


def test_only_the_first_steps_are_checked_and_a_new_tracker_checks_again():
    model = _model()
    opt = DepartsFrom(model.parameters(), lr=1e-2)
    opt.start = CHECKED_STEPS + 1
    _train(model, opt, CHECKED_STEPS + 2)  # departs unseen: the check is a sample of steps, not all
    with pytest.raises(UserError, match="DepartsFrom"):
        _train(model, opt, 1)  # as after a resume: a new tracker samples its first steps again


def test_the_sample_is_spread_over_large_parameters():
    """A departure on the last coordinates of a large weight is in the sample too."""

    class LastRowOff(torch.optim.Adam):
        @torch.no_grad()
        def step(self, closure=None):
            out = super().step(closure)
            self.param_groups[0]["params"][0].view(-1)[-1] += 1e-2
            return out

    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3))
    assert model[0].weight.numel() > 10 * SAMPLE
    gen = torch.Generator().manual_seed(1)
    vx, vy = torch.randn(2, 40, generator=gen), torch.randint(0, 3, (2,), generator=gen)
    tracker = InRunShapley(model, LastRowOff(model.parameters(), lr=1e-3), cross_entropy, vx, vy, ("adam",))
    with pytest.raises(UserError, match="'0.weight'"):
        tracker.step(torch.randn(4, 40, generator=gen), torch.randint(0, 3, (4,), generator=gen))


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 1000, 50257 * 768, 2**31 + 7])
def test_the_sample_stays_inside_parameters_of_any_size(n):
    """Past 2^24 coordinates a float32 linspace rounds n − 1 up to n, one past the end (a GPT-2-sized
    output layer, 50257 × 768, crashed its first step)."""
    from adamshap_core.optimizer_check import _spread

    at = _spread(n, torch.device("cpu"))
    assert len(at) == min(n, SAMPLE) and int(at.min()) == 0 and int(at.max()) == n - 1
    assert bool((at[1:] > at[:-1]).all())


def clamping(p):
    """Clips a gradient coordinate-wise, the way a user would add clipping by value."""
    p.grad.clamp_(-0.01, 0.01)


def _clamped_step_pre_hook(optimizer, args, kwargs):
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                clamping(p)


@pytest.mark.parametrize(
    "register,match",
    [
        (lambda model, opt: model[0].weight.register_post_accumulate_grad_hook(clamping), "post-accumulate"),
        (
            lambda model, opt: model[2].bias.register_hook(lambda g: g.clamp(-0.01, 0.01)),
            r"\(3,\) has a hook",
        ),
        (lambda model, opt: opt.register_step_pre_hook(_clamped_step_pre_hook), "Adam has a step pre-hook"),
        (
            lambda model, opt: register_optimizer_step_pre_hook(_clamped_step_pre_hook),
            "Adam has a step pre-hook",
        ),
    ],
    ids=["post-accumulate-grad", "tensor-hook", "step-pre-hook", "global-step-pre-hook"],
)
@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_a_hook_that_may_change_the_gradients_before_the_update_is_refused(register, match, fuse):
    """The values are each example's part of the gradient the backward pass sums: a hook that then
    changes that sum (here: clips it by value) makes them another step's. Registered after the
    tracker started, it is refused before the next step changes anything."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    tracker = InRunShapley(model, opt, cross_entropy, *_batch(gen), ("adam",), fuse_validation=fuse)
    tracker.step(*_batch(gen))
    handle = register(model, opt)
    try:
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(UserError, match=match):
            tracker.step(*_batch(gen))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    finally:
        handle.remove()
    tracker.step(*_batch(gen))  # and valued again once it is gone
