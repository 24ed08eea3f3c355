"""The scoring rules (README: How it works): each method is a diagonal preconditioner P.

Every method values example i at step t as φ_i = η_t·⟨P ⊙ ∇val, x_i⟩ with
x_i = c·g_i/B. This module turns the live optimizer (its param groups and
state, read just before ``optimizer.step()``) into, per parameter, the scale
η·c·P that multiplies ∇val; the ghost engine does the rest. A new optimizer
means a new ``*State`` here, never a new layer kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from .errors import UserError
from .workspace import Workspace

# a step's scalar: a float, or a 0-d float64 tensor inside a compiled valuation (a float there would be
# baked into the graph, and a new learning rate or step count would compile a new one)
Scalar = float | torch.Tensor

# floats of the flat layout one block of ``OptimizerView.blocks`` holds: whole parameters packed together,
# a larger one in pieces. A rule's dozen passes then run over a few blocks' worth of scratch that stays in
# cache, and its extra memory does not grow with the model (measured best on a CPU at 2^15–2^16)
BLOCK = 1 << 16

# ---- what the optimizer is about to do to one parameter -----------------------------------------


def adam_coefficients(beta1: Scalar, beta2: Scalar, t: Scalar) -> tuple[Scalar, Scalar, Scalar, Scalar]:
    """(a, b, √c, √d) of Adam's step t: u(g) = (a·m + b·g) / (√(c·v + d·g²) + ε)."""
    bc1 = 1.0 - beta1**t
    bc2 = 1.0 - beta2**t
    return beta1 / bc1, (1.0 - beta1) / bc1, (beta2 / bc2) ** 0.5, ((1.0 - beta2) / bc2) ** 0.5


