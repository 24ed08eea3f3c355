"""DistributedDataParallel on the CPU (gloo, two processes): every process values its own shard,
and together they give the values one process gets for the whole batch (README: More than one
process). The two processes run every scenario once, in one process group; each test reads its own."""

from __future__ import annotations

import math
import multiprocessing

import pytest
import torch
import torch.distributed as dist
from conftest import rel_err
from data_parallel_worker import (
    MAX_GRAD_NORM,
    METHODS,
    Scenario,
    batches,
    build,
    case,
    factorizing_cost,
    optimizer_for,
    run,
    run_block,
)
from test_readme import block_with

from adamshap_core import InRunShapley

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")

REFRESHED = {"warmup": 1, "refresh_every": 4}
RANKED = {"warmup": 1, "refresh_every": 2, "rank": 2, "min_pearson": None}
SCENARIOS = {
    s.name: s
    for s in [
        # 11 steps: the coverage check runs again at steps 2 and 10, on the module DDP wraps
        Scenario("even", steps=11),
        Scenario("uneven", shards=(4, 2), ddp={"find_unused_parameters": True}),
        # a static graph: DDP takes its first iteration for the pattern of every later one
        Scenario(
            "static-lm",
            case="lm-untied",
            steps=11,
            ddp={"static_graph": True, "gradient_as_bucket_view": True},
        ),
        # shards of 6 rows: too few for a process's own check of reusing ∇val, not for the global batch
        Scenario("fast", shards=(6, 6), steps=12, fast={"warmup": 2, "refresh_every": 4}),
        Scenario("no-sync", steps=2, no_sync=True),
        Scenario("comm-hook", steps=1, comm_hook=True),
        Scenario("ignored", steps=1, ignore=("0.bias",)),
        Scenario("join", steps=2, join_extra=1),
        Scenario("bare", steps=1, bare=True),
        # 40 rows a process: factorising M pays on the global batch's 80 rows alone, at no fixed cost
        Scenario("fast-rank", case="wide-mlp", shards=(40, 40), fast=RANKED, cheap_factorizing=True),
        # every step in no_sync(): the checks are still the processes' together (4 rows alone: never)
        Scenario(
            "fast-no-sync", shards=(8, 4), steps=8, fast={"warmup": 1, "refresh_every": 4}, no_sync=True
        ),
        Scenario("found-elsewhere", case="sneaky", shards=(3, 3), steps=2),
        Scenario("buffers", case="centred", shards=(3, 3), steps=4),
    ]
}


@pytest.fixture(autouse=True)
def _in_float64(request):
    """The one-process references in float64, as the processes run (the README example's aside)."""
    if "readme" not in request.node.name:
        request.getfixturevalue("float64")


