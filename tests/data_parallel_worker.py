"""One process of DistributedDataParallel runs (gloo, CPU), started by test_data_parallel.py.

The processes run a list of scenarios one after the other in one process group (starting processes
costs seconds, a scenario a fraction of one). In each, every process values its shard of each global
batch; what it got is saved to ``out/rank<r>.pt``, {scenario name: result}, for the test to compare
with one process valuing the whole batch.
"""

from __future__ import annotations

import gc
import traceback
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from cases import CASES, Case, cross_entropy
from torch import nn
from torch.distributed.algorithms.join import Join

from adamshap_core import InRunShapley
from adamshap_core.data_parallel import processes_averaged
from adamshap_core.errors import UserError

METHODS = ("adam", "adam_fixed", "sgd")
MAX_GRAD_NORM = 1.0


@dataclass
class Scenario:
    name: str
    case: str = "mlp-bias"
    shards: tuple[int, ...] = (3, 3)  # rows of each process's batch
    steps: int = 3
    ddp: dict = field(default_factory=dict)  # DistributedDataParallel's options
    fast: dict | None = None
    no_sync: bool = False  # every step inside ddp.no_sync()
    comm_hook: bool = False
    ignore: tuple[str, ...] = ()  # parameters DDP is told to ignore
    join_extra: int = 0  # steps the first process takes alone, under Join
    bare: bool = False  # the tracker over the unwrapped model
    cheap_factorizing: bool = False  # no fixed cost of factorising M (low_rank.FACTORIZE_OVERHEAD)


class Sneaky(nn.Module):
    """A linear layer whose weight is used once more, outside the layer's forward (unseen by the
    hooks), on rows flagged by a first feature above 100: the coverage re-check sees it only where
    a process's rows are flagged."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        flagged = (x[:, :1] > 100).to(x.dtype)
        return self.lin(x) + flagged * nn.functional.linear(x, self.lin.weight)


class Centred(nn.Module):
    """A linear layer on inputs centred by a running mean, which a training forward updates with its
    batch: under DDP each process's differs from the others' until DDP broadcasts the first's."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.register_buffer("mean", torch.zeros(5))

    def forward(self, x):
        if self.training:
            self.mean.mul_(0.5).add_(0.5 * x.detach().mean(0))
        return self.lin(x - self.mean)


def _tabular(n: int, gen: torch.Generator):
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


# models for the data-parallel scenarios alone, besides the exactness cases
OWN_CASES = [
    # wide enough that the fast mode's low-rank M pays on the global batch of 80 rows, not on 40
    Case(
        "wide-mlp",
        lambda: nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)),
        _tabular,
        cross_entropy,
    ),
    Case("sneaky", Sneaky, _tabular, cross_entropy),
    Case("centred", Centred, _tabular, cross_entropy),
]


def case(name: str):
    return next(c for c in [*CASES, *OWN_CASES] if c.name == name)


def build(name: str) -> nn.Module:
    """The case's model, seed 0, in float64."""
    torch.manual_seed(0)
    return case(name).model().double()


