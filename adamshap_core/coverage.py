"""Whether the ghost engine sees every example's whole gradient: checked when a tracker starts,
on a few later steps' training batches (``recheck_due``), and cheaply at every step.

A layer kernel values a parameter from what its module's hooks capture, the input a and the
output-gradient b, one row per example. That is each example's whole gradient of the parameter
only where every use of it passes through its module's hooked forward, the module computes what
its kernel assumes, the examples of a batch do not interact, and the optimizer moves no parameter
the engine does not value. Where one of these fails, the values would be silently wrong, so the
tracker refuses with an error instead (never a silent zero).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batches import first_row_again, n_rows, row_tensors, take_rows
from .engine import GhostEngine
from .engine.buffers import buffers_kept
from .engine.ghost import Call, modes_kept, set_modes
from .errors import UserError

AUTOCAST_DEVICES = ("cpu", "cuda")  # where a probe turns torch.autocast off
# distinct rows the start-up check takes each gradient of, one at a time (then the first again: see
# first_rows_and_first_again): two rows show rows that interact, and a layer applied along another
# dimension than the rows
CHECK_ROWS = 2
# how far a rebuilt gradient may be from autograd's: relative to the parameter's gradient, at least
# GAP_RTOL or ROUNDING_UNITS rounding units of its dtype; and at least GAP_FLOOR (or one unit) of
# the whole gradient. A use the hooks miss, or a layer computing something else, is off by far more.
GAP_RTOL = 1e-4
ROUNDING_UNITS = 16
GAP_FLOOR = 1e-6
NORM_CHUNK = 1 << 20  # elements of a gradient taken in float64 at a time (``norm64``)


@contextmanager
def probing(model: nn.Module, device: torch.device):
    """Yields the model's modules; afterwards their train/eval modes, their buffers and torch's random
    state are as before, so that a probe changes nothing training will see. Inside, autocast is off: a probe
    asks what the model computes, and a step under ``torch.autocast`` (whose bfloat16 gradients are
    off by far more than the checks allow a float32 parameter) must find what the start-up check,
    outside it, found."""
    modules = list(model.modules())
    with (
        modes_kept(modules),
        buffers_kept(model),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        torch.autocast(device.type, enabled=False) if device.type in AUTOCAST_DEVICES else nullcontext(),
    ):
        yield modules


def gradient_problem(
    engine: GhostEngine,
    model: nn.Module,
    loss_fn,
    inputs: Any,
    targets: Any,
    per_row: bool,
    training: bool | None = None,
) -> str | None:
    """Why the layer kernels do not rebuild autograd's gradient of these rows' loss from what the
    hooks capture in one forward and backward pass of them (None: they do). ``per_row``: each row's
    gradient on its own, else their sum. ``training``: the mode to run the model in (None: the
    modes its modules are in). Torch's random state and the modes are restored afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = batch_rows(inputs, targets)
    first = next(row_tensors(inputs), None)
    if first is None:  # inputs the model turns into tensors itself (strings, say)
        first = next(row_tensors(targets), None)
    if rows is None or first is None:
        return (
            "neither its inputs nor its targets hold a tensor with one row per example (batches.py), "
            "so whether the hooks see every example's whole gradient cannot be checked"
        )
    try:
        with probing(model, first.device) as modules, engine.capture(extra_rows=rows):
            if training is not None:
                set_modes(modules, training)
            losses = loss_fn(model(inputs), targets)
            if losses.shape != (rows,):  # the step refuses such a loss itself, with its own message
                return None
            separate = per_row and rows > 1
            # the pass that captures b; its gradient is the one to compare only where it is one row's or
            # the rows are summed
            total = torch.autograd.grad(losses.sum(), params, allow_unused=True, retain_graph=separate)
            calls = [replace(call) for call in engine.captured(0)]  # as captured: a later pass replaces b
            if separate:
                del total  # each row's gradient is compared as it comes: one model's size at a time
            # per row only: a sum over many rows may cancel below what the values' rounding shows
            disagree = _values_problem(engine, calls, rows) if per_row else None
            if disagree is not None:
                return disagree
            if not separate:
                got = engine.extra_gradients(0, summed=not per_row, calls=calls)
                name = first_mismatch(model, params, total, {key: g[0] for key, g in got.items()})
            else:
                name = None
                last = rows - 1
                for r in range(rows):  # the kernels' and autograd's gradients of one row at a time
                    got = engine.extra_gradients(0, summed=False, calls=calls, rows=slice(r, r + 1))
                    want = torch.autograd.grad(losses[r], params, allow_unused=True, retain_graph=r < last)
                    name = first_mismatch(model, params, want, {key: g[0] for key, g in got.items()})
                    del got, want
                    if name is not None:
                        break
    except UserError as e:  # rows that cannot be told apart
        return str(e)
    except RuntimeError as e:
        # torch's refusal of autograd.grad through a reentrant checkpoint (its wording before torch 2.4)
        if not any(s in str(e) for s in ("use_reentrant", "Checkpointing is not compatible with .grad()")):
            raise
        return (
            "it uses torch.utils.checkpoint with use_reentrant=True, whose backward cannot give the "
            "gradient of chosen tensors (torch.autograd.grad), as valuing a step needs; pass "
            "use_reentrant=False (torch's recommended setting), which computes the same"
        )
    if name is None:
        return None
    return (
        f"the gradient of '{name}' is not what its module's hooks capture (is it used outside "
        "its module's forward, such as F.linear(h, self.tok.weight), or is a module's forward "
        "called directly, or does a subclass of a supported layer compute something else in its "
        "forward, or do the rows of a batch interact, or does the model reorder them?)"
    )


