"""Every method, through InRunShapley.step, against the brute-force reference (float64)."""

import copy
import inspect
import math

import pytest
import torch
from bruteforce import adam_direction, per_example_grads, reference_values, val_grads
from cases import CASES, PER_IMAGE_CONV
from conftest import rel_err

from adamshap_core import InRunShapley, training_step
from adamshap_core.errors import UserError

METHODS = ("adam", "adam_fixed", "sgd")

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, eps=1e-6),
    # Adam with decoupled_weight_decay=True is AdamW (torch >= 2.6; the flag is read, not the class)
    **(
        {
            "adam-decoupled": lambda ps: torch.optim.Adam(
                ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True
            )
        }
        if "decoupled_weight_decay" in inspect.signature(torch.optim.Adam).parameters
        else {}
    ),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=5e-2, momentum=0.9, dampening=0.1),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
}


def test_a_layer_first_trained_later_gets_sgds_first_step_gain_while_the_others_do_not(float64):
    """SGD with momentum and dampening: a layer frozen for step 1 has no momentum buffer at step 2,
    where the others have one, so its gradient's gain there is 1 and theirs 1 - dampening."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, dampening=0.3)
    loss = CASES[0].loss
    gen = torch.Generator().manual_seed(1)
    vx, vy = torch.randn(3, 3, generator=gen), torch.randint(0, 2, (3,), generator=gen)
    tracker = InRunShapley(model, opt, loss, vx, vy, METHODS)
    for step in (1, 2, 3):
        for p in model[2].parameters():
            p.requires_grad_(step != 1)
        x, y = torch.randn(6, 3, generator=gen), torch.randint(0, 2, (6,), generator=gen)
        want = reference_values(model, opt, loss, x, y, vx, vy)
        got = tracker.step(x, y)
        for m in ("adam", "adam_fixed"):
            assert rel_err(got.values[m].unsqueeze(1), want[m]) <= 1e-6, (step, m)


def run_and_check(
    case,
    make_opt,
    *,
    steps=4,
    batch=6,
    n_val=3,
    max_grad_norm=None,
    per_target=False,
    scheduler=None,
    split_groups=False,
    fuse_validation=False,
    methods=METHODS,
    model=None,
    freeze_at=None,
):
    """``freeze_at``: the step before which the model's first parameter is frozen (requires_grad
    False), as a user freezing part of a model part-way through training does."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = case.model() if model is None else model
    params = list(model.parameters())
    if split_groups:  # per-group hyperparameters
        opt = make_opt([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "betas": (0.5, 0.9)}])
    else:
        opt = make_opt(params)
    sched = scheduler(opt) if scheduler else None
    vx, vy = case.data(n_val, gen)
    tracker = InRunShapley(
        model,
        opt,
        case.loss,
        vx,
        vy,
        methods,
        max_grad_norm=max_grad_norm,
        per_target=per_target,
        fuse_validation=fuse_validation,
    )
    for step in range(1, steps + 1):
        if step == freeze_at:
            next(model.parameters()).requires_grad_(False)
        x, y = case.data(batch, gen)
        want = reference_values(
            model, opt, case.loss, x, y, vx, vy, max_grad_norm=max_grad_norm, per_target=per_target
        )
        got = tracker.step(x, y)
        assert tracker.fusion_blocked is None if fuse_validation else "off" in tracker.fusion_blocked
        for m in methods:
            g = got.values[m] if per_target else got.values[m].unsqueeze(1)
            assert g.shape == (batch, n_val if per_target else 1)
            assert rel_err(g, want[m]) <= 1e-6, m
        if sched:
            sched.step()
    return tracker, got


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("opt", list(OPTIMIZERS), ids=str)
def test_methods_match_brute_force(case, opt, float64):
    run_and_check(case, OPTIMIZERS[opt])


@pytest.mark.parametrize("case", CASES[:1] + CASES[5:], ids=lambda c: c.name)
def test_clipping_active_and_per_target(case, float64):
    _, res = run_and_check(case, OPTIMIZERS["adamw"], max_grad_norm=0.05, per_target=True)
    assert res.clip_factor < 1.0  # clipping really was active


