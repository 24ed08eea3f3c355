"""Models and optimizers whose values the engine would get wrong are refused with a clear error, at
start-up or at the step where they change, never valued silently (coverage.py); the models it can
value are still valued exactly."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from bruteforce import reference_values
from cases import cross_entropy, sequence_cross_entropy
from conftest import rel_err
from torch import nn

from adamshap_core import InRunShapley
from adamshap_core.coverage import recheck_due
from adamshap_core.errors import UserError

METHODS = ("adam", "sgd")


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)


class TiedOutsideForward(TwoLinear):
    """Uses the first layer's weight again through ``F.linear``, where no hook sees it."""

    def forward(self, x):
        return self.out(F.linear(torch.tanh(self.lin(x)), self.lin.weight))


class CallsForwardDirectly(TwoLinear):
    """Calls a submodule's ``forward`` itself, which skips the module's hooks."""

    def forward(self, x):
        return self.out(self.lin.forward(self.lin(x)))


class DoubledLinear(nn.Linear):
    """A subclass of a supported layer whose forward computes something else than its kernel assumes."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


class ScaledEmbedding(nn.Embedding):
    """Scales its output by √d, as some language models do."""

    def forward(self, idx):
        return super().forward(idx) * math.sqrt(self.embedding_dim)


class TinyScaledLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = ScaledEmbedding(7, 4)
        self.head = nn.Linear(4, 7)

    def forward(self, idx):
        return self.head(torch.tanh(self.tok(idx)))


class SequenceFirst(nn.Module):
    """Applies its layer to [T, B, d]: along the positions, not the batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):  # x [B, T, 5]
        return self.out(self.lin(x.transpose(0, 1)).transpose(0, 1).mean(1))


class BroadcastPositions(nn.Module):
    """Positions from arange(T), not expanded to the batch."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(4, 5)
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x + self.pos(torch.arange(x.shape[1]))).mean(1)


def tabular(n, gen):
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def sequences(T):
    return lambda n, gen: (torch.randn(n, T, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def tokens(n, gen):
    return torch.randint(0, 7, (n, 3), generator=gen), torch.randint(0, 7, (n, 3), generator=gen)


WRONG = {
    "tied-outside": (TiedOutsideForward, tabular, cross_entropy, "gradient of 'lin.weight'"),
    "direct-forward": (CallsForwardDirectly, tabular, cross_entropy, "gradient of 'lin.weight'"),
    "subclass-linear": (
        lambda: nn.Sequential(DoubledLinear(5, 4), nn.Tanh(), nn.Linear(4, 3)),
        tabular,
        cross_entropy,
        "gradient of '0.weight'",
    ),
    "subclass-embedding": (TinyScaledLM, tokens, sequence_cross_entropy, "gradient of 'tok.weight'"),
    # the layer's rows are positions; with T = 3 rows checked (a, b, a), only their gradients tell
    "sequence-first": (SequenceFirst, sequences(3), cross_entropy, "gradient of 'lin.weight'"),
    "sequence-first-T4": (SequenceFirst, sequences(4), cross_entropy, "called on 4 rows for 3 validation"),
    "broadcast": (BroadcastPositions, sequences(4), cross_entropy, "called on 4 rows for 3 validation"),
}


@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("case", list(WRONG))
def test_a_model_the_hooks_do_not_fully_see_is_refused_at_start_up(case, fuse):
    make, data, loss, why = WRONG[case]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = make()
    vx, vy = data(3, gen)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(UserError, match=f"this model cannot be valued: .*{why}"):
        InRunShapley(model, opt, loss, vx, vy, METHODS, fuse_validation=fuse)
    assert not any(m._forward_hooks for m in model.modules())  # the refused tracker took its hooks away


class ZeroHeadOutsideForward(TiedOutsideForward):
    """``TiedOutsideForward`` with its head initialised to zero: at start-up no gradient flows back
    through the use the hooks miss, so the start-up check cannot see it; after one step it can."""

    def __init__(self):
        super().__init__()
        nn.init.zeros_(self.out.weight)


@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_a_use_the_hooks_miss_behind_a_zero_head_is_refused_once_the_weights_move(fuse):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ZeroHeadOutsideForward()
    vx, vy = tabular(3, gen)
    tracker = InRunShapley(
        model, torch.optim.Adam(model.parameters()), cross_entropy, vx, vy, METHODS, fuse_validation=fuse
    )
    tracker.step(*tabular(6, gen))  # the head is still zero at step 1: nothing missed yet
    weights = [p.clone() for p in model.parameters()]
    with pytest.raises(
        UserError, match="gradient of 'lin.weight'.*found at step 2, on rows of its training batch"
    ):
        tracker.step(*tabular(6, gen))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))  # no step taken


class BatchCentred(TwoLinear):
    """Centres each feature over the batch: every example's gradient depends on the others."""

    def forward(self, x):
        h = self.lin(x)
        return self.out(torch.tanh(h - h.mean(0)))