def _values_problem(engine: GhostEngine, calls: list[Call], rows: int) -> str | None:
    """Why the layer kernels' values disagree with their own per-row gradients (None: they agree),
    from the ``rows`` rows of ``calls`` (a capture's, kept), each row on its own: for a random M,
    ⟨M, g_r⟩ through the kernels' values against M dotted with the gradients the same kernels
    build. ``gradient_problem`` checks the gradients against autograd's; this checks that the
    values are the same gradients' (a custom kernel's ``values`` and ``gradients`` are written
    apart)."""
    with torch.inference_mode():  # as the valuation runs (the engine's scratch is made in it)
        # the dtype and device the kernels build the rows' gradients in (float32 or wider)
        dtype = functools.reduce(
            torch.promote_types, (c.b.dtype for c in calls if c.b is not None), torch.float32
        )
        device = calls[0].a.device
        gen = torch.Generator().manual_seed(0)
        M = torch.randn(1, engine.numel, generator=gen, dtype=dtype).to(device)
        matrices = engine.matrices(M, [(slice(0, engine.numel), [1.0])], 1)
        del M  # the same numbers are in ``matrices``, per parameter
        values = engine.kernel_values(matrices, calls)[:, 0]  # [rows]
        want, scale = torch.zeros_like(values, dtype=dtype), torch.zeros_like(values, dtype=dtype)
        # one row's gradients at a time: a wide model's rows side by side took several times its size
        for r in range(rows):
            got = engine.extra_gradients(0, False, calls, slice(r, r + 1))
            for p in engine.parameters:  # the layout's (``got`` has any other the rows reached too)
                if id(p) in got:
                    g, m = got[id(p)].reshape(-1).to(dtype), matrices.full[id(p)].reshape(-1)
                    want[r] += g @ m
                    scale[r] += g.abs() @ m.abs()
            del got
    unit = torch.finfo(dtype).eps
    tolerance = max(GAP_RTOL, ROUNDING_UNITS * unit) * scale + torch.finfo(dtype).tiny
    if not bool(torch.isfinite(want).all()) or bool(((values - want).abs() <= tolerance).all()):
        return None  # a non-finite gradient is the step's to report (it stops the run), not a kernel's
    kernels = sorted({type(call.kernel).__name__ for call in calls})
    return (
        f"its layer kernels' values are not the dot products of their own per-row gradients with M "
        f"(for a random M: {values.tolist()} against {want.tolist()}); does a kernel's values "
        f"compute another contraction than its gradients? (kernels in use: "
        f"{', '.join(kernels)})"
    )


