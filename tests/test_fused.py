"""Validation rows in the training batch: where they may ride along, where the step falls back to
the separate pass, and that training's updates and random numbers stay plain training's."""

import copy

import pytest
import torch
import torch.nn.functional as F
from bruteforce import reference_values
from cases import CASES, cross_entropy
from conftest import rel_err
from torch import nn

from adamshap_core import InRunShapley, training_step
from adamshap_core.engine import GhostEngine
from adamshap_core.fast import FastMode
from adamshap_core.fused import ValidationRows
from adamshap_core.models import GPT, sequence_loss

METHODS = ("adam", "sgd")
SEQ = next(c for c in CASES if c.name == "linear-seq")


class TrainScaled(nn.Module):
    """Reads ``self.training`` itself: only running it in both modes can tell."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x) * (0.5 if self.training else 1.0)


class TrainDraws(nn.Module):
    """Draws a random number in train mode without changing its output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        if self.training:
            torch.rand(())
        return self.lin(x)


class RunningCenter(nn.Module):
    """Centres its inputs with a running mean of them, which its forward updates: in train mode only,
    or in every mode (as a quantisation observer does)."""

    def __init__(self, every_mode: bool = False):
        super().__init__()
        self.every_mode = every_mode
        self.register_buffer("mean", torch.zeros(5))
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        out = self.lin(x - self.mean)
        if self.training or self.every_mode:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(dim=0))
        return out


class TrainOnlyStraightThrough(nn.Module):
    """Rounds its output, and in train mode passes the gradient straight through the rounding: the
    same outputs in both modes, other gradients."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        h = self.lin(x)
        return h.round() + (h - h.detach()) if self.training else h.round()


def tabular(n, gen):
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def gpt(dropout=0.0):
    return GPT(13, 8, n_layer=1, n_head=2, d_model=8, mlp_ratio=2, dropout=dropout)


def gpt_data(n, gen):
    return torch.randint(1, 13, (n, 6), generator=gen), torch.randint(0, 13, (n, 6), generator=gen)


def train(make_model, data, loss, steps, seed, **tracker_kw):
    """``steps`` steps from ``seed``: with a tracker when ``tracker_kw`` is given, else plain.
    Returns (model, tracker or None, per-step values, torch's random state at the end)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    vx, vy = data(3, gen)
    tracker = InRunShapley(model, opt, loss, vx, vy, METHODS, **tracker_kw) if tracker_kw else None
    values = []
    for _ in range(steps):
        x, y = data(5, gen)
        if tracker is None:
            training_step(model, opt, loss, x, y)
        else:
            values.append(tracker.step(x, y).values)
    return model, tracker, values, torch.get_rng_state()


@pytest.mark.parametrize(
    "make,blocker",
    [
        (lambda: gpt(dropout=0.2), "drops out with p=0.2"),
        # on running statistics (in train mode it is refused, see test_coverage.py)
        (lambda: nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3).eval().requires_grad_(False)), "batch"),
        (lambda: nn.Sequential(nn.Linear(5, 3), nn.RReLU()), "random slopes"),
        (TrainScaled, "outputs in train mode differ"),
        (TrainDraws, "draws random numbers"),
        (RunningCenter, "updates its buffer 'mean' in train mode"),
        (TrainOnlyStraightThrough, "gradient of 'lin.weight' on the rows differs between train and eval"),
    ],
    ids=[
        "dropout",
        "batchnorm-eval",
        "rrelu",
        "reads-training",
        "draws-in-training",
        "updates-buffer",
        "gradient-in-training",
    ],
)
def test_a_model_that_differs_in_train_mode_takes_the_separate_pass(make, blocker):
    """Same values as without fusion (bit for bit: the same code path), the same random numbers."""
    is_gpt = isinstance(make(), GPT)
    data, loss = (gpt_data, sequence_loss) if is_gpt else (tabular, cross_entropy)
    _, tracker, fused, rng_fused = train(make, data, loss, 3, seed=1, fuse_validation=True)
    _, _, separate, rng_separate = train(make, data, loss, 3, seed=1, fuse_validation=False)
    assert blocker in tracker.fusion_blocked
    assert torch.equal(rng_fused, rng_separate)
    for a, b in zip(fused, separate, strict=True):
        assert all(torch.equal(a[m], b[m]) for m in METHODS)


