"""Validation rows inside the training batch: one forward and one backward per step instead of two.

With ``InRunShapley(..., fuse_validation=True)`` a step appends its V validation rows to the
B training rows and differentiates

    mean_i ℓ_i + w · Σ_r ℓ_val,r

in one backward pass. The hooks then hold the validation rows' a and b as well, and the layer
kernels build their gradients from them (per row for per-target values, summed for the mean
target): that is ∇val, once w is divided out. Before clipping, the rows' part is subtracted
from ``.grad``, so clipping, the preconditioners and ``optimizer.step()`` see the training
gradient alone: plain training's, up to float rounding (the subtraction), not bit for bit.

It computes what the separate pass (``GhostEngine.validation_gradients``, in eval mode) does
only where train mode and eval mode compute the same function and no random numbers are drawn
(no active dropout, no batch statistics), where the inputs concatenate along dim 0, where the
gradients are float32 or wider (no float16 or bfloat16 parameters, no autocast), and where joining
changes no row's function (a branch on the batch's content; checked on a few steps' batches). Where
not, the step takes the separate pass; the blockers below say why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from .compiled import Compiled
from .coverage import first_mismatch, probing
from .engine import GhostEngine
from .engine.buffers import Buffers
from .engine.ghost import Call, RowsTarget, set_modes

LOW_PRECISION = (torch.float16, torch.bfloat16)
# how far a row's outputs may move when other rows join a batch of the same size: relative to the
# output, and at least this fraction of the output's largest finite value over the rows (``_unmoved``)
JOIN_RTOL = 1e-5
JOIN_FLOOR = 1e-7


def model_blocker(model: nn.Module) -> str | None:
    """Why the model may compute another function, or draw random numbers, in train mode than in
    eval mode, as far as its modules tell, or reduces ``.grad`` across processes while the backward
    pass runs (None: nothing found)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return (
            "the model is wrapped in DistributedDataParallel, which averages .grad over the processes "
            "during the backward pass, with the validation rows' part still in it"
        )
    for path, m in model.named_modules():
        name = _module_name(path, m)
        if isinstance(m, _NormBase):
            return f"{name} is a batch or instance norm, which in train mode may use batch statistics"
        if draw := random_draw(m):
            return f"{name} {draw}"
    return None


def precision_blocker(parameters: Sequence[torch.Tensor]) -> str | None:
    """Why taking the rows' part out of ``.grad`` would round the update far past float32's rounding
    (None: it would not): a float16 or bfloat16 gradient holds the sum of the batch's and the rows'
    parts to a few bits, and plain training's gradient is not what is left."""
    low = next((p.dtype for p in parameters if p.dtype in LOW_PRECISION), None)
    if low is not None:
        return f"the model has {low} parameters, whose gradient would keep the validation rows' rounding"
    return None


def autocast_blocker(device: torch.device) -> str | None:
    """As ``precision_blocker``, for a step under ``torch.autocast`` on the parameters' device (read at
    each step)."""
    if _autocast_enabled(device.type):
        return "the step runs under torch.autocast, whose gradients would keep the validation rows' rounding"
    return None


def _autocast_enabled(device: str) -> bool:
    try:
        return torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4: a function for CUDA and one for the CPU
        if device == "cuda":
            return torch.is_autocast_enabled()
        return device == "cpu" and torch.is_autocast_cpu_enabled()


def random_draws(model: nn.Module) -> list[str]:
    """The modules that draw random numbers in train mode, each with what it draws."""
    return [
        f"{_module_name(path, m)} {draw}" for path, m in model.named_modules() if (draw := random_draw(m))
    ]


