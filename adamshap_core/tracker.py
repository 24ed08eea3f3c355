"""The public in-loop API: one training step that also values every example.

``InRunShapley.step`` makes exactly the update plain training makes
(``loss_fn(model(x), y).mean().backward(); clip; optimizer.step()``) and, in
the same pass, returns each example's per-step value under every method.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from numbers import Real

import torch
from torch import nn

from .batches import check_rows, is_empty, n_rows
from .compiled import Compiled
from .coverage import (
    TrainableWatch,
    batch_statistics,
    checked_rows,
    coupling_problem,
    coverage_problem,
    gradient_problem,
    recheck_due,
)
from .data_parallel import (
    averaging_problem,
    collectives_allowed,
    found_by_any,
    group_size,
    inner_module,
    lowest_pearson_over_processes,
    processes_averaged,
    rows_everywhere,
    share_buffers,
    warn_if_bypassed,
)
from .engine import GhostEngine
from .engine.ghost import Call, RowsTarget
from .errors import UserError
from .fast import MIN_CHECK_ROWS, FastMode, ReuseSchedule
from .fused import (
    ValidationRows,
    autocast_blocker,
    batch_blocker,
    join_blocker,
    model_blocker,
    precision_blocker,
    probe_blocker,
    rows_gradients,
)
from .optimizer_check import CHECKED_STEPS, StepSample, gradient_hook
from .pending_gradients import PendingGradients
from .precond import OptimizerView, ParamState, StepRead, check_methods, flat_join, method_scales, reads_state

# a coverage re-check's refusal on the processes of a DDP group whose own rows showed nothing
FOUND_ELSEWHERE = (
    "another process of the DistributedDataParallel group found, on its rows, a use the hooks miss"
)


@dataclass
class StepResult:
    """What one valued step returns."""

    loss: float  # the batch training loss (mean of per-example losses)
    val_loss: float  # validation loss at the weights before the update (NaN where not measured)
    clip_factor: float  # c = min(1, max_norm / ||g||); 1.0 without clipping
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # [B] or [B, Q]
    # on a fast-mode step that checked what reusing ∇val costs: the lowest Pearson, over methods and
    # targets, between this step's values and those the ∇val it replaces gives (NaN on other steps)
    reuse_pearson: float = math.nan


def clip_gradients(params, max_grad_norm: float) -> float:
    """Clip the gradients in place as ``clip_grad_norm_`` does; return the factor c applied."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
    # torch's own rule: scale by max_norm / (norm + 1e-6) when that is < 1
    return min(1.0, float(max_grad_norm) / (float(norm) + 1e-6))


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    inputs,
    targets,
    max_grad_norm: float | None = None,
    before_update: Callable[[torch.Tensor, float], None] | None = None,
    extra: ValidationRows | None = None,
) -> tuple[torch.Tensor, float]:
    """Plain training's step; the one code path both plain and valued training use.

    ``before_update(per_example_losses, clip_factor)`` runs after the backward
    pass and clipping, before ``optimizer.step()``: this is where values are
    computed, from the state the optimizer is about to use. ``extra``: validation
    rows to append to the batch, whose part of ``.grad`` they remove again before
    clipping (see ``fused.py``).
    Returns the per-example losses (detached) and the clip factor.
    """
    optimizer.zero_grad(set_to_none=True)
    if extra is None:
        losses = _checked(loss_fn(model(inputs), targets))
        losses.mean().backward()
    else:
        n = len(targets)
        both = loss_fn(model(torch.cat([inputs, extra.inputs])), torch.cat([targets, extra.targets]))
        losses = _checked(both, n, len(extra))[:n]
        (losses.mean() + both[n:].sum() * extra.weight).backward()
        extra.remove(both[n:].detach())
    clip = 1.0 if max_grad_norm is None else clip_gradients(model.parameters(), max_grad_norm)
    if before_update is not None:
        before_update(losses.detach(), clip)
    optimizer.step()
    return losses.detach(), clip