@pytest.mark.parametrize("every_mode", [False, True], ids=["in-train-mode", "in-every-mode"])
@pytest.mark.parametrize(
    "kw",
    [{"fuse_validation": False}, {"fuse_validation": True}, {"per_target": True}],
    ids=["separate", "fused", "per-target"],
)
def test_a_buffer_the_forward_updates_moves_as_in_plain_training(every_mode, kw, float64):
    """The tracker runs the model more often than plain training: the validation pass, the start-up
    check, the checks before step 2. Each leaves the buffers as it found them, and fused rows, which
    a train-mode update would take in, take the separate pass; so training ends bit for bit where
    plain training does."""
    valued, tracker, _, _ = train(lambda: RunningCenter(every_mode), tabular, cross_entropy, 3, 1, **kw)
    plain, *_ = train(lambda: RunningCenter(every_mode), tabular, cross_entropy, 3, 1)
    assert torch.equal(valued.mean, plain.mean) and plain.mean.abs().sum() > 0
    assert all(torch.equal(p, q) for p, q in zip(valued.parameters(), plain.parameters(), strict=True))
    if kw.get("fuse_validation"):
        assert "updates its buffer 'mean'" in tracker.fusion_blocked


def test_the_validation_pass_copies_only_the_buffers_a_pass_changed(float64, monkeypatch):
    """A constant buffer (an attention mask) is copied by the first validation pass only: copying it
    every step would cost a large one more than the pass."""
    from adamshap_core.engine import buffers

    model = RunningCenter(every_mode=True)
    model.register_buffer("mask", torch.ones(4, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    tracker = InRunShapley(model, opt, cross_entropy, *tabular(3, gen), METHODS)
    for _ in range(2):  # the first validation pass, and step 2's check, copy every buffer
        tracker.step(*tabular(5, gen))
    copies = []
    real_copy = buffers._copy

    def recorded(buf, ids):
        copy = real_copy(buf, ids)
        copies.append((tuple(buf.shape), copy is not None))
        return copy

    monkeypatch.setattr(buffers, "_copy", recorded)
    for _ in range(3):  # no check before step 10
        tracker.step(*tabular(5, gen))
    assert sorted(copies) == [((4, 4), False)] * 3 + [((5,), True)] * 3  # the mask never, the mean each step


def test_a_loss_normalised_by_the_batch_takes_the_separate_pass():
    """Appending rows would change such a loss's training rows, hence plain training's update."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 3)
    vx, vy = tabular(3, gen)
    per_batch = lambda out, y: cross_entropy(out, y) * (8 / len(y))  # noqa: E731
    tracker = InRunShapley(
        model, torch.optim.Adam(model.parameters()), per_batch, vx, vy, fuse_validation=True
    )
    tracker.step(*tabular(5, gen))
    assert "depends on the other rows" in tracker.fusion_blocked


def test_a_loss_that_is_not_one_per_row_takes_the_separate_pass():
    gen = torch.Generator().manual_seed(0)
    model = SEQ.model()
    vx, vy = SEQ.data(3, gen)
    per_token = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none").repeat(2)  # noqa: E731
    tracker = InRunShapley(
        model, torch.optim.Adam(model.parameters()), per_token, vx, vy, fuse_validation=True
    )
    assert "not one loss per row" in tracker._rows_blocker


def test_a_loss_not_one_per_row_of_the_joined_batch_is_refused_in_both_passes():
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 3)
    vx, vy = tabular(2, gen)
    # one loss per row for the validation rows alone (so they may join), but never more than 4
    capped = lambda out, y: cross_entropy(out, y)[:4]  # noqa: E731
    tracker = InRunShapley(model, torch.optim.Adam(model.parameters()), capped, vx, vy, fuse_validation=True)
    with pytest.raises(ValueError, match=r"5 training and 2 validation rows gave shape \(4,\)"):
        tracker.step(*tabular(5, gen))
    mean = lambda out, y: cross_entropy(out, y).mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"one loss per row: the batch gave shape \(\)"):
        training_step(model, torch.optim.SGD(model.parameters()), mean, vx, vy)


def test_targets_of_another_row_count_than_the_inputs_are_a_clear_error():
    """Targets flattened over the positions ([B·T] for inputs [B, T, d]) cannot be taken apart by
    example: refused, for the validation set and for a training batch, before any work."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 4)
    x, y = torch.randn(4, 3, 5, generator=gen), torch.randint(0, 4, (4,), generator=gen)
    flat = torch.randint(0, 4, (12,), generator=gen)
    with pytest.raises(ValueError, match="the validation set's inputs hold 4 rows but its targets 12"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), cross_entropy, x, flat)
    per_seq = lambda out, t: cross_entropy(out.mean(1), t)  # noqa: E731
    tracker = InRunShapley(model, torch.optim.Adam(model.parameters()), per_seq, x, y)
    with pytest.raises(ValueError, match="the training batch's inputs hold 4 rows but its targets 12"):
        tracker.step(x, flat)


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout-fused", "dropout-separate"])
def test_training_draws_the_random_numbers_plain_training_draws(dropout, float64):
    make = lambda: gpt(dropout)  # noqa: E731
    plain, _, _, rng_plain = train(make, gpt_data, sequence_loss, 4, seed=2)
    valued, tracker, _, rng_valued = train(make, gpt_data, sequence_loss, 4, seed=2, fuse_validation=True)
    assert (tracker.fusion_blocked is None) == (dropout == 0.0)
    assert torch.equal(rng_plain, rng_valued)
    for a, b in zip(plain.parameters(), valued.parameters(), strict=True):
        assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("precision", ["bfloat16", "float16", "autocast"])
def test_a_low_precision_step_takes_the_separate_pass_and_updates_as_plain(precision):
    """In float16, bfloat16 or under autocast, taking the rows' part out of .grad would leave their
    rounding in the update (1e-2 of a GPT-2's parameters after 4 steps): those steps take the separate
    pass, whose update is plain training's bit for bit. Outside autocast the next step fuses again."""
    dtype = torch.float32 if precision == "autocast" else getattr(torch, precision)
    try:
        F.cross_entropy(torch.zeros(1, 2, dtype=dtype), torch.zeros(1, dtype=torch.long))
    except RuntimeError:  # torch before 2.4 has no float16 cross_entropy on the CPU
        pytest.skip(f"this torch has no {precision} cross_entropy on the CPU")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = SEQ.model().to(dtype)
    plain = copy.deepcopy(model)
    # eps above float16's rounding of tiny second moments (README: Precision)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-3) for m in (model, plain)]
    vx, vy = SEQ.data(3, gen)
    tracker = InRunShapley(model, opts[0], SEQ.loss, vx.to(dtype), vy, METHODS, fuse_validation=True)
    for _ in range(3):
        x, y = SEQ.data(5, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            tracker.step(x.to(dtype), y)
            training_step(plain, opts[1], SEQ.loss, x.to(dtype), y)
        assert precision in tracker.fusion_blocked
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters(), strict=True))
    if precision == "autocast":
        tracker.step(*SEQ.data(5, gen))
        assert tracker.fusion_blocked is None