def test_rows_that_interact_are_refused_at_the_first_step_where_one_validation_row_cannot_show_it():
    gen = torch.Generator().manual_seed(0)
    model = BatchCentred()
    vx, vy = tabular(3, gen)
    with pytest.raises(UserError, match="do the rows of a batch interact"):  # two rows show it at once
        InRunShapley(model, torch.optim.Adam(model.parameters()), cross_entropy, vx, vy, METHODS)
    tracker = InRunShapley(
        model, torch.optim.Adam(model.parameters()), cross_entropy, vx[:1], vy[:1], METHODS
    )
    with pytest.raises(UserError, match="do the rows of a batch interact.*found at step 1"):
        tracker.step(*tabular(6, gen))


class SortsItsRows(TwoLinear):
    """Runs its first layer on the rows sorted by their first feature (as packing by length does), then
    puts them back: a hook sees row k's activations at the sorted position of row k."""

    def forward(self, x):
        order = x[:, 0].argsort()
        return self.out(torch.tanh(self.lin(x[order]))[order.argsort()])


@pytest.mark.parametrize("descending", [False, True])
def test_a_model_that_reorders_its_rows_is_refused_whatever_the_order_of_the_checked_rows(descending):
    """Two rows already in the model's order would pass a check of them alone: rows a, b, a do not."""
    gen = torch.Generator().manual_seed(0)
    model = SortsItsRows()
    vx, vy = tabular(4, gen)
    vx[:2, 0] = torch.tensor([3.0, -3.0] if descending else [-3.0, 3.0])
    with pytest.raises(UserError, match="does the model reorder them"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), cross_entropy, vx, vy, METHODS)


class AddsBroadcastPositions(TwoLinear):
    """Adds a [1, T, 5] tensor from its inputs to every row, as a model given position_ids of shape
    [1, T] broadcasts them: no parameter sees it, so the rows stay apart."""

    def forward(self, inputs):
        return self.out(torch.tanh(self.lin(inputs["x"] + inputs["pos"])).mean(1))


def test_a_tensor_broadcast_over_the_batch_in_the_inputs_is_left_whole_by_the_check():
    gen = torch.Generator().manual_seed(0)
    model = AddsBroadcastPositions()
    pos = torch.randn(1, 4, 5, generator=gen)
    vx, vy = sequences(4)(3, gen)
    tracker = InRunShapley(
        model, torch.optim.Adam(model.parameters()), cross_entropy, {"x": vx, "pos": pos}, vy
    )
    for _ in range(2):  # step 2 checks rows a, b, a of its training batch
        x, y = sequences(4)(5, gen)
        tracker.step({"x": x, "pos": pos}, y)


def test_the_check_runs_again_at_step_2_and_every_power_of_ten(monkeypatch):
    from adamshap_core import tracker as tracker_module

    assert [s for s in range(1, 2001) if recheck_due(s, rows_checked=2)] == [2, 10, 100, 1000]
    assert recheck_due(1, rows_checked=1) and not recheck_due(3, rows_checked=1)
    checked = []
    real = tracker_module.coverage_problem
    monkeypatch.setattr(tracker_module, "coverage_problem", lambda *a: checked.append(a[3]) or real(*a))
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    tracker = _tracker(model, torch.optim.Adam(model.parameters()), gen)
    batches = [tabular(6, gen) for _ in range(12)]
    for x, y in batches:
        tracker.step(x, y)
    assert [next(i for i, (x, _) in enumerate(batches) if x is c) + 1 for c in checked[1:]] == [2, 10]


