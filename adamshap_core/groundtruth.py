"""Ground truth for ``compare`` (README: `adamshap compare`): the real per-step game and its values.

The game of step t: for a coalition S of the batch,
U_t(S) = ℓ_val(w_t) − ℓ_val(w_{t+1}(S)), where w_{t+1}(S) is the optimizer's
real update (Adam/AdamW with bias correction and weight decay, or SGD with
momentum) applied to g_S = c_S·Σ_{i∈S} g_i/B + r, with the clip factor c_S
recomputed for the subset when clipping is on. Nothing is linearised: the
validation loss is evaluated at every coalition's weights.

Layout of this module:

- Shapley machinery on any game given as ``game(masks [K, n]) -> utilities [K]``:
  ``leave_one_out``, ``exact_shapley`` (enumeration, small n) and
  ``monte_carlo_shapley`` (antithetic permutation pairs, with standard errors).
- ``AdamStep`` / ``SGDStep``: the optimizer's update as a pure function of a batch
  of gradients, on parameters flattened into one vector (checked against
  ``torch.optim`` itself in the tests).
- ``FlatModel``: per-example gradients and validation losses of many weight
  vectors at once (``torch.func``: vmap over ``functional_call``).
- ``StepGame``: U_t for masks; ``step_truth`` computes LOO and MC Shapley of one
  step from the live model and optimizer (as ``train.run``'s ``on_step`` sees them).

Everything here is float64: a single example moves the validation loss by ~1e-5
while the loss itself is ~1, so float32 (≈1e-7 relative) would blur the ranking.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap
from torch.nn.modules.module import register_module_forward_hook
from torch.utils._pytree import tree_leaves

from .errors import UserError, memory_short_as
from .precond import AdamState, OptimizerView, ParamState, SGDState, scales, sgd_gain
from .threads import intra_op_threads

DTYPE = torch.float64
Game = Callable[[torch.Tensor], torch.Tensor]  # coalition masks [K, n] (0/1) -> utilities [K]


# ---- Shapley values of any game ------------------------------------------------------------------


def leave_one_out(game: Game, n: int) -> torch.Tensor:
    """LOO_i = U(N) − U(N∖{i}), exactly (n + 1 evaluations)."""
    masks = torch.ones(n + 1, n, dtype=DTYPE)
    masks[1:] -= torch.eye(n, dtype=DTYPE)
    u = game(masks)
    return u[0] - u[1:]


def exact_shapley(game: Game, n: int) -> torch.Tensor:
    """Shapley values by enumerating all 2^n coalitions (for tests and tiny games)."""
    if n > 16:
        raise ValueError(f"exact Shapley enumerates 2^n coalitions; n = {n} is too many")
    codes = torch.arange(2**n)
    masks = ((codes[:, None] >> torch.arange(n)) & 1).to(DTYPE)  # row c: bit i = i ∈ S
    u = game(masks)
    sizes = masks.sum(1).long()
    # weight of a coalition S not containing i: |S|!(n−|S|−1)!/n!
    weight = torch.tensor(
        [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    )
    phi = torch.zeros(n, dtype=DTYPE)
    for i in range(n):
        without = (codes >> i) & 1 == 0
        phi[i] = (weight[sizes[without]].to(DTYPE) * (u[codes[without] | (1 << i)] - u[without])).sum()
    return phi


@dataclass
class ShapleyEstimate:
    values: torch.Tensor  # [n]
    se: torch.Tensor  # [n] standard error of each value (NaN with a single pair)
    permutations: int  # permutations used (antithetic pairs × 2)
    u_empty: float  # U(∅)
    u_full: float  # U(N); the values sum to U(N) − U(∅)


def monte_carlo_shapley(
    game: Game,
    n: int,
    permutations: int,
    generator: torch.Generator,
    pairs_per_call: int = 8,
) -> ShapleyEstimate:
    """Shapley values averaged over random permutations taken in antithetic pairs (π and reversed π).

    Each pair costs 2(n − 1) coalitions (the empty and full coalitions are shared by all);
    the standard error is the spread of the pair averages over √pairs. Every permutation's
    marginals sum to U(N) − U(∅), so the estimate is efficient exactly.
    """
    if permutations < 2 or permutations % 2:
        raise ValueError(f"permutations must be an even number >= 2, got {permutations}")
    ends = game(torch.stack([torch.zeros(n, dtype=DTYPE), torch.ones(n, dtype=DTYPE)]))
    pairs = permutations // 2
    if n == 1:  # one player: its value is the whole game
        return ShapleyEstimate(ends[1:] - ends[:1], torch.zeros(1, dtype=DTYPE), 2 * pairs, *ends.tolist())
    estimates = []
    sizes = torch.arange(1, n)  # the prefix sizes that differ between permutations
    for start in range(0, pairs, pairs_per_call):
        k = min(pairs_per_call, pairs - start)
        perms = torch.stack([torch.randperm(n, generator=generator) for _ in range(k)])
        rank = torch.argsort(perms, dim=1)  # rank[p, i] = position of player i in permutation p
        prefix = rank[:, None, :] < sizes[None, :, None]  # [k, n-1, n]: first j players of π
        # the first j players of reversed π are the complement of the first n − j of π
        masks = torch.cat([prefix, ~prefix]).reshape(-1, n).to(DTYPE)
        u = game(masks).reshape(2, k, n - 1)
        empty, full = ends[0].expand(k, 1), ends[1].expand(k, 1)
        u_fwd = torch.cat([empty, u[0], full], dim=1)  # U of π's prefix of size 0..n
        u_rev = torch.cat([empty, u[1].flip(1), full], dim=1)  # U of reversed π's prefix of size 0..n
        rank_rev = n - 1 - rank
        marg_fwd = u_fwd.gather(1, rank + 1) - u_fwd.gather(1, rank)
        marg_rev = u_rev.gather(1, rank_rev + 1) - u_rev.gather(1, rank_rev)
        estimates.append((marg_fwd + marg_rev) / 2)
    est = torch.cat(estimates)  # [pairs, n]
    se = est.std(0) / math.sqrt(pairs) if pairs > 1 else torch.full((n,), float("nan"), dtype=DTYPE)
    return ShapleyEstimate(est.mean(0), se, 2 * pairs, *ends.tolist())


# ---- the optimizer step as a pure function --------------------------------------------------------


@dataclass
class ParamSlot:
    """One trainable parameter: where it sits in the flat vector and its optimizer group/state."""

    name: str
    param: nn.Parameter
    offset: int
    group: dict
    state: dict

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def span(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


def param_slots(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[ParamSlot]:
    """The model's parameters that the optimizer updates, in model order (tied ones once)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    slots, offset = [], 0
    for name, p in model.named_parameters():  # named_parameters lists a tied parameter once
        if id(p) not in group_of or not p.requires_grad:
            continue
        slots.append(ParamSlot(name, p, offset, group_of[id(p)], optimizer.state.get(p, {})))
        offset += p.numel()
    if not slots:
        raise ValueError("the optimizer updates none of the model's parameters")
    return slots