def test_a_model_of_unbatched_conv2d_calls_is_valued_on_batches_of_one_image(float64):
    """Batches of one image and one validation image, each through the Conv2d unbatched (a batch of one
    to its kernel): every method against brute force."""
    run_and_check(PER_IMAGE_CONV, OPTIMIZERS["adam"], steps=2, batch=1, n_val=1)


def test_a_model_of_unbatched_conv2d_calls_with_several_validation_rows_is_refused_by_name(float64):
    """Several validation images, each through the Conv2d alone: the start-up check cannot tell the
    calls' rows apart, and refuses the model naming the layer."""
    gen = torch.Generator().manual_seed(0)
    model = PER_IMAGE_CONV.model()
    vx, vy = PER_IMAGE_CONV.data(3, gen)
    with pytest.raises(
        UserError, match=r"layer 'conv' \(Conv2d\) was called on 1 rows for 3 validation rows"
    ):
        InRunShapley(model, torch.optim.Adam(model.parameters()), PER_IMAGE_CONV.loss, vx, vy, METHODS)


class Guarded(torch.nn.Module):
    """A model that branches on a tensor's value (an input guard), which vmap cannot batch."""

    def __init__(self):
        super().__init__()
        self.net = CASES[0].model()

    def forward(self, x):
        if x.abs().max() > 1e9:
            raise ValueError("input out of range")
        return self.net(x)


@pytest.mark.parametrize("freeze", [False, True], ids=["", "a-layer-frozen-at-step-2"])
def test_per_target_values_of_a_model_vmap_cannot_batch(freeze, float64):
    """Each validation row's gradient then takes a backward pass of its own, and the values equal
    those of the same model without the guard (whose ∇val vmap batches; checked against brute force
    above, also with a layer frozen part-way)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    guarded = Guarded()
    plain = copy.deepcopy(guarded.net)
    vx, vy = CASES[0].data(3, gen)
    trackers = [
        InRunShapley(
            m, torch.optim.AdamW(m.parameters(), lr=1e-2), CASES[0].loss, vx, vy, METHODS, per_target=True
        )
        for m in (guarded, plain)
    ]
    for step in range(1, 4):
        if freeze and step == 2:
            for m in (guarded.net, plain):
                next(m.parameters()).requires_grad_(False)
        x, y = CASES[0].data(5, gen)
        got, want = (t.step(x, y) for t in trackers)
        for m in METHODS:
            assert got.values[m].shape == (5, 3)
            assert rel_err(got.values[m], want.values[m]) <= 1e-12, m
    assert trackers[0].engine._row_by_row and not trackers[1].engine._row_by_row


@pytest.mark.parametrize("case", CASES[:1] + CASES[-1:], ids=lambda c: c.name)
@pytest.mark.parametrize(
    "per_target, fuse",
    [(False, False), (True, False), (False, True)],
    ids=["separate", "per-target", "fused"],
)
def test_a_parameter_frozen_part_way_through_training_gets_no_value(case, per_target, fuse, float64):
    """Freezing a layer after the tracker was built (a backbone after warm-up) leaves it without a
    gradient, which the optimizer skips; the values are the other parameters' alone."""
    run_and_check(case, OPTIMIZERS["adamw"], freeze_at=3, per_target=per_target, fuse_validation=fuse)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("per_target", [False, True], ids=["mean-target", "per-target"])
@pytest.mark.parametrize("opt", ["adamw", "adam-l2", "sgd-momentum"])
def test_validation_rows_in_the_training_batch_match_brute_force(case, per_target, opt, float64):
    """One forward/backward for training and validation rows: ∇val from the rows' a and b."""
    _, res = run_and_check(
        case, OPTIMIZERS[opt], max_grad_norm=0.05, per_target=per_target, fuse_validation=True
    )
    assert res.clip_factor < 1.0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("per_target", [False, True], ids=["mean-target", "per-target"])