def test_the_check_builds_one_rows_gradients_at_a_time(monkeypatch):
    """Rows a, b, a side by side took three times the model's size at once (a wide model's start-up
    and re-checks peaked there); each row on its own takes one, and still shows rows that interact."""
    from adamshap_core.engine import GhostEngine

    built = []
    real = GhostEngine.extra_gradients

    def recorded(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        built.append({len(g) for g in out.values()})
        return out

    monkeypatch.setattr(GhostEngine, "extra_gradients", recorded)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    tracker = _tracker(model, torch.optim.Adam(model.parameters()), gen)
    assert len(built) == 2 * 3 and all(rows == {1} for rows in built)  # rows a, b, a: values, then gradients
    built.clear()
    tracker.step(*tabular(6, gen))
    tracker.step(*tabular(6, gen))  # step 2 checks its training batch again
    assert {1} in built and all(rows == {1} for rows in built[built.index({1}) :])


def test_norm64_sums_in_float64_a_chunk_at_a_time(monkeypatch):
    from adamshap_core import coverage

    monkeypatch.setattr(coverage, "NORM_CHUNK", 1000)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 1234, generator=gen) * 1e3, torch.randn(3, 1234, generator=gen)
    assert coverage.norm64(x) == pytest.approx(float(x.double().norm()), rel=1e-14)
    assert coverage.norm64(x, minus=y) == pytest.approx(float((x.double() - y.double()).norm()), rel=1e-14)
    assert coverage.norm64(torch.zeros(0)) == 0.0
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert coverage.norm64(g, minus=torch.ones(2, dtype=torch.float64)) == pytest.approx(13**0.5)
    assert g.tolist() == [3.0, 4.0]  # a float64 argument is read, never written (its chunks are copies)
    with pytest.raises(ValueError, match="2 and 3 elements"):
        coverage.norm64(g, minus=torch.ones(3))


def test_the_start_up_check_changes_nothing_training_will_see():
    """It runs the model (dropout draws random numbers): the random state, the modes and .grad stay."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    model[1].eval()
    vx, vy = tabular(3, gen)
    before = torch.get_rng_state()
    InRunShapley(model, torch.optim.Adam(model.parameters()), cross_entropy, vx, vy, METHODS)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training and not model[1].training
    assert all(p.grad is None for p in model.parameters())


def _batch_norm_model():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    model[1].requires_grad_(False)  # a batch norm's own parameters have no kernel
    return model


def test_a_batch_norm_on_batch_statistics_is_refused():
    gen = torch.Generator().manual_seed(0)
    vx, vy = tabular(3, gen)
    model = _batch_norm_model()
    with pytest.raises(UserError, match=r"'1' \(BatchNorm1d\) normalises with the statistics of the batch"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), cross_entropy, vx, vy, METHODS)
    model[1].eval()
    model[1].track_running_stats, model[1].running_mean, model[1].running_var = False, None, None
    with pytest.raises(UserError, match="statistics of the batch"):  # eval mode, but no running statistics
        InRunShapley(model, torch.optim.Adam(model.parameters()), cross_entropy, vx, vy, METHODS)


def test_a_batch_norm_on_running_statistics_is_valued_exactly_until_it_is_put_in_train_mode(float64):
    gen = torch.Generator().manual_seed(0)
    vx, vy = tabular(3, gen)
    model = _batch_norm_model()
    model[1].eval()
    model[1].running_mean.uniform_(-1, 1, generator=gen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tracker = InRunShapley(model, opt, cross_entropy, vx, vy, METHODS)
    for _ in range(2):
        x, y = tabular(6, gen)
        want = reference_values(model, opt, cross_entropy, x, y, vx, vy, methods=METHODS)
        got = tracker.step(x, y).values
        for m in METHODS:
            assert rel_err(got[m].unsqueeze(1), want[m]) <= 1e-10
    model.train()
    weights = [p.clone() for p in model.parameters()]
    with pytest.raises(UserError, match="statistics of the batch"):
        tracker.step(*tabular(6, gen))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))  # no step taken


def _tracker(model, opt, gen):
    vx, vy = tabular(3, gen)
    return InRunShapley(model, opt, cross_entropy, vx, vy, METHODS)


def test_a_parameter_unfrozen_after_start_up_is_refused_at_the_next_step():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    model[0].requires_grad_(False)
    tracker = _tracker(model, torch.optim.Adam(model.parameters()), gen)
    tracker.step(*tabular(6, gen))
    model[0].requires_grad_(True)
    with pytest.raises(UserError, match="'0.weight' was frozen when the tracker was built"):
        tracker.step(*tabular(6, gen))


def test_parameters_added_to_the_optimizer_after_start_up_are_refused_at_the_next_step():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = torch.optim.Adam(model[0].parameters())
    tracker = _tracker(model, opt, gen)
    tracker.step(*tabular(6, gen))
    opt.add_param_group({"params": list(model[2].parameters())})
    with pytest.raises(UserError, match="add_param_group"):
        tracker.step(*tabular(6, gen))


def test_an_optimizer_over_a_parameter_outside_the_model_is_refused():
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 3)
    temperature = nn.Parameter(torch.ones(()))
    with pytest.raises(UserError, match=r"a parameter of shape \(\) that is not one of the model's"):
        _tracker(model, torch.optim.Adam([*model.parameters(), temperature]), gen)
    temperature.requires_grad_(False)  # frozen now, but it could be unfrozen later unseen
    with pytest.raises(UserError, match=r"a parameter of shape \(\) that is not one of the model's"):
        _tracker(model, torch.optim.Adam([*model.parameters(), temperature]), gen)


def test_an_empty_validation_set_and_a_clip_norm_that_is_not_positive_are_refused():
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 3)
    opt = torch.optim.Adam(model.parameters())
    vx, vy = tabular(3, gen)
    with pytest.raises(ValueError, match="validation set is empty"):
        InRunShapley(model, opt, cross_entropy, vx[:0], vy[:0], METHODS)
    for norm in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"max_grad_norm is {norm}; expected a positive number"):
            InRunShapley(model, opt, cross_entropy, vx, vy, METHODS, max_grad_norm=norm)


class Checkpointed(TwoLinear):
    """Its hidden layer under torch.utils.checkpoint: recomputed in the backward pass."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.pre, self.reentrant = nn.Linear(5, 5), reentrant

    def forward(self, x):
        hidden = lambda h: torch.tanh(self.lin(h))  # noqa: E731
        h = torch.utils.checkpoint.checkpoint(hidden, self.pre(x), use_reentrant=self.reentrant)
        return self.out(h)