@dataclass
class AdamState:
    """One parameter's Adam/AdamW step: u(g) = (a·m + b·g) / (√(c·v + d·g²) + ε)."""

    lr: Scalar
    grad: torch.Tensor  # the data part of the gradient (after clipping): g_N − r
    r: torch.Tensor | None  # data-independent part: coupled L2 term λ·w, else None (zero)
    beta1: Scalar
    beta2: Scalar
    eps: float
    t: Scalar  # the step about to be taken, from 1
    m: torch.Tensor  # first moment before this step (zeros at t = 1)
    v: torch.Tensor  # second moment before this step
    workspace: Workspace | None = None  # scratch reused across steps (None: fresh tensors)
    key: object = None  # which scratch tensors are this state's (its segment)
    # (a, b, √c, √d) when given: 0-d tensors in a compiled valuation, so that one graph serves every step
    coeffs: tuple[Scalar, Scalar, Scalar, Scalar] | None = None
    # ``normaliser``'s tensors, once a rule asked for them
    _normaliser: tuple[torch.Tensor, torch.Tensor, bool] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def coefficients(self) -> tuple[Scalar, Scalar, Scalar, Scalar]:
        """(a, b, √c, √d): scalars of u(g), with the bias corrections folded in."""
        return self.coeffs if self.coeffs is not None else adam_coefficients(self.beta1, self.beta2, self.t)

    def normaliser(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(√(c·v), √(c·v + d·g²) for the whole gradient g = grad + r, whether the second is known to be
        finite everywhere): Adam's normaliser before ε, data-independent part and full-batch value.
        Both ``adam`` and ``adam_fixed`` read it, so it is computed once per state; the rules must not
        change these tensors."""
        if self._normaliser is None:
            _, _, sqrt_c, sqrt_d = self.coefficients()
            root_cv = self.root_cv(sqrt_c, "root_cv")
            g = self.grad if self.r is None else torch.add(self.grad, self.r, out=self.scratch("g"))
            self._normaliser = (root_cv, *_norm(root_cv, g, sqrt_d, self.eps, out=self.scratch("S")))
        return self._normaliser

    def scratch(self, name: str) -> torch.Tensor:
        """A tensor shaped like the gradient, to be overwritten (reused across steps)."""
        if self.workspace is None:
            return torch.empty_like(self.grad)
        g = self.grad
        return self.workspace.get((self.key, name), g.shape, g.dtype, g.device)

    def root_cv(self, sqrt_c: Scalar, name: str) -> torch.Tensor:
        """√(c·v), the data-independent part of the normaliser, in scratch tensor ``name``."""
        return torch.sqrt(self.v, out=self.scratch(name)).mul_(sqrt_c)


@dataclass
class SGDState:
    """One parameter's SGD step: linear in g, so every Adam-aware rule is its gain."""

    lr: Scalar
    gain: Scalar  # coefficient of g in the update direction (momentum, dampening, nesterov)

    def traced(self) -> SGDState:
        """The same step with its scalars as 0-d tensors (see ``AdamRead.traced``)."""
        return SGDState(_scalar(self.lr), _scalar(self.gain))

    def state(
        self, join: Join | None = None, workspace: Workspace | None = None, key: object = None
    ) -> SGDState:
        return self


ParamState = AdamState | SGDState
# (a segment's per-parameter tensors, a name for its scratch) → one flat tensor
Join = Callable[[list[torch.Tensor], str], torch.Tensor]


@dataclass
class AdamRead:
    """One segment's Adam step as read from the optimizer, its tensors still per parameter."""

    lr: Scalar
    grads: list[torch.Tensor]
    decayed: list[torch.Tensor] | None  # the weights, where coupled L2 decay adds wd·w to the gradient
    wd: float
    beta1: Scalar
    beta2: Scalar
    eps: float
    t: Scalar
    moments: tuple[list[torch.Tensor], list[torch.Tensor]] | None  # (exp_avg, exp_avg_sq); None at t = 1
    coeffs: tuple[Scalar, Scalar, Scalar, Scalar] | None = None

    def state(self, join: Join, workspace: Workspace | None = None, key: object = None) -> AdamState:
        """The segment flattened by ``join``; ``workspace``, ``key``: the rules' scratch (None: fresh)."""
        g = join(self.grads, "grad")
        r = self.wd * join(self.decayed, "param") if self.decayed is not None else None
        if self.moments is None:
            m = v = torch.zeros_like(g)
        else:
            m, v = join(self.moments[0], "m"), join(self.moments[1], "v")
        args = (self.beta1, self.beta2, self.eps, self.t, m, v, workspace, key, self.coeffs)
        return AdamState(self.lr, g, r, *args)

    def traced(self) -> AdamRead:
        """The same step for a compiled valuation, so that one graph serves every step: the scalars
        that change from step to step as 0-d tensors, the coefficients computed here (from t), and
        zero moments before the first step as tensors of their own."""
        moments = self.moments
        if moments is None:
            moments = ([torch.zeros_like(g) for g in self.grads], [torch.zeros_like(g) for g in self.grads])
        a, b, sqrt_c, sqrt_d = adam_coefficients(self.beta1, self.beta2, self.t)
        coeffs = (_scalar(a), _scalar(b), _scalar(sqrt_c), _scalar(sqrt_d))
        # β1 and β2 too (a schedule may cycle them, as OneCycleLR does), though only the coefficients use them
        lr, t, beta1, beta2 = (_scalar(x) for x in (self.lr, self.t, self.beta1, self.beta2))
        return replace(self, lr=lr, t=t, beta1=beta1, beta2=beta2, moments=moments, coeffs=coeffs)


StepRead = AdamRead | SGDState


def _scalar(x: Scalar) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64) if not isinstance(x, torch.Tensor) else x


# ---- the methods: each returns k·P for a scalar k (lr and clip folded in, saving a pass) ------------
# The tensors they return are scratch of their own (one set per rule), valid until the next step.