@pytest.mark.parametrize(
    "opt, methods",
    [("sgd-nesterov", METHODS), ("adamw", ("sgd",))],
    ids=["sgd-all-methods", "adamw-sgd-method"],
)
def test_ghost_dot_products_with_the_validation_rows_match_brute_force(
    case, per_target, opt, methods, float64, monkeypatch
):
    """Where P is a scalar (the sgd method; every method under SGD) and ∇val is the validation rows'
    gradient, a linear or convolutional layer's values come from the rows' a and b directly, without M
    (forced here at any cost). Layers that two calls share (a tied head, a layer called twice) still
    contract M."""
    from adamshap_core.engine import conv2d, linear

    monkeypatch.setattr(linear, "ROWS_MARGIN", 0)
    ghost = []
    contract_rows = linear.contract_rows
    monkeypatch.setattr(linear, "contract_rows", lambda *args: ghost.append(1) or contract_rows(*args))
    ghosted = set()  # the layer types whose values came from the rows' a and b

    def seen(module, values):
        if values is not None:
            ghosted.add(type(module).__name__)
        return values

    for kernel in (linear.LinearKernel, conv2d.Conv2dKernel):
        original = kernel.rows_values
        monkeypatch.setattr(
            kernel, "rows_values", lambda self, m, *rest, original=original: seen(m, original(self, m, *rest))
        )
    tracker, _ = run_and_check(
        case, OPTIMIZERS[opt], per_target=per_target, fuse_validation=True, methods=methods
    )
    assert ghost  # every case has a linear layer that one call alone uses
    # and so has every convolution of the cases (GPT-2's projections are transformers' Conv1D)
    convolutions = {type(m).__name__ for m in tracker.model.modules()} & {"Conv2d", "Conv1D"}
    assert convolutions <= ghosted


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("block", [1, 7, 64])
def test_rules_run_block_by_block_exactly(case, block, float64, monkeypatch):
    """The rules score the flat layout a block at a time: parameters packed into blocks, a larger one
    in pieces, every block in the same scratch. Coupled L2 (the weights are read too), two groups."""
    from adamshap_core import precond

    monkeypatch.setattr(precond, "BLOCK", block)
    run_and_check(case, OPTIMIZERS["adam-l2"], split_groups=True)


@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_the_sgd_method_alone_reads_no_tensor_of_adams_state(fuse, float64, monkeypatch):
    """sgd's rule needs only the learning rate, so Adam's gradient and moments are not flattened."""
    from adamshap_core import precond

    def flattened(*args, **kwargs):
        raise AssertionError("Adam's state was flattened")

    monkeypatch.setattr(precond.AdamRead, "state", flattened)
    run_and_check(CASES[0], OPTIMIZERS["adam-l2"], methods=("sgd",), fuse_validation=fuse, split_groups=True)
    with pytest.raises(AssertionError, match="flattened"):  # a method that reads it still does
        run_and_check(CASES[0], OPTIMIZERS["adam-l2"], methods=("sgd", "adam_fixed"), fuse_validation=fuse)


@pytest.mark.parametrize("decay", [False, True], ids=["decoupled", "coupled-l2"])
def test_rules_share_adams_normaliser_without_changing_it(decay, float64):
    """adam and adam_fixed read one normaliser per state, computed by whichever runs first: each
    gives on a shared state, in either order and run twice, exactly its P on a state of its own."""
    from adamshap_core.precond import AdamState, adam_fixed_rule, adam_rule
    from adamshap_core.workspace import Workspace

    g = torch.Generator().manual_seed(3)
    grad, m, r = (torch.randn(50, generator=g) for _ in range(3))
    v = torch.rand(50, generator=g)

    def state(workspace):
        return AdamState(1e-3, grad, r if decay else None, 0.9, 0.999, 1e-8, 4, m, v, workspace, "k")

    alone = {rule: rule(state(Workspace()), 0.5).clone() for rule in (adam_rule, adam_fixed_rule)}
    for order in ((adam_rule, adam_fixed_rule), (adam_fixed_rule, adam_rule)):
        shared = state(Workspace())
        for rule in order + order:
            assert torch.equal(rule(shared, 0.5), alone[rule])