def test_checkpointing_is_valued_as_without_it_and_its_reentrant_form_is_refused(float64):
    gen = torch.Generator().manual_seed(0)
    vx, vy = tabular(3, gen)
    torch.manual_seed(0)
    model = Checkpointed(reentrant=False)
    plain = Checkpointed(reentrant=False)
    plain.load_state_dict(model.state_dict())
    plain.forward = lambda x: plain.out(torch.tanh(plain.lin(plain.pre(x))))  # the same function, unchecked
    trackers = [
        InRunShapley(m, torch.optim.Adam(m.parameters(), lr=1e-2), cross_entropy, vx, vy, METHODS)
        for m in (model, plain)
    ]
    for _ in range(2):
        x, y = tabular(6, gen)
        got, want = (t.step(x, y).values for t in trackers)
        for m in METHODS:
            assert rel_err(got[m], want[m]) <= 1e-12
    model.reentrant = True
    with pytest.raises(UserError, match="use_reentrant=True.*pass use_reentrant=False"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), cross_entropy, vx, vy, METHODS)


class NormedLM(nn.Module):
    """An embedding and a layer norm, whose gradients autograd sums in the parameters' own dtype."""

    def __init__(self, tied_outside: bool = False):
        super().__init__()
        self.tied_outside = tied_outside
        self.tok = nn.Embedding(50, 64)
        self.ln = nn.LayerNorm(64)
        self.head = nn.Linear(64, 50)

    def forward(self, idx):
        h = torch.tanh(self.ln(self.tok(idx)))
        return F.linear(h, self.tok.weight) if self.tied_outside else self.head(h)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_models_are_checked_to_their_own_precision(dtype):
    """Autograd's gradient in bfloat16 or float16 is itself off by about a rounding unit: a model valued
    correctly passes the start-up check, and a use the hooks miss is still refused."""

    def loss(out, y):
        return F.cross_entropy(out.float().transpose(1, 2), y, reduction="none").mean(1)

    gen = torch.Generator().manual_seed(0)
    vx, vy = torch.randint(0, 50, (4, 64), generator=gen), torch.randint(0, 50, (4, 64), generator=gen)
    torch.manual_seed(0)
    model = NormedLM().to(dtype)
    InRunShapley(model, torch.optim.Adam(model.parameters(), lr=1e-3), loss, vx, vy, METHODS)
    wrong = NormedLM(tied_outside=True).to(dtype)
    with pytest.raises(UserError, match="gradient of 'tok.weight' is not what its module's hooks capture"):
        InRunShapley(wrong, torch.optim.Adam(wrong.parameters(), lr=1e-3), loss, vx, vy, METHODS)