def test_inputs_that_do_not_concatenate_take_the_separate_pass(float64):
    """Validation sequences of another length than the batch's: values still match brute force."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = SEQ.model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    vx, vy = torch.randn(3, 7, 5, generator=gen), torch.randint(0, 4, (3,), generator=gen)
    tracker = InRunShapley(model, opt, SEQ.loss, vx, vy, METHODS, fuse_validation=True)
    for _ in range(2):
        x, y = SEQ.data(4, gen)  # 4 positions per sequence
        want = reference_values(model, opt, SEQ.loss, x, y, vx, vy, methods=METHODS)
        got = tracker.step(x, y)
        assert "do not concatenate" in tracker.fusion_blocked
        for m in METHODS:
            assert rel_err(got.values[m].unsqueeze(1), want[m]) <= 1e-9


@pytest.mark.parametrize("per_target", [False, True], ids=["mean-target", "per-target"])
def test_after_the_backward_grad_holds_the_training_gradient_alone(per_target, float64):
    """What ``before_update`` (clipping, the preconditioners) sees: plain training's .grad; and the
    rows' ∇val is the separate pass's."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = gpt()
    twin = copy.deepcopy(model)
    vx, vy = gpt_data(3, gen)
    x, y = gpt_data(5, gen)
    twin_engine = GhostEngine(twin)
    want_val, want_loss = twin_engine.validation_gradients(sequence_loss, vx, vy, per_target)
    sequence_loss(twin(x), y).mean().backward()
    gaps = []
    scale = max(float(q.grad.abs().max()) for q in twin.parameters())

    def compare(losses, clip):
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            gaps.append(float((p.grad - q.grad).abs().max()) / scale)  # k.bias's is 0 up to rounding

    engine = GhostEngine(model)
    rows = ValidationRows(engine, vx, vy, per_target, batch_size=5)
    assert rows.weight == 2.0**-4  # the power of two at or below 1/(B·V) = 1/15
    with engine.capture(extra_rows=3):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        training_step(model, opt, sequence_loss, x, y, before_update=compare, extra=rows)
    assert max(gaps) <= 1e-12
    assert rows.gradients.shape == want_val.shape == (3 if per_target else 1, engine.numel)
    assert rel_err(rows.gradients, want_val) <= 1e-12
    assert abs(rows.loss - want_loss) <= 1e-12