def test_blocks_pack_whole_parameters_and_split_only_larger_ones():
    from adamshap_core.precond import _packed

    params = [torch.zeros(n) for n in (3, 4, 10, 2, 2, 5)]
    blocks = list(_packed(params, 5))
    sizes = [([p.numel() for p in ps], part and (part.start, part.stop)) for ps, part in blocks]
    assert sizes == [([3], None), ([4], None), ([10], (0, 5)), ([10], (5, 10)), ([2, 2], None), ([5], None)]
    # every element of every parameter once, in layout order
    covered = [(id(p), i) for ps, part in blocks for p in ps for i in range(p.numel())[part or slice(None)]]
    assert covered == [(id(p), i) for p in params for i in range(p.numel())]


def test_scheduler_and_param_groups(float64):
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    run_and_check(CASES[0], OPTIMIZERS["adam-l2"], steps=5, scheduler=sched, split_groups=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("opt", ["adam-l2", "adamw", "sgd-nesterov"])
@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_training_with_attribution_updates_parameters_exactly_as_plain(case, opt, fuse, float64):
    assert_trains_as_plain(case, opt, fuse)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_training_with_per_target_rows_in_the_batch_updates_parameters_as_plain(case, float64):
    """Per target, the fused rows' part of .grad is their per-row gradients summed (not the kernels'
    summed product): taken out, the update is plain training's for every kernel too."""
    assert_trains_as_plain(case, "adamw", True, per_target=True)


@pytest.mark.parametrize("case", CASES[:1] + CASES[-1:], ids=lambda c: c.name)
@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_a_layer_frozen_part_way_trains_as_plain(case, fuse, float64):
    assert_trains_as_plain(case, "adamw", fuse, freeze_at=3)


def assert_trains_as_plain(case, opt, fuse, freeze_at=None, per_target=False):
    """Six valued steps and six plain ones, side by side, end with the same parameters.
    ``freeze_at``: the step before which both models' first parameter is frozen."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model_a = case.model()
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = OPTIMIZERS[opt](model_a.parameters()), OPTIMIZERS[opt](model_b.parameters())
    vx, vy = case.data(4, gen)
    options = {"max_grad_norm": 0.5, "fuse_validation": fuse, "per_target": per_target}
    tracker = InRunShapley(model_a, opt_a, case.loss, vx, vy, METHODS, **options)
    for step in range(1, 7):
        if step == freeze_at:
            for m in (model_a, model_b):
                next(m.parameters()).requires_grad_(False)
        x, y = case.data(5, gen)
        tracker.step(x, y)
        # the plain step a user would write
        opt_b.zero_grad()
        case.loss(model_b(x), y).mean().backward()
        torch.nn.utils.clip_grad_norm_(model_b.parameters(), 0.5)
        opt_b.step()
    assert tracker.fusion_blocked is None if fuse else tracker.fusion_blocked
    # bit for bit with the separate pass; fused rows round the update (they are taken out of .grad again),
    # which coupled L2 amplifies in the case's inert parameters: there the model's function is compared
    inert = case.inert if fuse and opt == "adam-l2" else {}
    assert_same_parameters(model_a, model_b, tolerance=1e-10 if fuse else 0.0, inert=inert)
    if inert:
        with torch.no_grad():
            assert rel_err(model_a(vx), model_b(vx)) <= 1e-10


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=lambda c: c.name)
def test_adam_values_are_efficient(case, float64):
    """Σ_i φ_i = η·⟨∇val, u(g_N) − u(g_∅)⟩: the secant distributes the whole real step."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = case.model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.05)
    vx, vy = case.data(3, gen)
    tracker = InRunShapley(model, opt, case.loss, vx, vy, ("adam",), max_grad_norm=1.0)
    for step in range(4):
        x, y = case.data(6, gen)
        names = {id(p): n for n, p in model.named_parameters()}
        V = val_grads(model, case.loss, vx, vy, per_target=False)
        G = per_example_grads(model, case.loss, x, y)
        batch = {n: g.mean(0) for n, g in G.items()}
        norm = torch.sqrt(sum((g * g).sum() for g in batch.values()))
        c = min(1.0, 1.0 / (float(norm) + 1e-6))
        want = 0.0
        for p in model.parameters():
            st = opt.state.get(p, {})
            t = int(st["step"]) + 1 if st else 1
            m = st.get("exp_avg", torch.zeros_like(p))
            v = st.get("exp_avg_sq", torch.zeros_like(p))
            r = 0.05 * p.detach()
            gN = c * batch[names[id(p)]] + r
            du = adam_direction(gN, m, v, 0.9, 0.999, 1e-8, t) - adam_direction(r, m, v, 0.9, 0.999, 1e-8, t)
            want += 1e-2 * float((V[names[id(p)]][0] * du).sum())
        got = float(tracker.step(x, y).values["adam"].sum())
        assert abs(got - want) <= 1e-9 * max(1.0, abs(want)), step


@pytest.mark.parametrize("max_grad_norm", [None, 0.05], ids=["unclipped", "clipped"])
def test_training_step_is_the_plain_step(max_grad_norm, float64):
    """The same losses, clip factor and parameters as the step a user would write."""
    case = CASES[0]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = case.model()
    plain = copy.deepcopy(model)
    opt, opt_plain = (
        torch.optim.Adam(model.parameters(), lr=1e-2),
        torch.optim.Adam(plain.parameters(), lr=1e-2),
    )
    for _ in range(3):
        x, y = case.data(4, gen)
        losses, clip = training_step(model, opt, case.loss, x, y, max_grad_norm=max_grad_norm)
        opt_plain.zero_grad()
        want = case.loss(plain(x), y)
        want.mean().backward()
        norm = float(torch.nn.utils.clip_grad_norm_(plain.parameters(), max_grad_norm or math.inf))
        opt_plain.step()
        assert torch.equal(losses, want.detach())
        assert clip == (
            1.0 if max_grad_norm is None else pytest.approx(min(1.0, max_grad_norm / (norm + 1e-6)))
        )
        for a, b in zip(model.parameters(), plain.parameters(), strict=True):
            assert (a - b).abs().max() <= 1e-12


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda ps: torch.optim.Adam(ps, amsgrad=True), "amsgrad"),
        (lambda ps: torch.optim.RMSprop(ps), "RMSprop is not supported"),
        (lambda ps: torch.optim.Adam(ps, maximize=True), "maximize"),
    ],
)
def test_unsupported_optimizers_are_clear_errors(make, match):
    case = CASES[0]
    model = case.model()
    x, y = case.data(3, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=match):
        InRunShapley(model, make(model.parameters()), case.loss, x, y)