class LossInside(nn.Module):
    """Takes a dict with the labels and returns each row's loss itself (targets=None); its head may
    reuse the embedding's weight outside any hook."""

    def __init__(self, tied_outside: bool):
        super().__init__()
        self.tok, self.h, self.head = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 7)
        self.tied_outside = tied_outside

    def forward(self, batch):
        h = torch.tanh(self.h(self.tok(batch["ids"])))
        logits = F.linear(h, self.tok.weight) if self.tied_outside else self.head(h)
        return sequence_cross_entropy(logits, batch["labels"])


def test_targets_inside_the_inputs_are_checked_by_the_inputs_rows(float64):
    """With targets=None the rows are counted in the inputs, so the start-up check still runs: a tied
    head outside the hooks is refused, as it is with the labels passed as targets; the untied model
    is valued as with them."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (6, 5), generator=gen)
    batch = {"ids": ids, "labels": ids.roll(-1, dims=1)}
    val = {"ids": ids[:3], "labels": batch["labels"][:3]}
    losses = lambda out, _: out  # noqa: E731
    for targets in (None, val["labels"]):
        tied = LossInside(tied_outside=True)
        with pytest.raises(
            UserError, match="gradient of 'tok.weight' is not what its module's hooks capture"
        ):
            InRunShapley(tied, torch.optim.Adam(tied.parameters()), losses, val, targets, METHODS)
    torch.manual_seed(0)
    model = LossInside(tied_outside=False)
    twin = copy.deepcopy(model)
    got = InRunShapley(model, torch.optim.Adam(model.parameters()), losses, val, None, METHODS)
    want = InRunShapley(twin, torch.optim.Adam(twin.parameters()), losses, val, val["labels"], METHODS)
    for _ in range(2):
        g, w = got.step(batch, None).values, want.step(batch, batch["labels"]).values
        for m in METHODS:
            assert torch.equal(g[m], w[m])


def test_a_batch_without_a_tensor_with_rows_is_refused():
    model = nn.Linear(5, 3)
    with pytest.raises(UserError, match="neither its inputs nor its targets hold a tensor with one row"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), lambda out, y: out, [1, 2], None, METHODS)


class Scale(nn.Module):
    """y = x ⊙ w: a layer type without a shipped kernel."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * self.weight


@pytest.mark.parametrize("slip", [1.0, 2.0], ids=["right", "values-doubled"])
def test_a_custom_kernel_whose_values_are_not_its_gradients_is_refused(slip, monkeypatch, float64):
    """The start-up check compares a kernel's values with its own per-row gradients (which it compares
    with autograd's): a custom kernel whose values are off by a factor is refused; a right one values
    as brute force does."""
    from adamshap_core.engine import registry

    monkeypatch.setattr(registry, "_KERNELS", dict(registry._KERNELS))  # this test's kernel stays here

    @registry.register(Scale)
    class ScaleKernel(registry.LayerKernel):
        param_names = ("weight",)

        def values(self, module, a, b, M):
            g = (a * b).reshape(a.shape[0], -1, a.shape[-1]).sum(1)  # [B, n]
            return slip * g @ M["weight"].reshape(M["weight"].shape[0], -1).T

        def gradients(self, module, a, b, names, summed):
            R = 1 if summed else a.shape[0]
            return {"weight": (a * b).reshape(R, -1, a.shape[-1]).sum(1)}

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), Scale(4), nn.Tanh(), nn.Linear(4, 3))
    opt = torch.optim.Adam(model.parameters())
    vx, vy = tabular(3, gen)
    if slip != 1.0:
        with pytest.raises(UserError, match="values are not the dot products of their own per-row gradients"):
            InRunShapley(model, opt, cross_entropy, vx, vy, METHODS)
        return
    x, y = tabular(6, gen)
    want = reference_values(model, opt, cross_entropy, x, y, vx, vy, methods=METHODS)
    got = InRunShapley(model, opt, cross_entropy, vx, vy, METHODS).step(x, y).values
    for m in METHODS:
        assert rel_err(got[m], want[m][:, 0]) <= 1e-10