def _flat_state(slots: list[ParamSlot], key: str) -> torch.Tensor:
    """A state tensor (``exp_avg`` ...) flattened over the parameters; zeros where absent."""
    parts = [
        s.state[key].detach().reshape(-1).to("cpu", DTYPE)
        if s.state.get(key) is not None
        else torch.zeros(s.numel, dtype=DTYPE)
        for s in slots
    ]
    return torch.cat(parts)


def flat_weights(slots: list[ParamSlot]) -> torch.Tensor:
    return torch.cat([s.param.detach().reshape(-1).to("cpu", DTYPE) for s in slots])


@dataclass
class AdamStep:
    """torch.optim.Adam / AdamW (amsgrad off) as a pure function; every field is per element [D]."""

    w: torch.Tensor
    lr: torch.Tensor
    weight_decay: torch.Tensor
    decoupled: torch.Tensor  # bool: AdamW's decay of the weights rather than an L2 gradient term
    beta1: torch.Tensor
    beta2: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor  # the step about to be taken, from 1
    m: torch.Tensor
    v: torch.Tensor

    def __post_init__(self):
        # Everything that does not depend on the gradient, once per step: __call__ then makes
        # ten in-place passes over [K, D], which is most of the cost of a coalition.
        self.r = torch.where(self.decoupled, 0.0, self.weight_decay * self.w)  # coupled L2 term
        self._m0 = self.beta1 * self.m + (1 - self.beta1) * self.r
        self._v0 = self.beta2 * self.v
        self._inv_sqrt_bc2 = 1 / (1 - self.beta2**self.t).sqrt()
        self._neg_step = -self.lr / (1 - self.beta1**self.t)
        self._w0 = torch.where(self.decoupled, self.w * (1 - self.lr * self.weight_decay), self.w)

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """w_{t+1} for each row of ``g`` [K, D], the (clipped) data gradients.

        m = β1·m + (1−β1)·(g + r), v = β2·v + (1−β2)·(g + r)², then
        w − lr/(1−β1^t) · m / (√v/√(1−β2^t) + ε), after AdamW's decay of w.
        """
        m = torch.addcmul(self._m0, 1 - self.beta1, g)
        den = g + self.r
        den.mul_(den).mul_(1 - self.beta2).add_(self._v0).sqrt_().mul_(self._inv_sqrt_bc2).add_(self.eps)
        return torch.addcdiv(self._w0, m.mul_(self._neg_step), den)