@pytest.mark.parametrize(
    "key, value, match",
    [("maximize", True, "maximize"), ("amsgrad", True, "amsgrad"), ("eps", 0.0, "eps must be > 0")],
)
def test_an_unsupported_setting_switched_on_later_is_refused_before_the_step(key, value, match):
    case = CASES[0]
    model = case.model()
    opt = torch.optim.Adam(model.parameters())
    gen = torch.Generator().manual_seed(0)
    tracker = InRunShapley(model, opt, case.loss, *case.data(3, gen))
    tracker.step(*case.data(4, gen))
    opt.param_groups[0][key] = value  # by hand, or from a loaded state dict
    weights = [p.clone() for p in model.parameters()]
    with pytest.raises(UserError, match=match):
        tracker.step(*case.data(4, gen))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_an_optimizer_over_another_model_is_a_clear_error():
    case = CASES[0]
    x, y = case.data(3, torch.Generator().manual_seed(0))
    other = torch.optim.Adam(case.model().parameters())
    with pytest.raises(UserError, match="none of the model's trainable parameters is in the optimizer"):
        InRunShapley(case.model(), other, case.loss, x, y)


def test_an_empty_batch_and_a_closed_tracker_are_clear_errors():
    case = CASES[0]
    model = case.model()
    x, y = case.data(3, torch.Generator().manual_seed(0))
    tracker = InRunShapley(model, torch.optim.Adam(model.parameters()), case.loss, x, y)
    with pytest.raises(ValueError, match="training batch is empty"):
        tracker.step(x[:0], y[:0])
    tracker.step(x, y)
    tracker.close()
    with pytest.raises(RuntimeError, match="tracker is closed"):
        tracker.step(x, y)
    with pytest.raises(RuntimeError, match="tracker is closed"):
        tracker.set_validation(x, y)