WORDS = "the cat sat on a mat dog ran".split()


class Words(nn.Module):
    """Takes a list of strings and turns them into tensors itself; its head may reuse the embedding's
    weight outside any hook."""

    def __init__(self, tied_outside: bool = False):
        super().__init__()
        self.emb, self.head, self.tied_outside = nn.Embedding(len(WORDS), 3), nn.Linear(3, 3), tied_outside

    def forward(self, texts):
        ids = nn.utils.rnn.pad_sequence(
            [torch.tensor([WORDS.index(w) for w in t.split()]) for t in texts], True
        )
        h = torch.tanh(self.emb(ids).mean(1))
        return F.linear(h, self.emb.weight[:3]) if self.tied_outside else self.head(h)


def test_rows_held_in_strings_are_checked_whole():
    """A batch whose rows are strings on one side: take_rows cannot cut them, so the check takes the
    whole batch's summed gradient (a head outside the hooks is refused), and the steps, the step-2
    re-check included, run."""
    texts = ["the cat sat", "a dog ran", "the mat", "cat on a mat", "dog sat", "the dog"]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(0)
    with pytest.raises(UserError, match="gradient of 'emb.weight' is not what its module's hooks capture"):
        tied = Words(tied_outside=True)
        InRunShapley(tied, torch.optim.Adam(tied.parameters()), cross_entropy, texts[:4], labels[:4], METHODS)
    model = Words()
    tracker = InRunShapley(
        model, torch.optim.Adam(model.parameters()), cross_entropy, texts[:4], labels[:4], METHODS
    )
    assert tracker.rechecks(1)  # no row checked on its own at start-up
    for _ in range(3):
        assert tracker.step(texts, labels).values["adam"].shape == (6,)
    by_name = lambda out, names: cross_entropy(out, torch.tensor([WORDS.index(n) % 3 for n in names]))  # noqa: E731
    other = nn.Sequential(nn.Linear(4, 3))
    x, names = torch.randn(6, 4), ["cat", "dog", "mat", "cat", "a", "on"]
    tracker = InRunShapley(other, torch.optim.Adam(other.parameters()), by_name, x[:4], names[:4], METHODS)
    for _ in range(3):
        tracker.step(x, names)


def test_a_dict_batch_with_its_labels_inside_counts_its_checked_rows():
    model = LossInside(tied_outside=False)
    ids = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(0))
    val = {"ids": ids, "labels": ids.roll(-1, dims=1)}
    tracker = InRunShapley(
        model, torch.optim.Adam(model.parameters()), lambda out, _: out, val, None, METHODS
    )
    assert not tracker.rechecks(1)  # its first two rows were checked one at a time at start-up


def test_validation_rows_whose_gradients_cancel_still_fuse():
    """At the least-squares fit of the validation rows their summed gradient cancels to rounding noise;
    the fused rows' check, on that sum, must not read the noise as kernels that disagree."""
    gen = torch.Generator().manual_seed(0)
    vx, vy = torch.randn(50, 6, generator=gen), torch.randn(50, 2, generator=gen)
    model = nn.Linear(6, 2)
    with torch.no_grad():
        fit = torch.linalg.lstsq(torch.cat([vx, torch.ones(50, 1)], 1), vy).solution  # [7, 2]
        model.weight.copy_(fit[:6].T)
        model.bias.copy_(fit[6])
    squared = lambda out, y: ((out - y) ** 2).sum(1)  # noqa: E731
    tracker = InRunShapley(
        model, torch.optim.Adam(model.parameters()), squared, vx, vy, METHODS, fuse_validation=True
    )
    tracker.step(torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen))
    assert tracker.fusion_blocked is None


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e6])
def test_a_missed_half_of_a_gradient_shows_at_any_scale(scale):
    """The floor below which a gap is rounding is relative to the whole gradient: a model whose
    gradients are all tiny (a loss scaled down, a nearly converged model) still shows a missed use."""
    from adamshap_core.coverage import first_mismatch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    params = list(model.parameters())
    want = [torch.randn_like(p) * scale for p in params]
    seen = {id(p): w.clone() for p, w in zip(params, want, strict=True)}
    assert first_mismatch(model, params, want, seen) is None
    seen[id(params[2])] = want[2] * 0.5  # the hooks see half of 1.weight's gradient
    assert first_mismatch(model, params, want, seen) == "1.weight"