class BatchBranch(nn.Module):
    """Adds a layer for the whole batch where any row is flagged (a large first feature): the rows
    that join a batch can change the other rows' function."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.extra = nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        return h + torch.tanh(self.extra(h)) if (x[:, 0] > 100).any() else h


class HeadPerTask(nn.Module):
    """Calls its second head only where the batch holds a flagged row, and uses it for those rows
    alone: the other rows' outputs never change, but the head gets a gradient (zero) from them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        flagged = x[:, 0] > 100
        out = self.lin(x)
        return torch.where(flagged[:, None], self.head(x), out) if flagged.any() else out


def flagged(x: torch.Tensor, row: int = 0) -> torch.Tensor:
    x = x.clone()
    x[row, 0] = 1000.0
    return x


@pytest.mark.parametrize(
    "make,flag,blocker",
    [
        (BatchBranch, "validation", "the training rows' outputs change when the validation rows join"),
        (BatchBranch, "training", "the validation rows' outputs change when the training rows join"),
        (HeadPerTask, "validation", "the validation rows reach 'head.weight'"),
    ],
    ids=["rows-change-the-batch", "batch-changes-the-rows", "rows-reach-a-head"],
)
def test_a_model_whose_function_depends_on_the_batch_takes_the_separate_pass(make, flag, blocker):
    """Joined to the batch, the rows would change what training computes (or the batch ∇val): found
    on the first step they would join, which takes the separate pass (with a warning), as do the rest;
    so the values are the separate pass's (bit for bit: the same code path) and the parameters end
    where plain training's do."""
    gen = torch.Generator().manual_seed(0)
    vx, vy = tabular(3, gen)
    batches = [tabular(5, gen) for _ in range(3)]
    if flag == "validation":
        vx = flagged(vx)
    else:
        batches[0] = (flagged(batches[0][0]), batches[0][1])
    torch.manual_seed(0)
    models = [make() for _ in range(3)]  # fused, separate, plain
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    fused, separate = (
        InRunShapley(m, o, cross_entropy, vx, vy, METHODS, fuse_validation=fuse)
        for m, o, fuse in zip(models[:2], opts[:2], (True, False), strict=True)
    )
    for step, (x, y) in enumerate(batches):
        if step == 0:
            with pytest.warns(RuntimeWarning, match="from step 1 on, the validation rows take the separate"):
                got = fused.step(x, y)
        else:
            got = fused.step(x, y)
        want = separate.step(x, y)
        training_step(models[2], opts[2], cross_entropy, x, y)
        assert blocker in fused.fusion_blocked and blocker in fused.rows_blocked
        assert all(torch.equal(got.values[m], want.values[m]) for m in METHODS)
    for twin in models[1:]:
        assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), twin.parameters(), strict=True))