def _checked(losses: torch.Tensor, rows: int | None = None, extra: int = 0) -> torch.Tensor:
    """``losses``, checked to hold one loss per row: shape [B], or [rows + extra] where ``rows`` is given."""
    if losses.dim() == 1 and (rows is None or len(losses) == rows + extra):
        return losses
    what = f"{rows} training and {extra} validation rows" if rows is not None else "the batch"
    raise ValueError(f"loss_fn must return one loss per row: {what} gave shape {tuple(losses.shape)}")


def step_values(
    engine: GhostEngine,
    val_grads: torch.Tensor,
    segments: Iterable[tuple[slice, ParamState | StepRead]],
    methods: Sequence[str],
    clip: float | torch.Tensor,
    batch_size: int,
    rank: int | None = None,
    calls: list[Call] | None = None,
    rows: RowsTarget | None = None,
    priced: int | None = None,
) -> torch.Tensor:
    """φ [B, methods, Q] from ∇val and the optimizer's step per segment (``engine.values``).
    ``segments`` may be ``OptimizerView.blocks``: each block's scales are used before the next is read.
    ``rows``: ∇val is the gradient of the validation rows in this batch (see ``RowsTarget``);
    ``priced``: see ``GhostEngine.matrices``."""
    per_segment = method_scales(methods, segments, clip)
    return engine.values(val_grads, per_segment, len(methods), batch_size, rank, calls, rows, priced)