@dataclass
class SGDStep:
    """torch.optim.SGD (momentum, dampening, nesterov, L2 weight decay) as a pure function."""

    w: torch.Tensor
    lr: torch.Tensor
    weight_decay: torch.Tensor
    momentum: torch.Tensor
    dampening: torch.Tensor
    nesterov: torch.Tensor  # bool
    buf: torch.Tensor
    has_buf: torch.Tensor  # bool: torch starts the momentum buffer at the first gradient itself

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        g = g + self.weight_decay * self.w
        buf = torch.where(self.has_buf, self.momentum * self.buf + (1 - self.dampening) * g, g)
        d = torch.where(self.nesterov, g + self.momentum * buf, buf)
        d = torch.where(self.momentum != 0, d, g)
        return self.w - self.lr * d


Update = AdamStep | SGDStep


def optimizer_update(
    slots: list[ParamSlot], optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu"
) -> Update:
    """The step ``optimizer`` is about to take, read from its groups and state (not changed)."""
    kind = OptimizerView(optimizer).kind  # also refuses amsgrad, maximize, other optimizers

    def per_element(value: Callable[[ParamSlot], float]) -> torch.Tensor:
        return torch.cat([torch.full((s.numel,), float(value(s)), dtype=DTYPE) for s in slots]).to(device)

    def state(key: str) -> torch.Tensor:
        return _flat_state(slots, key).to(device)

    w, lr = flat_weights(slots).to(device), per_element(lambda s: s.group["lr"])
    wd = per_element(lambda s: s.group.get("weight_decay", 0.0))
    if kind == "sgd":
        return SGDStep(
            w,
            lr,
            wd,
            per_element(lambda s: s.group.get("momentum", 0.0)),
            per_element(lambda s: s.group.get("dampening", 0.0)),
            per_element(lambda s: s.group.get("nesterov", False)).bool(),
            state("momentum_buffer"),
            per_element(lambda s: s.state.get("momentum_buffer") is not None).bool(),
        )
    adamw = isinstance(optimizer, torch.optim.AdamW)
    return AdamStep(
        w,
        lr,
        wd,
        per_element(lambda s: s.group.get("decoupled_weight_decay", adamw)).bool(),
        per_element(lambda s: s.group["betas"][0]),
        per_element(lambda s: s.group["betas"][1]),
        per_element(lambda s: s.group["eps"]),
        per_element(lambda s: float(s.state["step"]) + 1 if "step" in s.state else 1),
        state("exp_avg"),
        state("exp_avg_sq"),
    )


# ---- the model on flat weight vectors ---------------------------------------------------------------