def test_a_new_validation_set_is_checked_joined_afresh():
    """The batch-content check belongs to the rows: other rows may join where the blocked ones could not,
    and a new set is checked on its first step, whether or not the coverage checks run on it."""
    gen = torch.Generator().manual_seed(0)
    model = BatchBranch()
    vx, vy = tabular(3, gen)
    opt = torch.optim.Adam(model.parameters())
    tracker = InRunShapley(model, opt, cross_entropy, flagged(vx), vy, fuse_validation=True)
    with pytest.warns(RuntimeWarning, match="from step 1 on"):
        tracker.step(*tabular(5, gen))
    tracker.step(*tabular(5, gen))
    assert "outputs change" in tracker.fusion_blocked
    tracker.set_validation(vx, vy)
    tracker.step(*tabular(5, gen))  # step 3: no coverage check
    assert tracker.fusion_blocked is None
    tracker.set_validation(flagged(vx), vy)
    with pytest.warns(RuntimeWarning, match="from step 4 on"):
        tracker.step(*tabular(5, gen))
    assert "outputs change" in tracker.fusion_blocked


def test_a_resumed_tracker_fuses_on_the_steps_an_uninterrupted_one_does():
    """What the join check found travels in the state: the batch that showed it (step 1) does not come
    again before a step that is not checked (4), where fusing would change the values."""
    gen = torch.Generator().manual_seed(0)
    vx, vy = tabular(3, gen)
    batches = [tabular(5, gen) for _ in range(4)]
    for step in (0, 3):
        batches[step] = (flagged(batches[step][0]), batches[step][1])
    torch.manual_seed(0)
    model = BatchBranch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = InRunShapley(model, opt, cross_entropy, vx, vy, METHODS, fuse_validation=True)
    with pytest.warns(RuntimeWarning, match="the validation rows' outputs change"):
        tracker.step(*batches[0])
    tracker.step(*batches[1])
    twin = BatchBranch()  # as from a checkpoint: nothing shared (a deep copy would take the tracker's hooks)
    twin.load_state_dict(copy.deepcopy(model.state_dict()))
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # else the two share Adam's state tensors
    resumed = InRunShapley(twin, twin_opt, cross_entropy, vx, vy, METHODS, fuse_validation=True)
    resumed.load_state_dict(tracker.state_dict())
    # what the last step found, as metrics.json reports it, before a step (one reusing ∇val never sets it)
    assert resumed.fusion_blocked == tracker.fusion_blocked
    for x, y in batches[2:]:
        want, got = tracker.step(x, y), resumed.step(x, y)
        assert resumed.fusion_blocked == tracker.fusion_blocked is not None
        assert all(torch.equal(got.values[m], want.values[m]) for m in METHODS)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))


FAST = FastMode(refresh_every=2, warmup=1, rank=None)  # reuses ∇val on steps 2 and 4


@pytest.mark.parametrize("fast", [None, FAST], ids=["exact", "fast"])
@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_values_are_ordinary_tensors_the_caller_may_change_in_place(fuse, fast):
    """The eager valuation runs in inference mode; the values a step returns are no inference
    tensors (which refuse in-place changes outside it), nor are the model's gradients."""
    model, tracker, values, _ = train(
        lambda: nn.Linear(5, 3), tabular, cross_entropy, 5, 0, fuse_validation=fuse, fast=fast
    )
    for step in values:
        for v in step.values():
            assert not v.is_inference()
            v.mul_(2.0)
    if fuse:
        assert tracker.fusion_blocked is None
    assert not any(p.grad.is_inference() for p in model.parameters())


def test_a_model_under_distributed_data_parallel_takes_the_separate_pass(tmp_path):
    """DistributedDataParallel averages .grad over the processes as the backward pass accumulates it,
    so the validation rows' part could not be taken out again: such a model never fuses them."""
    import torch.distributed as dist

    from adamshap_core.fused import model_blocker

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        assert model_blocker(net) is None
        assert "DistributedDataParallel" in model_blocker(nn.parallel.DistributedDataParallel(net))
    finally:
        dist.destroy_process_group()
