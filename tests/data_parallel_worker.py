"""One process of a DistributedDataParallel run (gloo, CPU), started by test_data_parallel.py.

Each process values its shard of every global batch and saves what it got to ``out/rank<r>.pt``,
so the test can compare the processes' values with one process valuing the whole batch.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from cases import CASES
from torch import nn

from adamshap_core import InRunShapley
from adamshap_core.data_parallel import processes_averaged
from adamshap_core.errors import UserError

METHODS = ("adam", "adam_fixed", "sgd")


def case(name: str):
    return next(c for c in CASES if c.name == name)


def build(name: str) -> nn.Module:
    """The case's model, seed 0, in float64."""
    torch.manual_seed(0)
    return case(name).model().double()


def optimizer_for(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def data(name: str, n: int):
    """n training rows and 3 validation rows, the same in every process."""
    gen = torch.Generator().manual_seed(1)
    return case(name).data(n, gen), case(name).data(3, gen)


def shard(batch, rows: slice):
    return tuple(t[rows] for t in batch)


def run(rank: int, world: int, store: str, out: str, name: str, shards: list[int], steps: int, ddp: dict):
    """Train ``steps`` steps on one global batch of sum(shards) rows, this process taking its own
    ``shards[rank]`` rows; save the values per step and the final parameters."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = _train(rank, name, shards, steps, ddp)
    except Exception as e:  # the test reads it: a process that dies says nothing
        result = {"error": f"{type(e).__name__}: {e}", "refused": isinstance(e, UserError)}
        result["traceback"] = traceback.format_exc()
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_block(rank: int, world: int, port: int, out: str, block: str):
    """The README's example of a process's step, where ``dist.init_process_group`` reads the
    process's rank and the others' address from the environment, as under torchrun."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same model in every process, as DDP requires
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    gen = torch.Generator().manual_seed(1)
    val_inputs, val_targets = torch.randn(16, 10, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    ids = torch.arange(4) + 4 * rank
    names = {
        "dist": dist,
        "torch": torch,
        "InRunShapley": InRunShapley,
        "model": model,
        "loss_fn": lambda outputs, targets: nn.functional.cross_entropy(outputs, targets, reduction="none"),
        "val_inputs": val_inputs,
        "val_targets": val_targets,
        "inputs": torch.randn(8, 10, generator=gen)[ids],
        "targets": torch.randint(0, 3, (8,), generator=gen)[ids],
        "ids": ids,
    }
    exec(block, names)
    torch.save(names["shards"], Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _train(rank: int, name: str, shards: list[int], steps: int, ddp: dict) -> dict:
    model = build(name)
    comm_hook = ddp.pop("comm_hook", False)
    wrapped = nn.parallel.DistributedDataParallel(model, **ddp)
    if comm_hook:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        wrapped.register_comm_hook(dist.group.WORLD, allreduce_hook)
    optimizer = optimizer_for(wrapped.parameters())
    (x, y), (vx, vy) = data(name, sum(shards))
    start = sum(shards[:rank])
    inputs, targets = shard((x, y), slice(start, start + shards[rank]))
    tracker = InRunShapley(wrapped, optimizer, case(name).loss, vx, vy, methods=METHODS, max_grad_norm=1.0)
    with wrapped.no_sync():
        unsynced = processes_averaged(wrapped)
    values = []
    for _ in range(steps):
        result = tracker.step(inputs, targets)
        values.append({m: v.detach().clone() for m, v in result.values.items()})
    return {
        "values": values,
        "params": [p.detach().clone() for p in model.parameters()],
        "averaged": processes_averaged(wrapped),
        "unsynced": unsynced,
    }