def sgd_rule(s: ParamState | StepRead, k: Scalar) -> Scalar:
    """P = 1: the original In-Run Data Shapley, as if the step were plain SGD. Reads nothing of
    the optimizer's state but the learning rate (folded into k), so it may be given the unflattened
    ``StepRead`` (see ``Method.reads_state``)."""
    return k


def adam_fixed_rule(s: ParamState, k: Scalar) -> torch.Tensor | float:
    """P = b / (√v̂_t + ε): Adam's normaliser frozen at its full-batch value."""
    if isinstance(s, SGDState):
        return k * s.gain
    _, b, _, _ = s.coefficients()
    # √v̂ = √(c·v + d·g²); where torch's second moment overflowed it is inf, and P = 0 there
    _, root, _ = s.normaliser()
    return torch.add(root, s.eps, out=s.scratch("fixed.P")).reciprocal_().mul_(k * b)


def adam_rule(s: ParamState, k: Scalar) -> torch.Tensor | float:
    """P = (u(g_N) − u(g_∅)) / (g_N − g_∅): the secant of the real Adam step.

    Written without the difference quotient, so it is exact in
    float32 where g_N ≈ g_∅, and equals u′(g_∅) there:
    P = (b·(D0 − g0·q) − a·m·q) / (D0·D1), q = d·(g0 + g1)/(S0 + S1),
    computed as b·(D0 − d·(g0 + (a/b)·m)·q′) / D0 / D1 with q′ = q/d (b > 0: torch's β1 < 1),
    which takes one multiply-add where the terms would take four passes.
    """
    if isinstance(s, SGDState):
        return k * s.gain
    a, b, _, sqrt_d = s.coefficients()
    root_cv, S1, finite = s.normaliser()  # S1: the normaliser of g1 = grad + g0
    g0 = s.r
    if g0 is None:
        S0 = root_cv  # finite wherever S1 is: S1 ≥ S0
    else:
        S0, finite0 = _norm(root_cv, g0, sqrt_d, s.eps, out=s.scratch("adam.S0"))
        finite = finite and finite0
    # q′ = (g0+g1)/(S0+S1); S0 + S1 = 0 only where g0 = g1 = 0, and there q′ = 0
    # |q′| <= 1/√d always (S >= √d·|g|); the clamp keeps underflowed S from inflating it
    q = torch.add(S0, S1, out=s.scratch("adam.q")).clamp_min_(torch.finfo(S1.dtype).tiny)
    g_sum = s.grad if g0 is None else _add_scaled(s.grad, g0, 2.0, out=s.scratch("adam.g"))
    # both bounds are floats, or both 0-d tensors (traced), which torch's overloads say apart
    q = torch.div(g_sum, q, out=q).clamp_(-1 / sqrt_d, 1 / sqrt_d)  # type: ignore[arg-type]
    D0 = torch.add(S0, s.eps, out=s.scratch("adam.D0"))
    P = s.scratch("adam.P")
    # the part of u's numerator that q multiplies, over b: (a/b)·m + g0
    lin = s.m if g0 is None else _add_scaled(g0, s.m, a / b, out=P)
    d = sqrt_d * sqrt_d
    P = _addcmul(D0, lin, q, -(a / b) * d if g0 is None else -d, out=P)
    # divide twice rather than by D0·D1, which can overflow for huge gradients; D1 = S1 + ε goes
    # where q was (read for the last time above): one scratch tensor less to keep in cache
    P.div_(D0).div_(torch.add(S1, s.eps, out=q)).mul_(k * b)
    if not finite:
        # torch's own second moment overflowed: its step there is m̂/inf = 0 for both g0 and g1
        # D0 >= eps > 0, so == inf finds every overflow; unlike isinf it vectorises when compiled
        P.masked_fill_(D0 == math.inf, 0.0)
    return P


def _add_scaled(x: torch.Tensor, y: torch.Tensor, alpha: Scalar, out: torch.Tensor) -> torch.Tensor:
    """x + alpha·y into ``out``; a tensor alpha (traced) cannot be add's alpha."""
    if isinstance(alpha, torch.Tensor):
        return x + y * alpha
    return torch.add(x, y, alpha=alpha, out=out)