def first_mismatch(
    model: nn.Module,
    params: list[nn.Parameter],
    want: Sequence[torch.Tensor | None],
    got: dict[int, torch.Tensor],
) -> str | None:
    """The name of the first parameter whose gradient ``got`` (rebuilt by the kernels, say) differs from
    ``want`` (autograd's) by more than rounding."""
    # a parameter whose gradient cancels to rounding noise (an attention key's bias: softmax ignores a
    # shift common to all keys) differs by noise of its own size, so the floor is set by the whole gradient
    norms = [0.0 if w is None else norm64(w) for w in want]  # each once: a norm64 reads its whole tensor
    whole = math.sqrt(sum(n**2 for n in norms)) + 1e-30
    for p, w, w_norm in zip(params, want, norms, strict=True):
        g = got.get(id(p))
        w = torch.zeros_like(p) if w is None else w
        g = torch.zeros_like(w) if g is None else g.to(w.dtype)
        # autograd's own gradient is only as exact as the parameter's dtype: in bfloat16 or float16 it is
        # off by about one rounding unit, where the kernels (in float32) are closer to the truth
        unit = torch.finfo(w.dtype).eps
        rtol, floor = max(GAP_RTOL, ROUNDING_UNITS * unit), max(GAP_FLOOR, unit) * whole
        if norm64(g, minus=w) > rtol * w_norm + floor:
            return next(n for n, q in model.named_parameters() if q is p)
    return None