class FlatModel:
    """``model`` evaluated at flat float64 weight vectors, without touching the model itself."""

    def __init__(self, model: nn.Module, slots: list[ParamSlot], loss_fn: Callable, device: torch.device):
        self.model, self.slots, self.loss_fn, self.device = model, slots, loss_fn, device
        valued = {id(s.param) for s in slots}
        # parameters the optimizer does not update, and buffers, stay as they are (in float64)
        self.fixed = {
            n: t.detach().to(device, DTYPE if t.is_floating_point() else t.dtype)
            for n, t in [*model.named_parameters(), *model.named_buffers()]
            if id(t) not in valued
        }

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s.name: w[s.span].view(s.param.shape) for s in self.slots} | self.fixed

    def _losses(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(functional_call(self.model, self.unflatten(w), (x,)), y)

    def per_example_grads(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        """([B, D] gradients of each example's own loss, [B] the losses) at weights ``w``."""

        def one(wv, xi, yi):
            loss = self._losses(wv, xi.unsqueeze(0), yi.unsqueeze(0)).sum()
            return loss, loss

        g, losses = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0))(w, x, y)
        return g, losses

    def mean_loss_grad(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        """(∇ of the mean loss on x, y [D], the mean loss) at weights ``w``."""
        g, loss = grad_and_value(lambda wv: self._losses(wv, x, y).mean())(w)
        return g, loss

    @torch.no_grad()
    def mean_losses(
        self, W: torch.Tensor, x: torch.Tensor, y: torch.Tensor, rows: int | None = None
    ) -> torch.Tensor:
        """[K] mean loss on x, y at each row of ``W`` [K, D]; ``rows``: at most that many rows of x
        at a time (None: all at once)."""
        if rows is None or rows >= len(x):
            return vmap(lambda wv: self._losses(wv, x, y).mean())(W)
        total = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
        for s in range(0, len(x), rows):
            xs, ys = x[s : s + rows], y[s : s + rows]
            total += vmap(lambda wv, xs=xs, ys=ys: self._losses(wv, xs, ys).sum())(W)
        return total / len(x)

    @torch.no_grad()
    def row_floats(self, w: torch.Tensor, x: torch.Tensor) -> int:
        """An upper bound of the floats one row of ``x`` (a batch of one) holds in a forward at ``w``:
        every module's output summed, and the model's output twice more (the loss's log-softmax and
        its like). A language model's logits, rows × positions × vocabulary, are most of it."""
        floats = 0

        def count(module: nn.Module, args: tuple, output: object) -> None:
            nonlocal floats
            floats += sum(t.numel() for t in tree_leaves(output) if isinstance(t, torch.Tensor))

        handle = register_module_forward_hook(count)
        try:
            out = functional_call(self.model, self.unflatten(w), (x,))
        finally:
            handle.remove()
        return floats + 2 * sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))


# ---- the game of one step ------------------------------------------------------------------------


# coalitions evaluated at once: each holds about COALITION_COPIES float64 vectors of the model's size
# (its data gradient, the optimizer's update and state), so a wide model takes fewer at a time
MAX_COALITIONS, COALITION_COPIES, COALITION_BYTES = 64, 8, 512 * 2**20
# the validation forwards of the coalitions in flight, in float64: a language model's logits for 200
# texts took 9 GB for 15 coalitions, so fewer coalitions, and fewer rows at a time, where they are large
ACTIVATION_BYTES = 512 * 2**20


