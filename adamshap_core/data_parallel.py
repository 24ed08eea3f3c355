"""Training on several processes with ``DistributedDataParallel``: each process values its own
examples, and the values of all processes are those of one game (README: More than one process).

DDP averages the processes' gradients, so the update follows (1/W) Σ_processes mean_local g_i, and
an example's share of it is g_i / (B_local · W). The hooks capture the output-gradient of the local
mean loss, which carries 1/B_local alone; the values are divided by W here. The rest of the game is
the same on every process: ∇val comes from the same validation rows, and the preconditioner P from
the optimizer's state and the averaged gradient, which every process shares.

The tracker's own passes (∇val, the coverage checks) run the wrapped module directly: through DDP's
forward each would count as a training iteration of its own (a static graph would record that no
parameter is used, ``Join`` would shadow a collective that no backward pass follows). Where the
processes must agree, the tracker adds collectives of its own: before ∇val's pass, the buffers DDP
broadcasts at each forward; at a fast-mode check of what reusing ∇val costs, the global batch's
correlation; at a coverage re-check, whether any process found a fault. A model put under ``Join``
takes none of them, since a process that has finished would not meet them.
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


def group_size(model: nn.Module) -> int:
    """How many processes train the model together: DDP's process group; 1 outside DDP."""
    return model.process_group.size() if isinstance(model, DDP) else 1


def under_join(model: nn.Module) -> bool:
    """Whether the model has been put under ``Join`` (uneven inputs): torch keeps the setting once
    made, so it holds after the ``Join`` block too."""
    join = getattr(model, "_join_config", None)
    return join is not None and join.enable


def collectives_allowed(model: nn.Module) -> bool:
    """Whether the tracker may add collectives of its own: under DDP over several processes, which
    all take every step together (under ``Join`` one may have finished)."""
    return group_size(model) > 1 and not under_join(model)


def processes_averaged(model: nn.Module) -> int:
    """How many processes this step's gradient is averaged over: DDP's process group, unless the
    step runs in ``no_sync()`` (each process then updates with its own gradient); 1 outside DDP."""
    return group_size(model) if isinstance(model, DDP) and model.require_backward_grad_sync else 1


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
    # DDP's join hook sets _divide_by_initial_world_size from Join's options, and torch keeps it
    if under_join(model) and not getattr(model, "_divide_by_initial_world_size", True):
        return (
            "the model has been put under Join with divide_by_initial_world_size=False (torch keeps the "
            "setting), where DDP averages over the processes that have not finished yet, which the values "
            "cannot follow; expected Join's default, divide_by_initial_world_size=True"
        )
    return None


def rows_everywhere(model: nn.Module, layout: list[int], rows: dict[int, int]) -> dict[int, int]:
    """``rows`` (id(param) -> rows this process contracts it with) summed over the processes, so that
    every process decides alike which weights the fast mode factorises (and so draws its random
    directions in step); this process's own under ``Join``, where the others may have finished."""
    if not collectives_allowed(model):
        return rows
    assert isinstance(model, DDP)
    counts = torch.tensor([float(rows.get(key, 0)) for key in layout], device=next(model.parameters()).device)
    dist.all_reduce(counts, group=model.process_group)
    return {key: int(n) for key, n in zip(layout, counts.tolist(), strict=True) if n > 0}


def share_buffers(model: nn.Module) -> None:
    """Before ∇val's pass: every process takes the buffers of the group's first process, which DDP
    broadcasts at the next training forward anyway (a running mean of the inputs each process updated
    with its own shard would otherwise give each process another ∇val)."""
    if not collectives_allowed(model):
        return
    assert isinstance(model, DDP)
    if not (model.broadcast_buffers and model.require_forward_param_sync):
        return
    first = dist.get_global_rank(model.process_group, 0)
    for buffer in getattr(model, "modules_buffers", None) or list(model.module.buffers()):
        dist.broadcast(buffer, src=first, group=model.process_group)


def found_by_any(found: bool, model: nn.Module) -> bool:
    """Whether any process of the group found something (each passes its own ``found``), so that a
    refusal on one process is made on all of them rather than leaving the others waiting."""
    assert isinstance(model, DDP)  # where collectives_allowed
    flag = torch.tensor([float(found)], device=next(model.parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=model.process_group)
    return bool(flag.item())


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
    """``tracker.lowest_pearson`` over the examples of every process's batch [B_local, ...], so that
    every process decides on the same figure: the means first, then the sums about them (the sums of
    raw squares would cancel where the values' mean is far larger than their spread); NaN where the
    global batch has fewer than ``fewest`` examples. Under ``Join`` NaN on every process, without
    collectives: a process that has finished would not meet them."""
    if under_join(model):
        return math.nan
    x, y = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    sums = torch.stack([torch.full_like(x[0], float(len(x))), x.sum(0), y.sum(0)])
    dist.all_reduce(sums, group=model.process_group)
    n, mean_x, mean_y = sums[0], sums[1] / sums[0], sums[2] / sums[0]
    x, y = x - mean_x, y - mean_y
    about = torch.stack([(x * y).sum(0), (x * x).sum(0), (y * y).sum(0)])
    dist.all_reduce(about, group=model.process_group)
    if float(n[0]) < fewest:
        return math.nan
    cov, var_x, var_y = about
    r = cov / (var_x * var_y).sqrt()
    r = r[torch.isfinite(r)]
    return float(r.min()) if len(r) else math.nan