def _addcmul(
    x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, value: Scalar, out: torch.Tensor
) -> torch.Tensor:
    """x + value·y·z into ``out``; a tensor value (traced) cannot be addcmul's value."""
    if isinstance(value, torch.Tensor):
        return x + y * z * value
    return torch.addcmul(x, y, z, value=value, out=out)


def _norm(
    x: torch.Tensor, y: torch.Tensor, scale: Scalar, eps: float, out: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """√(x² + (scale·y)²) into ``out``, for x ≥ 0, and whether it is known to be finite everywhere.

    A plain multiply-add (five times faster than hypot on a CPU), checked afterwards by one
    reduction: any square or sum that overflowed (only near the dtype's largest values, or where x
    is already inf) leaves an inf or NaN in the result, which is then taken again as a hypot. Safe
    otherwise: a square that underflows shifts the result by under √tiny, far below ε (so S + ε is
    unchanged); where ε is too small for that, the hypot at once.
    Traced (a compiled valuation), a fresh tensor from ``_norm_scaled``, not known to be finite."""
    if torch.compiler.is_compiling():  # traced code cannot branch on a value
        return _norm_scaled(x, y * scale), False
    safe_underflow = eps > 1e6 * torch.finfo(y.dtype).tiny ** 0.5
    if safe_underflow:
        # a 0-d tensor scale is taken as the number it holds (torch's stub allows only a number)
        S = torch.mul(x, x, out=out).addcmul_(y, y, value=scale * scale).sqrt_()  # type: ignore[arg-type]
        if not S.numel() or math.isfinite(float(S.max())):
            return S, True
    return torch.hypot(x, torch.mul(y, scale, out=out), out=out), False


def _norm_scaled(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """hypot(x, y) for x ≥ 0 without reading a value (traced code cannot branch on one) and
    vectorisable (hypot is not): each element's squares are taken relative to its own larger
    part m, so none overflows and only a part below m·√tiny underflows (changing S by under an
    ulp). Where m is 0 the result is 0, where m is inf (the optimizer's own second moment
    overflowed) inf, as hypot gives: the callers then make P = 0 there."""
    m = torch.maximum(x, y.abs())
    scaled = m * torch.sqrt((x / m) ** 2 + (y / m) ** 2)  # NaN where m is 0 or inf, not selected
    return torch.where((m > 0) & (m < math.inf), scaled, m)


@dataclass(frozen=True)
class Method:
    name: str
    # (ParamState, k) -> k·P; given a StepRead where no method reads the state (``reads_state``)
    rule: Callable[[Any, Scalar], Scale]
    clipped: bool  # x_i carries the clip factor c (sgd ignores clipping by definition)
    summary: str
    # whether the rule reads the optimizer's gradient and moments; where no method does, they are not
    # flattened at all, and each rule gets the segment's unflattened ``StepRead`` (it has the lr)
    reads_state: bool = True


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("adam", adam_rule, True, "secant (Aumann–Shapley) linearisation of the real Adam step"),
        Method("adam_fixed", adam_fixed_rule, True, "Adam with its normaliser frozen at the full batch"),
        Method(
            "sgd", sgd_rule, False, "the SGD In-Run Data Shapley formula: lr·⟨∇val, g_i⟩/B", reads_state=False
        ),
    )
}


def check_methods(methods: Sequence[str] | str) -> tuple[str, ...]:
    """Validated, de-duplicated method names in the order given."""
    if isinstance(methods, str):
        methods = (methods,)
    names = tuple(dict.fromkeys(methods))
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UserError(
            f"unknown method(s) {unknown or '(none given)'}: expected one or more of {', '.join(METHODS)}"
        )
    return names