def coalition_chunk(n_params: int) -> int:
    """How many coalitions to evaluate at once for a model of ``n_params`` parameters."""
    return max(1, min(MAX_COALITIONS, COALITION_BYTES // (COALITION_COPIES * 8 * max(n_params, 1))))


class StepGame:
    """U_t(S) = ℓ_val(w_t) − ℓ_val(w_{t+1}(S)) for coalitions given as masks [K, B]."""

    def __init__(
        self,
        flat: FlatModel,
        update: Update,
        grads: torch.Tensor,  # [B, D] per-example gradients at w_t
        val_x: torch.Tensor,
        val_y: torch.Tensor,
        max_grad_norm: float | None,
        chunk: int | None = None,
    ):
        self.flat, self.update, self.grads = flat, update, grads
        self.val_x, self.val_y = val_x, val_y
        self.max_grad_norm = max_grad_norm
        w = update.w.to(grads.device)
        self.row_bytes = 8 * flat.row_floats(w, val_x[:1])  # one validation row's forward, in float64
        if chunk is None:
            chunk = max(1, min(coalition_chunk(grads.shape[1]), ACTIVATION_BYTES // self.row_bytes))
        self.chunk = chunk
        self.base_loss = self.mean_losses(w[None])[0]

    def mean_losses(self, W: torch.Tensor) -> torch.Tensor:
        """[K] validation loss at each row of ``W``, as many validation rows at a time as
        ``ACTIVATION_BYTES`` holds for K coalitions (all of them, unless their forwards are large)."""
        rows = max(1, ACTIVATION_BYTES // (W.shape[0] * self.row_bytes))
        return self.flat.mean_losses(W, self.val_x, self.val_y, rows)

    def clip_factors(self, sums: torch.Tensor) -> torch.Tensor:
        """c_S per row of unclipped data gradients [K, D]: torch's min(1, max_norm/(‖g‖ + 1e-6))."""
        if self.max_grad_norm is None:
            return torch.ones(sums.shape[0], 1, dtype=sums.dtype, device=sums.device)
        return (self.max_grad_norm / (sums.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)

    def data_gradients(self, masks: torch.Tensor) -> torch.Tensor:
        """c_S·Σ_{i∈S} g_i/B per coalition, with the clip factor recomputed for each S."""
        sums = masks.to(self.grads) @ self.grads / self.grads.shape[0]
        return sums * self.clip_factors(sums)

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, masks.shape[0], self.chunk):
            W = self.update(self.data_gradients(masks[start : start + self.chunk]))
            out.append(self.base_loss - self.mean_losses(W))
        return torch.cat(out).cpu()


# ---- one step's ground truth ------------------------------------------------------------------------


@dataclass
class StepTruth:
    """The ground truth of one step, for the examples of its batch (in batch order)."""

    step: int
    loo: np.ndarray  # [B]
    shapley: np.ndarray  # [B]
    shapley_se: np.ndarray  # [B]
    permutations: int
    u_full: float  # U_t(N)
    u_empty: float  # U_t(∅): the data-independent part of the step (momentum, decay)
    val_loss: float  # ℓ_val(w_t)
    train_loss: float  # mean training loss of the batch at w_t
    by_param: dict[str, np.ndarray] | None = None  # method -> [B, n_params], see ``method_terms``
    param_names: list[str] | None = None
    scale_spread: np.ndarray | None = None  # [n_params] IQR of log10 of the adam P, see ``method_terms``


def step_truth(
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    max_grad_norm: float | None,
    permutations: int,
    generator: torch.Generator,
    methods: tuple[str, ...] = (),
) -> StepTruth:
    """LOO and MC Shapley of step ``step``, from the model and optimizer as they are just before it.

    Nothing of ``model`` or ``optimizer`` is changed. With ``methods``, also each method's value
    split by parameter tensor (``method_terms``), from the same per-example gradients.
    """
    device = next(model.parameters()).device
    # thousands of small ops ([64, D] at most): on a shared CPU, waking a thread pool for each costs
    # more than the op (measured 10x slower with two busy cores); the count is restored for training
    short = functools.partial(_truth_memory_short, step, model, len(inputs))
    with intra_op_threads(1 if device.type == "cpu" else None), memory_short_as(short):
        slots = param_slots(model, optimizer)
        update = optimizer_update(slots, optimizer, device)
        flat = FlatModel(model, slots, loss_fn, device)
        x, vx = _as_float64(inputs.to(device)), _as_float64(val_x.to(device))
        grads, losses = flat.per_example_grads(update.w, x, targets)
        game = StepGame(flat, update, grads, vx, val_y, max_grad_norm)
        n = grads.shape[0]
        loo = leave_one_out(game, n)
        mc = monte_carlo_shapley(game, n, permutations, generator)
        truth = StepTruth(
            step,
            loo.numpy(),
            mc.values.numpy(),
            mc.se.numpy(),
            mc.permutations,
            mc.u_full,
            mc.u_empty,
            float(game.base_loss),
            float(losses.mean()),
        )
        if methods:
            val_grad, _ = flat.mean_loss_grad(update.w, vx, val_y)
            truth.by_param, truth.scale_spread = method_terms(
                slots, optimizer, update, grads, val_grad, game, methods
            )
            truth.param_names = [s.name for s in slots]
        return truth


def _truth_memory_short(step: int, model: nn.Module, n: int) -> UserError:
    """What a step's ground truth holds, for a refusal where memory is short."""
    device = next(model.parameters()).device
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return UserError(
        f"out of memory on {device} computing the ground truth of step {step}: it holds each of the "
        f"batch's {n} examples' gradients in float64 ({n} x {d:,} parameters x 8 bytes = "
        f"{n * d * 8 / 2**30:.1f} GiB) and evaluates up to {coalition_chunk(d)} coalitions at once, with "
        f"their validation forwards (up to {ACTIVATION_BYTES / 2**30:.1f} GiB together); expected a machine "
        "with more memory, or a run with a smaller train.batch_size or model."
    )


def method_terms(
    slots: list[ParamSlot],
    optimizer: torch.optim.Optimizer,
    update: Update,
    grads: torch.Tensor,
    val_grad: torch.Tensor,
    game: StepGame,
    methods: tuple[str, ...],
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each method's φ_i = η·c·⟨P ⊙ ∇val, g_i⟩/B split by parameter tensor: method -> [B, n_params].

    η·c·P comes from ``precond.scales``, the very rules the engine uses, applied to this
    step's float64 state, so the sum over parameters is the method's value (up to the float32
    precision of the recorded run). Also returns, per parameter tensor, the interquartile
    range of log10 of the adam P: how unevenly Adam rescales that tensor's coordinates.
    """
    B = grads.shape[0]
    batch_grad = grads.mean(0, keepdim=True)
    clip = float(game.clip_factors(batch_grad))
    kind = OptimizerView(optimizer).kind
    data_grad = clip * batch_grad[0]
    segments = [(j, _param_state(kind, s, update, data_grad)) for j, s in enumerate(slots)]
    terms = {}
    for m in methods:
        scale = dict(scales(m, segments, clip))
        cols = [grads[:, s.span] @ (scale[j] * val_grad[s.span]) / B for j, s in enumerate(slots)]
        terms[m] = torch.stack(cols, dim=1).cpu().numpy()
    adam_scale = dict(scales("adam", segments, clip))
    spread = np.array([_log10_iqr(adam_scale[j]) for j in range(len(slots))])
    return terms, spread


def _log10_iqr(scale: torch.Tensor | float) -> float:
    if not isinstance(scale, torch.Tensor):
        return 0.0  # one scale for the whole tensor (SGD)
    logp = torch.log10(scale.abs().clamp_min(1e-300)).cpu()
    q = torch.quantile(logp, torch.tensor([0.25, 0.75], dtype=logp.dtype))
    return float(q[1] - q[0])


def _as_float64(x: torch.Tensor) -> torch.Tensor:
    """Real-valued inputs in float64; token ids stay integers."""
    return x.to(DTYPE) if x.is_floating_point() else x


def _param_state(kind: str, s: ParamSlot, update: Update, data_grad: torch.Tensor) -> ParamState:
    """``precond``'s view of one parameter's step, with the gradient given rather than read from .grad."""
    lr = float(s.group["lr"])
    if kind == "sgd":
        return SGDState(lr, sgd_gain(s.group, s.state))
    u, sl = update, s.span
    assert isinstance(u, AdamStep)  # read from the same optimizer as kind
    beta1, beta2 = (float(b) for b in s.group["betas"])
    r = u.r[sl] if bool(u.r[sl].any()) else None
    return AdamState(
        lr, data_grad[sl], r, beta1, beta2, float(s.group["eps"]), int(u.t[sl][0]), u.m[sl], u.v[sl]
    )