def norm64(t: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """‖t‖, or ‖t − minus‖, summed in float64 (float32's own sum drifts by 1e-3 over millions of
    elements), ``NORM_CHUNK`` elements at a time: a whole copy of a big parameter in float64 would
    take twice its size again."""
    x = t.reshape(-1)
    y = None if minus is None else minus.reshape(-1)
    if y is not None and y.numel() != x.numel():
        raise ValueError(f"norm64 of tensors of {x.numel()} and {y.numel()} elements: expected equal sizes")
    squares = 0.0
    for start in range(0, x.numel(), NORM_CHUNK):
        part = x[start : start + NORM_CHUNK].to(torch.float64, copy=True)  # never a view of ``t``
        if y is not None:
            part -= y[start : start + NORM_CHUNK]
        squares += float(part.norm()) ** 2
    return math.sqrt(squares)


def coverage_problem(engine: GhostEngine, model: nn.Module, loss_fn, inputs, targets) -> str | None:
    """The start-up check on the first ``CHECK_ROWS`` validation rows, each row's gradient on its
    own, in the modes the model is in (None: nothing found)."""
    if not cuttable(inputs, targets):  # rows held outside tensors (strings): the whole batch, summed
        return gradient_problem(engine, model, loss_fn, inputs, targets, per_row=False)
    inputs, targets = first_rows_and_first_again(inputs), first_rows_and_first_again(targets)
    problem = gradient_problem(engine, model, loss_fn, inputs, targets, per_row=True)
    if problem is None or batch_rows(inputs, targets) != CHECK_ROWS + 1:
        return problem
    return f"{problem} (this check runs the first two rows and the first again)"  # the rows it counts


def first_rows_and_first_again(batch: Any) -> Any:
    """The first ``CHECK_ROWS`` rows, then the first row again (where there are two): rows a, b, a.
    A model that reorders its rows by their content (sorting them by length, say) moves one of these
    whichever of a and b comes first, so the rebuilt gradients land on the wrong rows and the check
    sees it; rows already in the model's order, checked as a, b alone, would hide it."""
    head = take_rows(batch, 0, CHECK_ROWS)
    rows = n_rows(head)
    return head if rows is None or rows < 2 else first_row_again(head)


def cuttable(inputs: Any, targets: Any) -> bool:
    """Whether ``take_rows`` cuts both to the same rows: the inputs hold a tensor with rows, and the
    targets one too or are None (the labels inside the inputs). A list of strings, say, holds rows
    that no tensor shows, and ``take_rows`` passes it along whole."""
    return n_rows(inputs) is not None and (targets is None or n_rows(targets) is not None)


def batch_rows(inputs: Any, targets: Any) -> int | None:
    """A batch's rows: counted in its targets, else in its inputs (the labels inside them, the loss
    computed by the model); None where neither holds a tensor with rows."""
    rows = n_rows(targets)
    return n_rows(inputs) if rows is None else rows


def checked_rows(inputs: Any, targets: Any) -> int:
    """How many rows ``coverage_problem`` takes each gradient of, one at a time (0: their sum)."""
    return min(batch_rows(inputs, targets) or 0, CHECK_ROWS) if cuttable(inputs, targets) else 0


def recheck_due(step: int, rows_checked: int) -> bool:
    """Whether the step about to be taken (from 1) runs ``coverage_problem`` again, on its training
    batch. The start-up check sees the weights as they were: a use the hooks miss behind a layer
    initialised to zero (a zero head, LoRA's B) has no gradient yet, and shows once the weights move.
    So again at step 2 and at every power of ten (a few checks in a long run); and at step 1 where
    the start-up check had fewer than ``CHECK_ROWS`` rows, too few to show rows that interact."""
    if step == 1:
        return rows_checked < CHECK_ROWS
    return step == 2 or (step % 10 == 0 and str(step).rstrip("0") == "1")


def batch_statistics(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The model's batch norms, by path: each may normalise with the batch's own statistics."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, _BatchNorm)]


def coupling_problem(norms: list[tuple[str, _BatchNorm]]) -> str | None:
    """Why the examples of a training batch would interact (None: they do not): a batch norm that
    normalises with the batch's statistics makes each example's gradient depend on the others."""
    for path, m in norms:
        if m.training or m.running_mean is None:  # torch's own rule for using the batch's statistics
            return (
                f"'{path}' ({type(m).__name__}) normalises with the statistics of the batch, so every "
                "example's gradient depends on the others and per-example values are undefined; expected "
                "it in eval mode with running statistics, or a LayerNorm"
            )
    return None


class TrainableWatch:
    """The optimizer's parameters as when the tracker started. One added later (``add_param_group``),
    or one that was frozen then and is trainable now, would move without being valued."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, valued: set[int]):
        self.optimizer = optimizer
        self.count = _count(optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        held = [p for group in optimizer.param_groups for p in group["params"]]
        outside = next((p for p in held if id(p) not in names), None)
        if outside is not None:  # trainable, or it could become so unseen
            raise UserError(
                f"the optimizer holds a parameter of shape {tuple(outside.shape)} that is not one of the "
                "model's, so its part of a step could not be valued; expected an optimizer over model "
                "parameters only"
            )
        self.frozen = [(names[id(p)], p) for p in held if id(p) not in valued]

    def problem(self) -> str | None:
        """Why the optimizer would move a parameter the tracker does not value (None: it would not)."""
        if _count(self.optimizer) != self.count:
            return (
                "the optimizer's parameters changed after the tracker was built (add_param_group?); "
                "expected a new InRunShapley for the new parameters"
            )
        for name, p in self.frozen:
            if p.requires_grad:
                return (
                    f"'{name}' was frozen when the tracker was built and is trainable now; expected a new "
                    "InRunShapley after unfreezing"
                )
        return None


def _count(optimizer: torch.optim.Optimizer) -> int:
    return sum(len(group["params"]) for group in optimizer.param_groups)
