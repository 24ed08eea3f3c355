"""DistributedDataParallel on the CPU (gloo, two processes): every process values its own shard,
and together they give the values one process gets for the whole batch (README: More than one
process)."""

from __future__ import annotations

import multiprocessing
import socket

import pytest
import torch
import torch.distributed as dist
from conftest import rel_err
from data_parallel_worker import METHODS, build, case, data, optimizer_for, run, run_block
from test_readme import block_with

from adamshap_core import InRunShapley

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")


def ddp_run(tmp_path, name: str, shards: list[int], steps: int, **ddp) -> list[dict]:
    """Each process's result (data_parallel_worker.run), in rank order."""
    args = (str(tmp_path / "store"), str(tmp_path), name, shards, steps, ddp)
    return processes(tmp_path, run, len(shards), args)


def processes(tmp_path, target, world: int, args: tuple) -> list:
    """``target(rank, world, *args)`` in ``world`` processes; what each saved to tmp_path/rank<r>.pt."""
    ctx = multiprocessing.get_context("spawn")  # torch's own advice for processes that use torch
    procs = [ctx.Process(target=target, args=(rank, world, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def single_process(name: str, rows, steps: int):
    """One process valuing the global batch ``rows`` (every row of it, in order) for ``steps`` steps."""
    model = build(name)
    (x, y), (vx, vy) = data(name, 1 + max(rows))
    tracker = InRunShapley(
        model, optimizer_for(model.parameters()), case(name).loss, vx, vy, methods=METHODS, max_grad_norm=1.0
    )
    index = torch.tensor(rows)
    values = [tracker.step(x[index], y[index]).values for _ in range(steps)]
    return values, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("name,ddp", [("mlp-bias", {}), ("lm-untied", {"gradient_as_bucket_view": True})])
def test_processes_together_value_the_global_batch_as_one_process_does(tmp_path, float64, name, ddp):
    # 11 steps: the coverage check runs again at steps 2 and 10, through DDP's forward
    ranks = ddp_run(tmp_path, name, [3, 3], steps=11, **ddp)
    for r in ranks:
        assert "error" not in r, r.get("traceback")
    assert [(r["averaged"], r["unsynced"]) for r in ranks] == [(2, 1), (2, 1)]
    want, params = single_process(name, range(6), steps=11)
    for step, expected in enumerate(want):
        for m in METHODS:
            got = torch.cat([r["values"][step][m] for r in ranks])
            assert rel_err(got, expected[m]) < 1e-9, (step, m)
    for r in ranks:  # the update is plain DDP training's, which averages to the global batch's
        assert max(float((a - b).abs().max()) for a, b in zip(r["params"], params, strict=True)) < 1e-12


def test_uneven_shards_are_valued_as_their_share_of_the_average(tmp_path, float64):
    """Shards of 4 and 2 rows: DDP averages the two shards' mean gradients, so a row of the short
    shard weighs twice one of the long shard. One process with the short shard's rows twice in its
    batch of 8 makes the same update, where each copy gets half of the row's value."""
    ranks = ddp_run(tmp_path, "mlp-bias", [4, 2], steps=3, find_unused_parameters=True)
    for r in ranks:
        assert "error" not in r, r.get("traceback")
    want, params = single_process("mlp-bias", [0, 1, 2, 3, 4, 5, 4, 5], steps=3)
    for step, expected in enumerate(want):
        for m in METHODS:
            assert rel_err(ranks[0]["values"][step][m], expected[m][:4]) < 1e-9, (step, m)
            assert rel_err(ranks[1]["values"][step][m], 2 * expected[m][4:6]) < 1e-9, (step, m)
            assert torch.allclose(expected[m][4:6], expected[m][6:], rtol=1e-9, atol=0)
    assert max(float((a - b).abs().max()) for a, b in zip(ranks[0]["params"], params, strict=True)) < 1e-12


def test_a_communication_hook_is_refused_before_the_step(tmp_path):
    ranks = ddp_run(tmp_path, "mlp-bias", [2, 2], steps=1, comm_hook=True)
    for r in ranks:
        assert r.get("refused"), r
        assert "communication hook (allreduce_hook)" in r["error"]
        assert "register_comm_hook" in r["error"]


def test_the_readme_example_gathers_every_example_value_by_its_id(tmp_path):
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shards = processes(tmp_path, run_block, 2, (port, str(tmp_path), block_with("all_gather_object")))
    assert shards[0] == shards[1]  # every process holds every shard
    ids = [i for shard_ids, _ in shards[0] for i in shard_ids]
    assert ids == list(range(8))
    # one process with the global batch of 8 (the same model, data and optimizer)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    gen = torch.Generator().manual_seed(1)
    val_inputs, val_targets = torch.randn(16, 10, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    inputs, targets = torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    loss_fn = lambda outputs, targets: torch.nn.functional.cross_entropy(outputs, targets, reduction="none")  # noqa: E731
    tracker = InRunShapley(
        model, torch.optim.AdamW(model.parameters(), lr=1e-3), loss_fn, val_inputs, val_targets
    )
    want = tracker.step(inputs, targets).values["adam"]
    got = torch.tensor([v for _, values in shards[0] for v in values])
    assert rel_err(got, want) < 1e-5