def test_a_gradient_no_optimizer_step_has_used_is_refused_and_ones_a_step_has_used_are_not():
    """step zeroes .grad for its batch: a backward pass of the user's since the last optimizer step
    (an accumulated micro-batch) would be dropped, so it is refused; a plain step's are not."""
    case = CASES[0]
    model = case.model()
    x, y = case.data(4, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters())
    training_step(model, opt, case.loss, x, y)  # a plain step before the tracker leaves its gradients
    tracker = InRunShapley(model, opt, case.loss, x, y)
    tracker.step(x, y)
    training_step(model, opt, case.loss, x, y)  # a plain step between valued ones
    tracker.step(x, y)
    opt.zero_grad(set_to_none=False)  # zeroed in place: nothing to drop
    tracker.step(x, y)
    case.loss(model(x), y).mean().backward()  # a plain step skipped for an overflow, as GradScaler skips
    next(model.parameters()).grad[0] = math.inf
    tracker.step(x, y)
    case.loss(model(x), y).mean().backward()  # a micro-batch to accumulate
    weights = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="holds a gradient that no optimizer step has used"):
        tracker.step(x, y)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    opt.zero_grad()
    tracker.step(x, y)
    tracker.close()
    assert not opt._optimizer_step_post_hooks  # the tracker's watch leaves with it


def test_a_clip_norm_that_is_not_a_number_is_a_clear_error():
    case = CASES[0]
    model = case.model()
    x, y = case.data(3, torch.Generator().manual_seed(0))
    for norm in ("1.0", True):
        with pytest.raises(ValueError, match=f"max_grad_norm is {norm!r}; expected a positive number"):
            InRunShapley(model, torch.optim.Adam(model.parameters()), case.loss, x, y, max_grad_norm=norm)


def test_a_state_that_does_not_fit_the_tracker_is_refused():
    """load_state_dict takes the state of a tracker of the same model and validation set (resumed
    exactly elsewhere); another tracker's ∇val, a per-target one, or an optimizer's state dict are
    refused before anything changes."""
    case = CASES[0]
    x, y = case.data(4, torch.Generator().manual_seed(0))

    def tracker(model=None, per_target=False):
        model = model or case.model()
        opt = torch.optim.Adam(model.parameters())
        return InRunShapley(model, opt, case.loss, x, y, fast=True, per_target=per_target)

    wider = tracker(torch.nn.Sequential(torch.nn.Linear(x.shape[1], 9), torch.nn.Linear(9, 3)))
    per_target = tracker(per_target=True)
    for t in (wider, per_target):
        t.step(x, y)
    fresh = tracker()
    with pytest.raises(ValueError, match=r"validation gradient has shape \(1, \d+\); this tracker's is"):
        fresh.load_state_dict(wider.state_dict())
    with pytest.raises(ValueError, match=r"has shape \(4, \d+\).*the mean target"):
        fresh.load_state_dict(per_target.state_dict())
    with pytest.raises(ValueError, match="this state has no generator, steps, val_grads"):
        fresh.load_state_dict(torch.optim.Adam(case.model().parameters()).state_dict())
    assert fresh.state_dict()["steps"] == 0 and fresh.state_dict()["val_grads"] is None
    fresh.load_state_dict(tracker().state_dict())  # a fitting one (nothing reused yet) is taken


def test_unknown_method_is_a_clear_error():
    case = CASES[0]
    model = case.model()
    x, y = case.data(3, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="unknown method.*adamx"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), case.loss, x, y, methods=("adamx",))