def traced_step_values(
    engine: GhostEngine,
    calls: list[Call],
    val_grads: torch.Tensor,
    reads: list[tuple[slice, StepRead]],
    methods: Sequence[str],
    clip: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """``step_values`` with the optimizer's state flattened here, from tensors in its arguments
    only: what ``compile=True`` compiles."""
    flatten = reads_state(methods)
    segments = [(where, read.state(flat_join) if flatten else read) for where, read in reads]
    return step_values(engine, val_grads, segments, methods, clip, batch_size, calls=calls)


def lowest_pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """The lowest Pearson correlation over the examples (dim 0) of ``x`` and ``y`` [B, ...], taken
    per column; NaN where every column is constant in one of them (or B < 2)."""
    x = x.reshape(len(x), -1).double()
    y = y.reshape(len(y), -1).double()
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    r = (x * y).sum(dim=0) / ((x * x).sum(dim=0) * (y * y).sum(dim=0)).sqrt()
    r = r[torch.isfinite(r)]
    return float(r.min()) if len(r) else math.nan


def _one_number(x: object) -> bool:
    """Whether ``x`` is a real number (not a bool) or a tensor holding one."""
    if isinstance(x, torch.Tensor):
        return x.numel() == 1
    return isinstance(x, Real) and not isinstance(x, bool)


def _refuse(problem: str | None) -> None:
    """Raise where the engine cannot see every example's whole gradient (``coverage.py``)."""
    if problem is not None:
        raise UserError(f"this model cannot be valued: {problem}")


class InRunShapley:
    """Values every training example during training (README: Library, How it works).

    ``loss_fn(outputs, targets)`` returns per-example losses [B]. The
    validation utility is the mean validation loss; with ``per_target=True``
    each validation row is a separate target and values have shape [B, Q].

    ``fuse_validation=True`` appends the validation rows to the training batch
    (one forward and backward instead of two, see ``fused.py``) wherever that
    computes the same ∇val; the update then equals plain training's up to float
    rounding rather than bit for bit. ``fusion_blocked`` says why the last step
    that computed ∇val took the separate pass (None: it was fused).

    ``compile=True`` runs the valuation math after the backward pass as compiled graphs (see
    ``compiled.py``); ``compile_failed`` says why it fell back to eager (None: it has not).

    Where the values would be wrong, it raises a ``UserError`` instead, at construction or at the
    step where that becomes so (``coverage.py``): a parameter use the hooks do not see, examples
    that interact through a batch norm, a parameter the optimizer moves unvalued, a hook that may
    change the gradients between the backward pass and the update; or, on its first steps, an
    optimizer whose step is not its torch base class's (``optimizer_check.py``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable,
        val_inputs,
        val_targets,
        methods: Sequence[str] = ("adam", "sgd"),
        *,
        max_grad_norm: float | None = None,
        per_target: bool = False,
        fast: bool | FastMode | Mapping = False,
        fuse_validation: bool = False,
        compile: bool = False,
    ):
        self.model = model
        warn_if_bypassed(model)
        # what the tracker's own passes (∇val, the coverage checks) run: under DDP the module it wraps
        self._inner = inner_module(model)
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.methods = check_methods(methods)
        if max_grad_norm is not None and not (_one_number(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm is {max_grad_norm!r}; expected a positive number, or None")
        self.max_grad_norm = max_grad_norm
        self.fast = FastMode.of(fast)
        self.fuse_validation = fuse_validation
        self.fusion_blocked: str | None = "no step has computed ∇val yet"
        self._val_grads: torch.Tensor | None = None  # the last ∇val (reused in fast mode)
        self._reuse: ReuseSchedule | None = None  # fast mode's: set with each validation target
        self._steps = 0
        self._checked_steps = 0  # steps compared with the optimizer's base class (a new tracker starts again)
        self._closed = False
        self.view = OptimizerView(optimizer)  # validates the optimizer up front
        # validates every trainable parameter up front; the flat layout follows the optimizer
        self.engine = GhostEngine(self._inner, order=[p for g in optimizer.param_groups for p in g["params"]])
        # DDP over several processes: the fast mode's checks and factorising are decided on all their rows
        self._together = group_size(model) > 1
        if self._together:
            self.engine.total_rows = partial(rows_everywhere, model, [id(p) for p in self.engine.parameters])
        self._pending = PendingGradients(optimizer, model)
        try:
            self._watch = TrainableWatch(optimizer, model, {id(p) for p in self.engine.parameters})
            self._norms = batch_statistics(model)
            _refuse(coupling_problem(self._norms))
            self._model_blocker: str | None = "fuse_validation is off"
            if fuse_validation:
                self._model_blocker = model_blocker(model)
            self._compiled: Compiled | None = None
            if compile:
                self._compiled = Compiled({"rows": rows_gradients, "values": traced_step_values})
            self.set_validation(val_inputs, val_targets, per_target=per_target)
        except BaseException:
            self.engine.remove()  # a refused tracker leaves the model and optimizer without its hooks
            self._pending.remove()
            raise

    def set_validation(self, val_inputs, val_targets, *, per_target: bool = False) -> None:
        """Change the validation target(s) the next steps are valued against."""
        self._check_open()
        if is_empty(val_targets):
            raise ValueError("the validation set is empty: expected at least one row to value against")
        check_rows(val_inputs, val_targets, "the validation set")
        # the rows must show the hooks see every example's whole gradient (else the values would be wrong)
        _refuse(coverage_problem(self.engine, self._inner, self.loss_fn, val_inputs, val_targets))
        self._rows_checked = checked_rows(val_inputs, val_targets)
        self._joined = False  # whether the rows have been checked joined to a training batch (join_blocker)
        self._join_problem: str | None = None  # what that check found (the rows then never join a batch)
        self.val_inputs = val_inputs
        self.val_targets = val_targets
        self.per_target = per_target
        self._val_grads = None  # a new target needs a new ∇val
        if self.fast is not None:  # and its reuse is checked afresh: the old one's drift says nothing
            self._reuse = ReuseSchedule(self.fast)
        # why these rows cannot join a training batch, whatever the batch (None: they may)
        self._rows_blocker = (
            self._model_blocker
            or precision_blocker(self.engine.parameters)
            or probe_blocker(self._inner, self.loss_fn, val_inputs, val_targets)
            or self._rows_gap(val_inputs, val_targets)
        )

    def _rows_gap(self, val_inputs, val_targets) -> str | None:
        """Where the kernels do not rebuild all of the rows' summed gradient in train mode, as the
        fused rows' part of ``.grad`` must be (None: they do)."""
        args = (self.engine, self._inner, self.loss_fn, val_inputs, val_targets)
        return gradient_problem(*args, per_row=False, training=True)

    def rechecks(self, step: int) -> bool:
        """Whether the hooks' coverage is checked again before ``step`` (from 1; ``coverage.recheck_due``)."""
        return recheck_due(step, self._rows_checked)

    def step(self, inputs, targets) -> StepResult:
        """Forward, backward, optimizer.step(), and this step's value per example."""
        self._check_open()
        if (pending := self._pending.problem()) is not None:
            raise ValueError(pending)
        try:
            return self._step(inputs, targets)
        except BaseException:
            self._pending.mark_used()  # what a refused or stopped step left is its own
            raise

    def _refuse_invalid(self, inputs, targets) -> None:
        """Refuse, before anything changes, a step whose values would be wrong (see the class doc)."""
        if is_empty(targets):
            raise ValueError("the training batch is empty: expected at least one row")
        check_rows(inputs, targets, "the training batch")
        _refuse(
            self._watch.problem()
            or coupling_problem(self._norms)
            or gradient_hook(self.optimizer, self.engine.owned_parameters)
            or averaging_problem(self.model)
        )
        self.view.check()
        if self.rechecks(self._steps + 1):
            problem = coverage_problem(self.engine, self._inner, self.loss_fn, inputs, targets)
            # under DDP every process refuses, not the one whose rows showed it alone (the others would wait)
            if collectives_allowed(self.model) and found_by_any(problem is not None, self.model):
                problem = problem or FOUND_ELSEWHERE
            _refuse(problem and f"{problem}; found at step {self._steps + 1}, on rows of its training batch")

    def _step(self, inputs, targets) -> StepResult:
        self._refuse_invalid(inputs, targets)
        self._steps += 1
        val_loss = math.nan  # measured on the steps that compute ∇val
        rows = None  # validation rows riding along in this batch
        refresh, check = self._refresh_and_check()
        replaced = self._val_grads if check else None  # valued as well, to see what reusing it costs
        reuse_pearson = math.nan
        if refresh:
            rows = self._validation_rows(inputs, targets)
            if rows is None:
                share_buffers(self.model)  # under DDP: the buffers the step's training forward will use
                self._val_grads, val_loss = self.engine.validation_gradients(
                    self.loss_fn, self.val_inputs, self.val_targets, self.per_target
                )
        rank = self.fast.rank if self.fast else None
        processes = processes_averaged(self.model)  # read before the backward pass that averages
        out: dict[str, torch.Tensor] = {}
        sample: list[StepSample] = []  # this step's, where it is compared with the optimizer's base class

        def value_batch(losses: torch.Tensor, clip: float) -> None:
            nonlocal reuse_pearson
            if self._checked_steps < CHECKED_STEPS:
                sample.append(StepSample(self.optimizer, self.model))
            B = len(losses)
            val_grads = self._val_grads if rows is None else rows.gradients  # the rows': built just now
            assert val_grads is not None  # or kept from an earlier step: see _refresh_and_check
            # too few examples to correlate: NaN (under DDP the processes count the global batch together)
            if replaced is None or (not self._together and B < MIN_CHECK_ROWS):
                values = self._values(val_grads, clip, B, rank, None if rows is None else rows.target)
            else:
                values, reuse_pearson = self._checked_values(val_grads, replaced, clip, B, rank)
            if processes > 1:  # each example's share of the averaged update (data_parallel.py)
                values /= processes
            for k, m in enumerate(self.methods):
                v = values[:, k]
                out[m] = v if self.per_target else v[:, 0]

        with self.engine.capture(extra_rows=0 if rows is None else len(rows)):
            step = (self.model, self.optimizer, self.loss_fn, inputs, targets, self.max_grad_norm)
            losses, clip = training_step(*step, before_update=value_batch, extra=rows)
        if sample:
            self._checked_steps += 1
            problem = sample[0].gap()
            if problem is not None:
                self.close()  # the later steps go unchecked: none of them may be valued either
                raise UserError(f"these values would be wrong: {problem}")
        if rows is not None:
            self._val_grads, val_loss = rows.gradients, rows.loss
        if self.fast is None:
            self._val_grads = None  # exact mode keeps nothing between steps
        if check:
            assert self._reuse is not None  # only fast mode checks
            self._reuse.record(reuse_pearson)
        return StepResult(float(losses.mean()), val_loss, clip, out, reuse_pearson)

    @property
    def rows_blocked(self) -> str | None:
        """Why, with ``fuse_validation``, the validation rows cannot join any training batch (the model,
        the loss, the kernels, or what checking them joined to a batch found; None: they join every
        batch they concatenate with). Without ``fuse_validation``: None."""
        return (self._rows_blocker or self._join_problem) if self.fuse_validation else None

    @property
    def compiles(self) -> bool:
        """Whether the valuation runs as compiled graphs (``compile=True``, and compiling has not failed)."""
        return self._compiled is not None and self._compiled.failed is None

    @property
    def compile_failed(self) -> str | None:
        """Why ``compile=True`` computes eagerly after all (None: it compiles, or was not asked to)."""
        return None if self._compiled is None else self._compiled.failed

    @property
    def compile_seconds(self) -> float:
        """Time spent in the steps that compiled a graph (0 without ``compile``)."""
        return 0.0 if self._compiled is None else self._compiled.compile_seconds

    @property
    def compiled_graphs(self) -> int:
        """Graphs compiled: per batch shape one for the values (none with a rank; the fast mode's checks
        of reuse add one, for twice the targets), one for fused rows."""
        return 0 if self._compiled is None else self._compiled.graphs

    def _values(
        self,
        val_grads: torch.Tensor,
        clip: float,
        B: int,
        rank: int | None,
        rows: RowsTarget | None,
        priced: int | None = None,
    ) -> torch.Tensor:
        """This step's values [B, methods, Q], from the state the optimizer is about to step with;
        ``rows``: ∇val came from the validation rows in this batch; ``priced``: see
        ``GhostEngine.matrices``."""
        # with a rank, the fast mode's low-rank factors draw random numbers: then every step stays eager
        if self.compiles and rank is None:
            out = self._compiled_values(val_grads, clip, B)
            if out is not None:
                return out
        blocks = self.view.blocks(self.engine.parameters, flatten=reads_state(self.methods))
        with torch.inference_mode():  # see ``fused.eager_rows_gradients``
            args = (self.engine, val_grads, blocks, self.methods, clip, B, rank)
            values = step_values(*args, rows=rows, priced=priced)
        return values.clone()  # a normal tensor again, which the caller may change in place

    def _checked_values(
        self, val_grads: torch.Tensor, replaced: torch.Tensor, clip: float, B: int, rank: int | None
    ) -> tuple[torch.Tensor, float]:
        """This step's values, and the lowest Pearson between them and those the ∇val it replaces gives.
        Both come from one contraction, the replaced ∇val as Q more targets: the optimizer's state is
        read once, and M is twice its usual size (its buffer keeps that size from the first check on).
        Low-rank factors are chosen as for this step's own targets, so that the check changes neither
        its values nor a later step's."""
        Q = len(val_grads)
        dtype = torch.promote_types(val_grads.dtype, replaced.dtype)  # the fused rows' is float32 or wider
        both = torch.cat([val_grads.to(dtype), replaced.to(dtype)])
        values = self._values(both, clip, B, rank, None, priced=len(self.methods) * Q)
        now, then = values[..., :Q], values[..., Q:]
        if self._together:  # every process decides on the global batch: they reuse ∇val on the same steps
            assert isinstance(self.model, nn.parallel.DistributedDataParallel)
            return now, lowest_pearson_over_processes(now, then, self.model, MIN_CHECK_ROWS)
        return now, lowest_pearson(now, then)

    def _compiled_values(self, val_grads: torch.Tensor, clip: float, B: int) -> torch.Tensor | None:
        assert self._compiled is not None  # called where self.compiles
        reads = [(where, read.traced()) for where, read in self.view.reads(self.engine.parameters)]
        clip_t = torch.tensor(clip, dtype=torch.float64)  # a tensor: a float would be compiled in
        args = (self.engine, self.engine.captured(B), val_grads, reads, self.methods, clip_t, B)
        return self._compiled("values", *args)

    def state_dict(self) -> dict:
        """What a resumed run needs to value its next steps exactly as an uninterrupted one."""
        return {
            "steps": self._steps,
            "val_grads": self._val_grads,
            "generator": self.engine.generator_state(),
            "reuse": None if self._reuse is None else self._reuse.state_dict(),
            # where fused rows stand: a resumed run checks and fuses on the steps an uninterrupted one would
            "joined": self._joined,
            "join_problem": self._join_problem,
            "fusion_blocked": self.fusion_blocked,  # what the last step that computed ∇val found
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` of a tracker of the same model, optimizer and validation set."""
        missing = sorted({"steps", "val_grads", "generator"} - set(state))
        if missing:
            raise ValueError(
                f"this state has no {', '.join(missing)}: expected an InRunShapley.state_dict() "
                "(an optimizer's or a model's state dict is not one)"
            )
        val_grads = state["val_grads"]
        if val_grads is not None:
            targets = n_rows(self.val_targets) if self.per_target else 1
            want = (targets, self.engine.numel)
            if tuple(val_grads.shape) != want:
                raise ValueError(
                    f"this state's validation gradient has shape {tuple(val_grads.shape)}; this tracker's is "
                    f"{want} ({'one row per validation target' if self.per_target else 'the mean target'} "
                    "over its parameters): expected the state of a tracker of the same model, validation "
                    "set and per_target"
                )
        self._steps = int(state["steps"])
        self._val_grads = val_grads
        # an older adamshap's state: the rows are checked joined on the next step that would fuse them
        self._joined, self._join_problem = bool(state.get("joined", False)), state.get("join_problem")
        if "fusion_blocked" in state:  # an older adamshap's state: a fresh tracker's, until ∇val is computed
            self.fusion_blocked = state["fusion_blocked"]
        self.engine.set_generator_state(state["generator"])
        if self._reuse is not None:
            self._reuse = ReuseSchedule(self._reuse.fast)
            if state.get("reuse") is not None:
                self._reuse.load_state_dict(state["reuse"])
            else:  # a state of exact mode, or of an older adamshap: the kept ∇val's age is unknown
                self._val_grads = None

    def _validation_rows(self, inputs, targets) -> ValidationRows | None:
        """This step's validation rows to append to the batch, or None for the separate pass."""
        self.fusion_blocked = (
            self._rows_blocker
            or self._join_problem
            or autocast_blocker(self.engine.parameters[0].device)
            or batch_blocker(inputs, targets, self.val_inputs, self.val_targets)
        )
        if self.fusion_blocked is None and (not self._joined or self.rechecks(self._steps)):
            self._joined = True
            args = (self._inner, self.loss_fn, inputs, targets, self.val_inputs, self.val_targets)
            if (problem := join_blocker(*args)) is not None:
                self._join_problem = self.fusion_blocked = problem  # until the next validation set
                warnings.warn(
                    f"fuse_validation (attribution.fuse_validation): {problem}; from step {self._steps} on, "
                    "the validation rows take the separate pass",
                    RuntimeWarning,
                    stacklevel=4,
                )
        if self.fusion_blocked is not None:
            return None
        rows = (self.engine, self.val_inputs, self.val_targets, self.per_target, len(targets))
        return ValidationRows(*rows, compiled=self._compiled)

    def _refresh_and_check(self) -> tuple[bool, bool]:
        """Whether this step recomputes ∇val (exact mode: always), and whether it also values its batch
        with the ∇val it replaces (``ReuseSchedule``)."""
        if self._reuse is None:
            return True, False
        return self._reuse.advance(self._steps, kept=self._val_grads is not None)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this tracker is closed: its hooks are gone, so it can value no more steps")

    def close(self) -> None:
        """Remove the hooks; the model is as it was before the tracker."""
        self.engine.remove()
        self._pending.remove()
        self._closed = True

    def __enter__(self) -> InRunShapley:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