Segment = tuple[slice, ParamState]  # a run of the flat layout the optimizer steps with the same scalars
Key = TypeVar("Key")
Scale = torch.Tensor | float  # multiplier of ∇val over a segment (tensor: elementwise)


def reads_state(methods: Iterable[str]) -> bool:
    """Whether any of ``methods`` reads the optimizer's tensors (else its learning rate alone)."""
    return any(METHODS[m].reads_state for m in methods)


def scale(method: str, state: ParamState | StepRead, clip: Scalar) -> Scale:
    """The multiplier η·c·P of ∇val for this method over one segment's ``state``."""
    m = METHODS[method]
    return m.rule(state, state.lr * (clip if m.clipped else 1.0))


def method_scales(
    methods: Sequence[str], segments: Iterable[tuple[Key, ParamState | StepRead]], clip: Scalar
) -> Iterator[tuple[Key, list[Scale]]]:
    """Per segment, each of ``methods``' multiplier η·c·P of ∇val there, as ``GhostEngine.values``
    takes them. Lazy, so that each segment's scales are used before the next is read (the blocks of
    ``OptimizerView.blocks`` share their scratch)."""
    return ((where, [scale(m, s, clip) for m in methods]) for where, s in segments)


def scales(method: str, segments: Iterable[tuple[Key, ParamState]], clip: float) -> list[tuple[Key, Scale]]:
    """Per segment (a slice of the flat layout, from ``OptimizerView.segments``), the multiplier
    η·c·P of ∇val for this method."""
    return [(where, scale(method, s, clip)) for where, s in segments]


# ---- reading the live optimizer ---------------------------------------------------------------

MOMENTS = ("exp_avg", "exp_avg_sq")  # where torch's Adam keeps its moments