def processes(tmp_path, target, world: int, args: tuple) -> list:
    """``target(rank, world, *args)`` in ``world`` processes; what each saved to tmp_path/rank<r>.pt."""
    ctx = multiprocessing.get_context("spawn")  # torch's own advice for processes that use torch
    procs = [ctx.Process(target=target, args=(rank, world, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():  # a hang: end them all
            p.kill()
            p.join()
    saved = [tmp_path / f"rank{r}.pt" for r in range(world)]
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world and all(f.exists() for f in saved), f"exit codes {codes}"
    return [torch.load(f, weights_only=False) for f in saved]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each process's results, {scenario: result}, in rank order."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    return processes(tmp_path, run, 2, (str(tmp_path / "store"), str(tmp_path), list(SCENARIOS.values())))


def scenario(ranks, name: str) -> list[dict]:
    got = [r[name] for r in ranks]
    for r in got:
        assert "traceback" not in r, r["traceback"]
    return got


def single_process(s: Scenario, rows, steps: int | None = None, alone: dict | None = None):
    """One process valuing rows ``rows`` of each global batch of scenario ``s`` (every row of it, in
    order, some twice maybe); ``alone`` {step: (rows, factor)}: at that step, those rows with the
    training loss scaled by the factor."""
    model = build(s.case)
    global_batches, (vx, vy) = batches(s.case, sum(s.shards), s.steps + s.join_extra)
    loss = case(s.case).loss
    args = (model, optimizer_for(model.parameters()), loss, vx, vy)
    tracker = InRunShapley(*args, methods=METHODS, max_grad_norm=MAX_GRAD_NORM, fast=s.fast or False)
    results = []
    with factorizing_cost(s):
        for step, (x, y) in enumerate(global_batches[:steps], start=1):
            index = torch.tensor(list(rows))
            if step in (alone or {}):
                index, factor = torch.tensor(alone[step][0]), alone[step][1]
                tracker.loss_fn = lambda out, t, f=factor: f * loss(out, t)
            results.append(tracker.step(x[index], y[index]))
    return results, [p.detach() for p in model.parameters()]


def _joined(results: list[dict], steps: int) -> list[dict]:
    """Per step, each method's values of every process, in rank order."""
    return [{m: torch.cat([r["values"][step][m] for r in results]) for m in METHODS} for step in range(steps)]


def assert_values(got: list[dict], want, steps=None, factor: float = 1.0) -> None:
    for step in range(len(want)) if steps is None else steps:
        for m in METHODS:
            assert rel_err(got[step][m], factor * want[step].values[m]) < 1e-9, (step, m)


def assert_params(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True)) < 1e-12


@pytest.mark.parametrize("name", ["even", "static-lm", "fast-rank"])
def test_processes_together_value_the_global_batch_as_one_process_does(ranks, name):
    s = SCENARIOS[name]
    got = scenario(ranks, name)
    assert [r["averaged"] for r in got] == [[2] * s.steps] * 2
    want, params = single_process(s, range(sum(s.shards)))
    assert_values(_joined(got, s.steps), want)
    for r in got:  # the update is plain DDP training's, which averages to the global batch's
        assert_params(r["params"], params)


def test_uneven_shards_are_valued_as_their_share_of_the_average(ranks):
    """Shards of 4 and 2 rows: DDP averages the two shards' mean gradients, so a row of the short
    shard weighs twice one of the long shard. One process with the short shard's rows twice in its
    batch of 8 makes the same update, where each copy gets half of the row's value."""
    first, second = scenario(ranks, "uneven")
    want, params = single_process(SCENARIOS["uneven"], [0, 1, 2, 3, 4, 5, 4, 5])
    assert_values(first["values"], [_rows(w, slice(0, 4)) for w in want])
    assert_values(second["values"], [_rows(w, slice(4, 6)) for w in want], factor=2.0)
    for w in want:
        assert all(torch.allclose(w.values[m][4:6], w.values[m][6:], rtol=1e-9, atol=0) for m in METHODS)
    assert_params(first["params"], params)


def _rows(result, rows: slice):
    """``result`` (a StepResult) with the values of ``rows`` alone."""
    return type(result)(
        result.loss, result.val_loss, result.clip_factor, {m: v[rows] for m, v in result.values.items()}
    )


def test_the_fast_modes_checks_decide_on_the_global_batch_in_every_process(ranks):
    """Every process reuses ∇val on the same steps, as one process valuing the global batch does, so
    their ∇val stay one; a process's own 6 rows are too few to check, the global batch's 12 are not."""
    got = scenario(ranks, "fast")
    want, params = single_process(SCENARIOS["fast"], range(12))
    reused = [math.isnan(w.val_loss) for w in want]
    checked = [not math.isnan(w.reuse_pearson) for w in want]
    assert any(reused) and any(checked)
    for r in got:
        assert [math.isnan(v) for v in r["val_loss"]] == reused
        assert [not math.isnan(p) for p in r["reuse_pearson"]] == checked
        for p, w in zip(r["reuse_pearson"], want, strict=True):
            assert math.isnan(p) or abs(p - w.reuse_pearson) < 1e-9
        assert_params(r["params"], params)
    assert_values(_joined(got, 12), want)


def test_steps_in_no_sync_are_each_processs_own_from_the_first(ranks):
    """In no_sync() each process updates with its own gradient, from the tracker's first step on:
    its start-up checks leave DDP's next backward pass alone."""
    for rank, r in enumerate(scenario(ranks, "no-sync")):
        assert r["averaged"] == [1, 1]
        want, params = single_process(SCENARIOS["no-sync"], range(3 * rank, 3 * rank + 3))
        assert_values(r["values"], want)
        assert_params(r["params"], params)


def test_a_process_that_goes_on_alone_under_join_is_valued_as_ddp_averages_it(ranks):
    """Under Join the first process takes step 3 alone; DDP still divides by the 2 processes it
    started with, so the step follows half its batch's mean gradient, as one process with half the
    loss makes it (whose ∇val is halved too: its values are half the process's)."""
    first, second = scenario(ranks, "join")
    assert first["averaged"] == [2, 2, 2] and second["averaged"] == [2, 2]
    want, params = single_process(SCENARIOS["join"], range(6), steps=2)
    assert_values(_joined([first, second], 2), want)
    alone, params = single_process(SCENARIOS["join"], range(6), steps=3, alone={3: ([0, 1, 2], 0.5)})
    assert_values(first["values"], alone, steps=[2], factor=2.0)
    assert_params(first["params"], params)


@pytest.mark.parametrize(
    "name,says",
    [
        ("comm-hook", "communication hook (allreduce_hook)"),
        ("ignored", "DistributedDataParallel ignores 0.bias"),
    ],
)
def test_what_ddp_does_not_average_is_refused_before_the_step(ranks, name, says):
    for r in scenario(ranks, name):
        assert r["refused"] and says in r["error"], r
        assert not r["changed"]  # refused before the update


def test_the_fast_modes_checks_stay_together_in_no_sync(ranks):
    """In no_sync() each process updates alone, but the checks of reusing ∇val still correlate the
    processes' values together, so that their collectives pair up: the short shard's 4 rows could
    never be checked alone, and its schedule would part from the other's (and the next check hang)."""
    first, second = scenario(ranks, "fast-no-sync")
    assert first["averaged"] == [1] * 8
    reused = [[math.isnan(v) for v in r["val_loss"]] for r in (first, second)]
    assert reused[0] == reused[1] and any(reused[0])


def test_a_use_the_hooks_miss_on_one_processs_rows_is_refused_by_every_process(ranks):
    """The re-check at step 2 finds it on the first process's rows alone; the other refuses too,
    rather than wait in the step's all-reduce for a process that has stopped."""
    first, second = scenario(ranks, "found-elsewhere")
    assert first["refused"] and "is not what its module's hooks capture" in first["error"]
    assert second["refused"] and "another process of the DistributedDataParallel group" in second["error"]
    assert "found at step 2" in first["error"] and "found at step 2" in second["error"]


def test_every_process_values_against_the_buffers_ddp_broadcasts(ranks):
    """A running mean each process updated with its own shard would give each process another ∇val
    (its validation loss shows it); the first process's, which DDP broadcasts, gives them one."""
    first, second = scenario(ranks, "buffers")
    assert first["val_loss"] == second["val_loss"]
    assert len(set(first["val_loss"])) == 4  # the buffer moves, and with it the validation loss


def test_a_tracker_over_the_module_ddp_wraps_warns_that_it_bypasses_ddp(ranks):
    for r in scenario(ranks, "bare"):
        assert any("not wrapped in DistributedDataParallel" in w for w in r["warnings"]), r["warnings"]


def test_the_readme_example_gathers_every_example_value_by_its_id(tmp_path):
    block = block_with("all_gather_object")
    shards = processes(tmp_path, run_block, 2, (str(tmp_path / "store"), str(tmp_path), block))
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    want = (
        InRunShapley(model, optimizer, loss_fn, val_inputs, val_targets).step(inputs, targets).values["adam"]
    )
    got = torch.tensor([v for _, values in shards[0] for v in values])
    assert rel_err(got, want) < 1e-5
