"""Training on several processes with ``DistributedDataParallel``: each process values its own
examples, and the values of all processes are those of one game (README: More than one process).

DDP averages the processes' gradients, so the update follows (1/W) Σ_processes mean_local g_i, and
an example's share of it is g_i / (B_local · W). The hooks capture the output-gradient of the local
mean loss, which carries 1/B_local alone; the values are divided by W here. The rest of the game is
the same on every process: ∇val comes from the same validation rows, and the preconditioner P from
the optimizer's state and the averaged gradient, which every process shares.
"""

from __future__ import annotations

from torch import nn


def processes_averaged(model: nn.Module) -> int:
    """How many processes this step's gradient is averaged over: DDP's process group, unless the
    step runs in ``no_sync()`` (each process then updates with its own gradient); 1 outside DDP."""
    if not isinstance(model, nn.parallel.DistributedDataParallel) or not model.require_backward_grad_sync:
        return 1
    return model.process_group.size()


def comm_hook_problem(model: nn.Module) -> str | None:
    """Why DDP may not update with the average of the processes' gradients (None: it does). A
    communication hook replaces the all-reduce (compressing the gradients, say), so the update is
    no longer the sum the values split."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    hooks = getattr(model, "_comm_hooks", None)  # the hooks register_comm_hook keeps
    if not hooks:
        return None
    names = ", ".join(getattr(hook, "__qualname__", repr(hook)) for hook, _ in hooks)
    return (
        f"the model's DistributedDataParallel has a communication hook ({names}), which replaces the "
        "average of the processes' gradients that the values split (a compressing hook changes the "
        "update itself); expected DDP without register_comm_hook"
    )