class OptimizerView:
    """Reads each parameter's step from a live torch.optim.Adam / AdamW / SGD.

    Validates the optimizer once, up front; ``segments`` (or ``reads``) is read after the
    backward pass (and clipping), just before ``optimizer.step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            self.kind = "adam"
        elif isinstance(optimizer, torch.optim.SGD):
            self.kind = "sgd"
        else:
            raise UserError(
                f"optimizer {type(optimizer).__name__} is not supported: use torch.optim.Adam, AdamW or SGD"
            )
        self.check()
        self.workspace = Workspace()  # flattened state and the rules' scratch, reused every step

    def check(self) -> None:
        """Refuse settings the rules do not model (maximize, amsgrad, eps <= 0): up front, and before
        every step, since a group's keys can change on the way (set by hand, or by a loaded
        state dict)."""
        for i, group in enumerate(self.optimizer.param_groups):
            _check_group(self.kind, i, group)

    def segments(self, layout: Sequence[torch.Tensor]) -> list[Segment]:
        """The optimizer's step for the parameters of ``layout``, flattened in that order.

        Consecutive parameters of one param group (same hyperparameters, same step
        count) form one segment, so each rule runs once per segment rather than
        once per tensor. Parameters without a gradient, or outside the optimizer,
        are left out: the optimizer does not move them.
        """
        return [
            (where, read.state(self._joiner(where.start), self.workspace, where.start))
            for where, read in self.reads(layout)
        ]

    def blocks(
        self, layout: Sequence[torch.Tensor], size: int | None = None, flatten: bool = True
    ) -> Iterator[Segment | tuple[slice, StepRead]]:
        """``segments`` a block of at most ``size`` (default ``BLOCK``) floats at a time (an SGD
        segment whole: its rules are scalars). All blocks flatten into the same scratch, and the
        rules reuse theirs too, so a block's state and the scales computed from it are valid only
        until the next block is taken: use each before asking for the next. ``flatten=False``
        (rules that read no tensor of the state, see ``Method.reads_state``): the segments whole and
        unflattened, as ``reads`` gives them."""
        if not flatten:
            yield from self.reads(layout)
            return
        join = self._joiner("block")
        for where, read in self.reads(layout, size or BLOCK):
            yield where, read.state(join, self.workspace, "block")

    def reads(self, layout: Sequence[torch.Tensor], block: int | None = None) -> list[tuple[slice, StepRead]]:
        """``segments`` before flattening: each segment's step with its tensors still per parameter,
        as read from the optimizer's dicts (which a compiled valuation cannot read itself).
        ``block``: split Adam segments into blocks of at most that many floats (``blocks``)."""
        groups = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        stepped = [p for p in layout if id(p) in groups and p.grad is not None]
        counts = dict(zip(map(id, stepped), self._step_counts(stepped), strict=True))
        runs: list[list] = []  # [key, start, params, numel]
        offset = 0
        for p in layout:
            n = p.numel()
            if id(p) in counts:
                key = (groups[id(p)], counts[id(p)])
                last = runs[-1] if runs else None
                if last and last[0] == key and last[1] + last[3] == offset:
                    last[2].append(p)
                    last[3] += n
                else:
                    runs.append([key, offset, [p], n])
            offset += n
        out = []
        for key, start, params, _ in runs:
            group = self.optimizer.param_groups[key[0]]
            pieces = _packed(params, block) if block is not None and self.kind == "adam" else [(params, None)]
            for members, part in pieces:
                n = sum(p.numel() for p in members) if part is None else part.stop - part.start
                out.append((slice(start, start + n), self._read(group, members, key[1], part)))
                start += n
        return out

    def _step_counts(self, params: list[torch.Tensor]) -> list[int]:
        """Per parameter, the steps the optimizer has taken (SGD: whether it has a momentum buffer)."""
        states = [self.optimizer.state.get(p, {}) for p in params]
        if self.kind == "sgd":
            return [int(state.get("momentum_buffer") is not None) for state in states]
        steps = [state.get("step", 0) for state in states]
        tensors = [t for t in steps if isinstance(t, torch.Tensor)]
        if len(tensors) > 1 and len({(t.device, t.dtype) for t in tensors}) == 1:
            read = iter(torch.stack(tensors).tolist())  # one read instead of one per parameter
            steps = [next(read) if isinstance(t, torch.Tensor) else t for t in steps]
        return [int(t) for t in steps]

    def _read(
        self, group: dict, params: list[torch.Tensor], steps: int, part: slice | None = None
    ) -> StepRead:
        """The step the optimizer is about to make for ``params`` (one param group, each having taken
        ``steps`` steps, or for SGD whether it has a momentum buffer); ``part``: the range of the one
        parameter given, where only that is read."""
        lr = float(group["lr"])
        if self.kind == "sgd":
            return SGDState(lr, sgd_gain(group, self.optimizer.state.get(params[0], {})))
        wd = float(group.get("weight_decay", 0.0))
        decoupled = group.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW))
        beta1, beta2 = (float(b) for b in group["betas"])
        t = steps + 1
        moments = None
        if t > 1:
            state = self.optimizer.state
            try:
                exp_avg, exp_avg_sq = (_ranged([state[p][k] for p in params], part) for k in MOMENTS)
                moments = (exp_avg, exp_avg_sq)
            except KeyError as e:
                raise UserError(
                    f"optimizer {type(self.optimizer).__name__} is read as torch.optim.Adam, and its state "
                    f"after a step holds no {e} (does a subclass keep its moments under other names?); "
                    "expected Adam's state: exp_avg, exp_avg_sq and step"
                ) from None
        return AdamRead(
            lr,
            _ranged([_detached(p.grad) for p in params], part),
            _ranged([p.detach() for p in params], part) if wd and not decoupled else None,
            wd,
            beta1,
            beta2,
            float(group["eps"]),
            t,
            moments,
        )

    def _joiner(self, segment: object) -> Join:
        """Flattens a segment's tensors into scratch keyed by ``segment`` (its start, or "block" for
        the scratch all blocks share), reused from step to step, in one copy of them all."""

        def join(tensors: list[torch.Tensor], name: str) -> torch.Tensor:
            dtype = rule_dtype(tensors[0].dtype)
            if len(tensors) == 1:
                return tensors[0].reshape(-1).to(dtype)
            shapes = tuple(t.shape for t in tensors)
            total = sum(map(math.prod, shapes))
            out = self.workspace.get((segment, name), (total,), dtype, tensors[0].device)
            views = self.workspace.views((segment, name, shapes), out, lambda flat: _shaped_as(flat, shapes))
            torch._foreach_copy_(views, tensors)
            return out

        return join


def _shaped_as(flat: torch.Tensor, shapes: tuple[torch.Size, ...]) -> list[torch.Tensor]:
    """A flat tensor cut into consecutive views of ``shapes``."""
    parts = flat.split([math.prod(shape) for shape in shapes])
    return [v.view(shape) for v, shape in zip(parts, shapes, strict=True)]


Block = tuple[list[torch.Tensor], slice | None]  # parameters, and the range of the one split (None: whole)


def _packed(params: list[torch.Tensor], size: int) -> Iterator[Block]:
    """``params`` as blocks of at most ``size`` elements: whole parameters packed in order, one
    larger than ``size`` alone in ranges of ``size`` (so that its blocks need no copy)."""
    block: list[torch.Tensor] = []
    n = 0
    for p in params:
        numel = p.numel()
        if block and (n + numel > size or numel > size):
            yield block, None
            block, n = [], 0
        if numel > size:
            yield from (([p], slice(lo, min(numel, lo + size))) for lo in range(0, numel, size))
            continue
        block.append(p)
        n += numel
    if block:
        yield block, None


def _detached(t: torch.Tensor | None) -> torch.Tensor:
    """``t`` out of the graph (a gradient is already, unless made with create_graph)."""
    assert t is not None  # a parameter's gradient: ``reads`` keeps only parameters that have one
    return t.detach() if t.requires_grad else t


def _ranged(tensors: list[torch.Tensor], part: slice | None) -> list[torch.Tensor]:
    """The tensors, or the range ``part`` of the one flattened tensor of a split parameter."""
    return tensors if part is None else [tensors[0].reshape(-1)[part]]


def flat_join(tensors: list[torch.Tensor], name: str) -> torch.Tensor:
    """Flattens a segment's tensors into a fresh tensor (traced code: the compiler plans the memory)."""
    flat = torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1)
    return flat.to(rule_dtype(flat.dtype))