def optimizer_for(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def batches(name: str, rows: int, steps: int):
    """``steps`` global batches of ``rows`` rows and 3 validation rows, the same in every process."""
    gen = torch.Generator().manual_seed(1)
    data = case(name).data
    global_batches = [data(rows, gen) for _ in range(steps)]
    if name == "sneaky" and steps > 1:
        global_batches[1][0][0, 0] = 1000.0  # the first process's first row of step 2: a re-check step
    return global_batches, data(3, gen)


def run(rank: int, world: int, store: str, out: str, scenarios: list[Scenario]):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for scenario in scenarios:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results[scenario.name] = _train(rank, scenario)
            results[scenario.name]["warnings"] = [str(w.message) for w in caught]
        except Exception as e:  # the test reads it: a process that dies says nothing
            refused = isinstance(e, UserError)
            results[scenario.name] = {"error": f"{type(e).__name__}: {e}", "refused": refused}
            results[scenario.name]["traceback"] = traceback.format_exc()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()  # no process leaves while another still reads from it
    dist.destroy_process_group()


def _train(rank: int, s: Scenario) -> dict:
    with factorizing_cost(s):
        return _train_scenario(rank, s)


def factorizing_cost(s: Scenario):
    """The fixed cost the fast mode weighs factorising M against, none where the scenario says so."""
    from unittest import mock

    from adamshap_core.engine import low_rank

    return mock.patch.object(low_rank, "FACTORIZE_OVERHEAD", 0) if s.cheap_factorizing else nullcontext()


def _train_scenario(rank: int, s: Scenario) -> dict:
    model = build(s.case)
    if s.ignore:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(s.ignore))
    wrapped = nn.parallel.DistributedDataParallel(model, **s.ddp)
    if s.comm_hook:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        wrapped.register_comm_hook(dist.group.WORLD, allreduce_hook)
    optimizer = optimizer_for(wrapped.parameters())
    steps = s.steps + s.join_extra
    global_batches, (vx, vy) = batches(s.case, sum(s.shards), steps)
    start = sum(s.shards[:rank])
    mine = [(x[start : start + s.shards[rank]], y[start : start + s.shards[rank]]) for x, y in global_batches]
    if rank > 0:
        mine = mine[: s.steps]  # under Join, the first process goes on alone
    before = [p.detach().clone() for p in model.parameters()]
    tracker = InRunShapley(
        model if s.bare else wrapped,
        optimizer,
        case(s.case).loss,
        vx,
        vy,
        methods=METHODS,
        max_grad_norm=MAX_GRAD_NORM,
        fast=s.fast or False,
    )
    results, averaged = [], []
    with (
        Join([wrapped]) if s.join_extra else nullcontext(),
        wrapped.no_sync() if s.no_sync else nullcontext(),
    ):
        try:
            for inputs, targets in mine:
                averaged.append(processes_averaged(wrapped))
                results.append(tracker.step(inputs, targets))
        except UserError as e:
            changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
            return {"error": str(e), "refused": True, "changed": changed}
    return {
        "values": [{m: v.detach().clone() for m, v in r.values.items()} for r in results],
        "val_loss": [r.val_loss for r in results],
        "reuse_pearson": [r.reuse_pearson for r in results],
        "params": [p.detach().clone() for p in model.parameters()],
        "averaged": averaged,
    }


def run_block(rank: int, world: int, store: str, out: str, block: str):
    """The README's example of a process's step. Its ``dist.init_process_group("gloo")`` reads the
    processes' rendezvous from the environment, as under torchrun; here it is given a file instead."""
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same model in every process, as DDP requires
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    gen = torch.Generator().manual_seed(1)
    val_inputs, val_targets = torch.randn(16, 10, generator=gen), torch.randint(0, 3, (16,), generator=gen)

    class Distributed:  # torch.distributed, where init_process_group meets the others at ``store``
        def __getattr__(self, name):
            return getattr(dist, name)

        @staticmethod
        def init_process_group(backend):
            dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)

    names = {
        "torch": torch,
        "InRunShapley": InRunShapley,
        "model": model,
        "loss_fn": lambda outputs, targets: nn.functional.cross_entropy(outputs, targets, reduction="none"),
        "val_inputs": val_inputs,
        "val_targets": val_targets,
        "inputs": torch.randn(8, 10, generator=gen),  # the global batch, as the Library example's
        "targets": torch.randint(0, 3, (8,), generator=gen),
    }
    scope = {**names, "dist": Distributed()}
    exec(block.replace("import torch.distributed as dist\n", ""), scope)  # the block's own dist: ours
    torch.save(scope["shards"], Path(out) / f"rank{rank}.pt")
    scope.clear()  # DDP's reducer must go before its process group: freed after it, it aborts the process
    gc.collect()
    dist.barrier()  # no process leaves while another still reads from it
    dist.destroy_process_group()
