"""Training on several processes with ``DistributedDataParallel``: each process values its own
examples, and the values of all processes are those of one game (README: More than one process).

DDP averages the processes' gradients, so the update follows (1/W) Σ_processes mean_local g_i, and
an example's share of it is g_i / (B_local · W). The hooks capture the output-gradient of the local
mean loss, which carries 1/B_local alone; the values are divided by W here. The rest of the game is
the same on every process: ∇val comes from the same validation rows, and the preconditioner P from
the optimizer's state and the averaged gradient, which every process shares.

The tracker's own passes (∇val, the coverage checks) run the wrapped module directly: through DDP's
forward each would count as a training iteration of its own (a static graph would record that no
parameter is used, ``Join`` would shadow a collective that no backward pass follows). Where the fast
mode checks what reusing ∇val costs, the processes decide together, on the whole global batch.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

DDP = nn.parallel.DistributedDataParallel


def inner_module(model: nn.Module) -> nn.Module:
    """The module DDP wraps, which the tracker's own passes run; outside DDP the model itself."""
    return model.module if isinstance(model, DDP) else model


def processes_averaged(model: nn.Module) -> int:
    """How many processes this step's gradient is averaged over: DDP's process group, unless the
    step runs in ``no_sync()`` (each process then updates with its own gradient); 1 outside DDP."""
    if not isinstance(model, DDP) or not model.require_backward_grad_sync:
        return 1
    return model.process_group.size()


def averaging_problem(model: nn.Module) -> str | None:
    """Why DDP may not update with the average of the processes' gradients that the values split
    (None: it does)."""
    if not isinstance(model, DDP):
        return None
    hooks = getattr(model, "_comm_hooks", None)  # the hooks register_comm_hook keeps
    if hooks:
        names = ", ".join(getattr(hook, "__qualname__", repr(hook)) for hook, _ in hooks)
        return (
            f"the model's DistributedDataParallel has a communication hook ({names}), which replaces the "
            "average of the processes' gradients that the values split (a compressing hook changes the "
            "update itself); expected DDP without register_comm_hook"
        )
    ignored = sorted(getattr(model, "parameters_to_ignore", ()))
    if ignored:
        return (
            f"DistributedDataParallel ignores {', '.join(ignored)}: each process updates them with its own "
            "gradient, not the average the values split; expected DDP over every trainable parameter"
        )
    join = getattr(
        model, "_join_config", None
    )  # set while a Join context runs; its setting, by DDP's join hook
    if join is not None and join.enable and not getattr(model, "_divide_by_initial_world_size", True):
        return (
            "the step runs under Join with divide_by_initial_world_size=False, where DDP averages over "
            "the processes that have not joined yet, which the values cannot follow; expected Join's "
            "default, divide_by_initial_world_size=True"
        )
    return None


def warn_if_bypassed(model: nn.Module) -> None:
    """Warn where several processes train but the model is not wrapped in DDP: each then trains and
    values its own model, which is rarely what a data-parallel job means (a tracker over
    ``ddp.module`` bypasses DDP's averaging)."""
    if isinstance(model, DDP) or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        warnings.warn(
            f"torch.distributed runs {dist.get_world_size()} processes, but the tracker's model is not "
            "wrapped in DistributedDataParallel: each process trains and values its own model. To value "
            "a data-parallel run, pass the DistributedDataParallel model itself.",
            stacklevel=3,
        )


def lowest_pearson_over_processes(x: torch.Tensor, y: torch.Tensor, model: DDP, fewest: int) -> float:
    """``tracker.lowest_pearson`` over the examples of every process's batch [B_local, ...]: the
    sums each process holds are added up, so every process decides on the same figure; NaN where
    the global batch has fewer than ``fewest`` examples."""
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    count = torch.full_like(x[0], float(len(x)))
    sums = torch.stack([count, x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)])
    dist.all_reduce(sums, group=model.process_group)
    n, sx, sy, sxx, syy, sxy = sums
    if float(n[0]) < fewest:
        return math.nan
    r = (sxy - sx * sy / n) / ((sxx - sx * sx / n) * (syy - sy * sy / n)).sqrt()
    r = r[torch.isfinite(r)]
    return float(r.min()) if len(r) else math.nan