def rule_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the rules compute in: float32, or wider where the optimizer's state is. In float16 or
    bfloat16 the smallest normal number (6e-5 in float16) is a common gradient size, and each of a
    rule's dozen passes would round to a few bits; M is formed in float32 or wider anyway."""
    return torch.promote_types(dtype, torch.float32)


def _check_group(kind: str, i: int, group: dict) -> None:
    where = f"optimizer param group {i}"
    if group.get("maximize", False):
        raise UserError(f"{where}: maximize=True is not supported (values assume loss minimisation)")
    if kind == "adam":
        if group.get("amsgrad", False):
            raise UserError(f"{where}: amsgrad=True is not supported; use Adam/AdamW with amsgrad=False")
        if float(group["eps"]) <= 0:
            raise UserError(f"{where}: eps must be > 0 for Adam-aware values, got {group['eps']}")


def sgd_gain(group: dict, state: dict) -> float:
    """Coefficient of g in torch's SGD direction (the fixed-state analogue of momentum)."""
    mu = float(group.get("momentum", 0.0))
    if mu == 0.0:
        return 1.0
    first = state.get("momentum_buffer") is None  # torch starts the buffer at g itself
    buf_gain = 1.0 if first else 1.0 - float(group.get("dampening", 0.0))
    return 1.0 + mu * buf_gain if group.get("nesterov", False) else buf_gain