def test_a_parameter_without_gradient_splits_its_group_and_is_not_valued(float64):
    """An unused layer in the middle of the optimizer's parameters gets no .grad: torch's Adam
    skips it, the flat layout's segments must skip it too, and the values still match."""

    class WithUnused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Linear(5, 7)
            self.unused = torch.nn.Linear(7, 7)
            self.last = torch.nn.Linear(7, 3)

        def forward(self, x):
            return self.last(torch.tanh(self.first(x)))

    case = CASES[0].__class__("with-unused", WithUnused, CASES[0].data)
    tracker, _ = run_and_check(case, OPTIMIZERS["adam-l2"], steps=3)
    segments = tracker.view.segments(tracker.engine.parameters)
    assert len(segments) == 2  # first.* | last.*, split around the gradient-less unused.*


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_the_rules_of_a_half_precision_model_compute_in_float32(dtype):
    """P from a float16 or bfloat16 optimizer's state equals P from the same numbers in float64, to
    float32's precision: the rules do not round each pass to the state's few bits, and float16's
    smallest normal number (6e-5, a common gradient size) is no floor for them."""
    from adamshap_core.precond import OptimizerView, scale

    torch.manual_seed(0)
    model = torch.nn.Linear(40, 30).to(dtype)

    def small_gradients():  # sizes from 1e-7 to 1e-2
        for p in model.parameters():
            p.grad = (torch.randn(p.shape) * 10 ** torch.empty(p.shape).uniform_(-7, -2)).to(dtype)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1)
    for _ in range(2):
        small_gradients()
        opt.step()
    small_gradients()
    twin = copy.deepcopy(model).double()
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1)
    twin_opt.load_state_dict(opt.state_dict())  # the state cast to float64, exactly
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        q.grad = p.grad.double()
    for method in ("adam", "adam_fixed"):
        (_, got), (_, want) = (
            (where, scale(method, state, 1.0))
            for o, m in ((opt, model), (twin_opt, twin))
            for where, state in OptimizerView(o).segments(list(m.parameters()))
        )
        assert got.dtype == torch.float32
        assert rel_err(got.double(), want) <= 1e-6, method


def test_steps_under_autocast_pass_the_checks_and_update_as_plain_training():
    """The checks run in float32 under the user's autocast, as at start-up outside it: its bfloat16
    gradients would fail a float32 parameter's tolerance. The update is plain training's under the same
    autocast, bit for bit."""
    case = next(c for c in CASES if c.name == "linear-seq")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = case.model()
    plain = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, plain)]
    vx, vy = case.data(3, gen)
    tracker = InRunShapley(model, opts[0], case.loss, vx, vy, METHODS)
    for _ in range(3):  # step 2 runs the checks again
        x, y = case.data(6, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tracker.step(x, y)
            training_step(plain, opts[1], case.loss, x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters(), strict=True))


def twin_mlps() -> list[torch.nn.Sequential]:
    """A small MLP and an identical copy of it: one to train valued, the other plain."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    return [net, copy.deepcopy(net)]


def train_side_by_side(nets, opts, steps: int, fuse: bool, max_grad_norm: float | None = None):
    """``steps`` valued steps of ``nets[0]`` and plain ones of ``nets[1]``, on the same batches: the
    steps' clip factors."""
    gen = torch.Generator().manual_seed(0)
    loss = CASES[0].loss
    vx, vy = torch.randn(4, 5, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    tracker = InRunShapley(
        nets[0], opts[0], loss, vx, vy, ("adam",), max_grad_norm=max_grad_norm, fuse_validation=fuse
    )
    clips = []
    for _ in range(steps):
        x, y = torch.randn(6, 5, generator=gen), torch.randint(0, 3, (6,), generator=gen)
        clips.append(tracker.step(x, y).clip_factor)
        training_step(nets[1], opts[1], loss, x, y, max_grad_norm=max_grad_norm)
    return clips


def assert_same_parameters(
    a: torch.nn.Module, b: torch.nn.Module, tolerance: float, inert: dict[str, slice] | None = None
) -> None:
    """Equal within ``tolerance``, but for the ``inert`` parts {name: slice} (not compared)."""
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        diff = (p - q).detach().abs()
        if inert and name in inert:
            diff[inert[name]] = 0.0
        assert diff.max() <= tolerance, name


@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
def test_a_layer_outside_the_optimizer_is_clipped_as_in_plain_training(fuse, float64):
    """A layer left out of the optimizer still gets the ``.grad`` that ``loss.backward()`` gives it,
    which gradient clipping counts, so valued training stays plain training."""
    nets = twin_mlps()
    opts = [torch.optim.Adam(net[2].parameters(), lr=0.05) for net in nets]
    clips = train_side_by_side(nets, opts, 4, fuse, max_grad_norm=0.1)
    assert max(clips) < 1  # clipped, by a norm that counts the first layer
    assert_same_parameters(*nets, tolerance=1e-10 if fuse else 0.0)