def random_draw(m: nn.Module) -> str | None:
    """What the module itself draws at random in train mode (None: nothing, as far as it tells)."""
    if isinstance(m, _DropoutNd) and m.p > 0:
        return f"drops out with p={m.p} in training"
    if isinstance(m, nn.RReLU):
        return "draws random slopes in training"
    # a rate kept as a float: nn.MultiheadAttention's and nn.LSTM's dropout, transformers' Llama's
    # attention_dropout, Bloom's hidden_dropout, GPT-2's config-style attn_pdrop
    for name, p in vars(m).items():
        if ("dropout" in name or "pdrop" in name) and isinstance(p, float) and p > 0:
            return f"has {name}={p}"
    return None


def _module_name(path: str, m: nn.Module) -> str:
    return f"'{path or '<root>'}' ({type(m).__name__})"


def probe_blocker(model: nn.Module, loss_fn, inputs, targets) -> str | None:
    """Run the validation rows in eval and in train mode (torch's random state and the buffers
    restored afterwards): a model whose code reads ``self.training`` is caught here, if it gives
    other outputs or gradients, draws random numbers or updates a buffer (a running mean) in train
    mode; so is a loss whose value for a row depends on the other rows of the batch (None: none
    of these)."""
    if not (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return "the validation inputs or targets are not a tensor"
    with probing(model, inputs.device) as modules:
        eval_out = _run_in_mode(model, modules, inputs, training=False)
        before = _rng_state(inputs.device)
        buffers = Buffers(model, copied=set())  # told by their versions; ``probing`` puts them back
        train_out = _run_in_mode(model, modules, inputs, training=True)
        changed = buffers.changed()
        if any(not torch.equal(x, y) for x, y in zip(before, _rng_state(inputs.device), strict=True)):
            return "the model draws random numbers in train mode"
        if changed:
            path, buffer, _ = changed[0]
            name = _module_name(path, model.get_submodule(path))
            return f"{name} updates its buffer '{buffer}' in train mode, where the rows would enter it"
        if not (isinstance(eval_out, torch.Tensor) and isinstance(train_out, torch.Tensor)):
            return "the model's output is not a tensor"
        if not torch.equal(eval_out, train_out):
            return "the model's outputs in train mode differ from those in eval mode"
        return _loss_blocker(loss_fn, eval_out.detach(), targets) or _gradient_blocker(
            model, loss_fn, (eval_out, train_out), targets
        )


def _run_in_mode(model: nn.Module, modules: list[nn.Module], inputs: torch.Tensor, training: bool):
    set_modes(modules, training)
    return model(inputs)


def _gradient_blocker(model: nn.Module, loss_fn, outputs: tuple[torch.Tensor, ...], targets) -> str | None:
    """Whether the rows' gradient in train mode differs from that in eval mode, their outputs being
    the same (a straight-through estimator used in training only): fused rows would give ∇val in
    train mode, the separate pass in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for out in outputs:
        loss = loss_fn(out, targets).sum()
        if not loss.requires_grad:  # nothing to compare: no parameter reaches the loss
            return None
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    train = {id(p): g for p, g in zip(params, grads[1], strict=True) if g is not None}
    name = first_mismatch(model, params, grads[0], train)
    if name is None:
        return None
    return f"the gradient of '{name}' on the rows differs between train and eval mode, their outputs not"


def _loss_blocker(loss_fn, outputs: torch.Tensor, targets: torch.Tensor) -> str | None:
    """Whether the rows' losses change when one more row joins them (a loss normalised by the
    batch, such as by its total token count, would change plain training's if rows were added)."""
    alone = loss_fn(outputs, targets)
    if alone.shape != (len(targets),):
        return f"the loss gives shape {tuple(alone.shape)} for {len(targets)} rows, not one loss per row"
    joined = loss_fn(torch.cat([outputs, outputs[:1]]), torch.cat([targets, targets[:1]]))[: len(targets)]
    if alone.shape != joined.shape or not torch.allclose(alone, joined, rtol=1e-5, atol=0.0):
        return "the loss of a row depends on the other rows of the batch"
    return None


def _rng_state(device: torch.device) -> tuple[torch.Tensor, ...]:
    cpu = torch.get_rng_state()
    return (cpu, torch.cuda.get_rng_state(device)) if device.type == "cuda" else (cpu,)


def join_blocker(model: nn.Module, loss_fn, inputs, targets, val_inputs, val_targets) -> str | None:
    """Run the training rows and the validation rows joined, and each beside copies of rows of its own
    kind (a batch of the same size, whose products round alike), in the modes the model is in (torch's
    random state and the buffers restored afterwards). Caught here, where these rows show it: a model
    whose function for one row depends on the other rows in the batch (a branch on the batch's
    content), and a parameter that only the validation rows reach, which ``optimizer.step()`` would
    then move with a zero gradient where plain training leaves it alone (None: neither)."""
    params = [p for p in model.parameters() if p.requires_grad]
    B, V = len(targets), len(val_targets)
    # one graph at a time, each dropped once read: the check holds no more than a fused step does
    with probing(model, inputs.device), torch.enable_grad():
        own = model(torch.cat([inputs, _repeated(inputs, V)]))  # the batch's content alone
        if not isinstance(own, torch.Tensor):
            return "the model's output is not a tensor"
        reached = _reached(loss_fn(own[:B], targets).sum(), params)
        own = own[:B].detach()
        with torch.no_grad():
            val_own = model(torch.cat([_repeated(val_inputs, B), val_inputs]))
        joined = model(torch.cat([inputs, val_inputs]))
        for rows, others, got, want in (
            ("training", "validation", joined[:B], own),
            ("validation", "training", joined[B:], val_own[B:]),
        ):
            if not _unmoved(got.detach(), want.detach()):
                return (
                    f"the {rows} rows' outputs change when the {others} rows join them: the model's "
                    "function depends on the batch's content"
                )
        only_rows = _reached(loss_fn(joined, torch.cat([targets, val_targets])).sum(), params) - reached
    name = next((n for n, p in model.named_parameters() if id(p) in only_rows), None)
    if name is None:
        return None
    return (
        f"the validation rows reach '{name}', which the training rows alone do not: "
        "optimizer.step() would move it with a zero gradient, where plain training leaves it alone"
    )


def _repeated(rows: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows: ``rows`` over and over."""
    return rows[torch.arange(n, device=rows.device) % len(rows)]


def _unmoved(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether ``got`` equals ``want`` element by element, both from batches of one size (bit for bit on
    a CPU; the tolerances allow for kernels whose sums are ordered at random, as some on a GPU are),
    infinities included. The floor of each output is set by the largest finite value of that output
    over the rows, so that a masked one (-inf, -1e9) widens no other output's tolerance."""
    if got.shape != want.shape:
        return False
    g, w = got.reshape(len(got), -1), want.reshape(len(want), -1)
    equal = (g == w) | (g.isnan() & w.isnan())
    largest = torch.where(w.isfinite(), w.abs(), torch.zeros_like(w)).amax(dim=0)
    close = (g - w).abs() <= JOIN_RTOL * w.abs() + JOIN_FLOOR * largest
    return bool((equal | close).all())


def _reached(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> set[int]:
    """id of each parameter in ``params`` that ``loss``'s graph leads to: those that a backward pass of
    it gives a gradient (plain training's ``.grad`` is then not None, and ``optimizer.step()`` moves
    them). Read from the graph, without computing a gradient."""
    wanted = {id(p) for p in params}
    found: set[int] = set()
    seen: set[object] = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # a leaf's AccumulateGrad
        if variable is not None and id(variable) in wanted:
            found.add(id(variable))
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


def batch_blocker(inputs, targets, val_inputs, val_targets) -> str | None:
    """Why the validation rows cannot be appended to this training batch (None: they can)."""
    for what, t, v in (("inputs", inputs, val_inputs), ("targets", targets, val_targets)):
        if not (isinstance(t, torch.Tensor) and isinstance(v, torch.Tensor)):
            return f"the {what} are not tensors"
        if t.dim() == 0 or (t.shape[1:], t.dtype, t.device) != (v.shape[1:], v.dtype, v.device):
            return (
                f"the training {what} ({tuple(t.shape)}, {t.dtype}) and the validation {what} "
                f"({tuple(v.shape)}, {v.dtype}) do not concatenate along the batch"
            )
    if inputs.shape[0] != targets.shape[0]:
        return "the inputs and targets differ in their number of rows"
    return None


class ValidationRows:
    """One step's validation rows, appended to its training batch by ``training_step``.

    ``compiled``: where given (``attribution.compile``), it runs ``rows_gradients`` as "rows"."""

    def __init__(
        self,
        engine: GhostEngine,
        inputs,
        targets,
        per_target: bool,
        batch_size: int,
        compiled: Compiled | None = None,
    ):
        self.engine = engine
        self.compiled = compiled
        self.inputs, self.targets = inputs, targets
        self.per_target = per_target
        self.batch_size = batch_size
        # each row's loss weight: a power of two (dividing it out again is exact) at most 1/(B·V), so
        # the rows add at most about 1/B of a mean gradient to .grad: small beside the training part,
        # which keeps the rounding that adding and subtracting them leaves in .grad small too
        self.weight = 2.0 ** -math.ceil(math.log2(batch_size * len(targets)))
        self.gradients: torch.Tensor | None = None  # ∇val, flat [Q, N], once ``remove`` ran
        self.loss = math.nan  # their mean loss

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def target(self) -> RowsTarget:
        """∇val from the rows' gradient g: per target g_r / w; the mean target (Σ_r g_r) / (w·V)."""
        return RowsTarget(1.0 / (self.weight * (1 if self.per_target else len(self))), not self.per_target)

    def remove(self, losses: torch.Tensor) -> None:
        """After the backward pass: ∇val from the rows' captured a and b, and their part of
        ``.grad`` taken out. ``losses``: the rows' own losses."""
        engine = self.engine
        calls = engine.captured(self.batch_size)
        args = (engine, calls, self.batch_size, not self.per_target, self.target.scale)
        out = None if self.compiled is None else self.compiled("rows", *args)
        self.gradients, totals = eager_rows_gradients(*args) if out is None else out
        # outside the compiled graph, so that a graph that fails and is rerun eagerly cannot
        # take the rows out of .grad twice
        _subtract(engine.held_gradients(), totals)
        self.loss = float(losses.mean())


def rows_gradients(
    engine: GhostEngine, calls: list[Call], batch_size: int, summed: bool, scale: float
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """From the a and b of ``calls``: the rows' gradients, flat [Q, N] and times ``scale``, and
    their part of each owned parameter's ``.grad`` (id(param) → summed over the rows). Reads
    tensors only from its arguments and changes none, so that it can be compiled."""
    parts = engine.extra_gradients(batch_size, summed, calls)
    totals = {key: g.sum(dim=0) if g.shape[0] > 1 else g[0] for key, g in parts.items()}
    rows = next(iter(parts.values())).shape[0]
    return engine.flatten_by_id(parts, rows).mul_(scale), totals


def eager_rows_gradients(*args) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``rows_gradients`` in inference mode, as is the rest of the eager valuation: none of it is
    differentiated, and skipping autograd's bookkeeping for its hundreds of small ops saves a few
    percent of a step on a small model. (The compiled graphs have no such ops to save, and run
    outside it: a graph is guarded on whether its tensors are inference tensors.) The gradients
    are then inference tensors, for the valuation's own use."""
    with torch.inference_mode():
        return rows_gradients(*args)


def _subtract(grads: dict[int, torch.Tensor], totals: dict[int, torch.Tensor]) -> None:
    """``.grad`` −= the rows' part, in one foreach call."""
    targets, parts = [], []
    for key, total in totals.items():
        grad = grads.get(key)
        if grad is not None:
            targets.append(grad)
            parts.append(total if total.dtype == grad.dtype else total.to(grad.dtype))
    if targets:  # foreach refuses empty lists
        torch._foreach_sub_(targets, parts)
