"""adamshap bench: the command end to end on a tiny recipe (children spawned, parquet, closing
lines), the per-example baseline against the engine (float64), the ratios, bad input."""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import rel_err
from helpers import TINY, cli, tiny, tiny_gpt, write_recipe

from adamshap_core import InRunShapley, bench_worker
from adamshap_core import bench as bm
from adamshap_core.engine import GhostEngine
from adamshap_core.models import GPT, per_example_loss, sequence_loss
from adamshap_core.recipe import recipe_from_dict

CLOSING = [
    r"throughput ratio: \d+\.\d{3}",
    r"memory ratio: \d+\.\d{3}",
    r"speed-up over per-example: \d+\.\d",
]


@pytest.fixture
def runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("ADAMSHAP_RUNS", str(root))
    return root


def test_bench_end_to_end_writes_the_table_and_closing_lines(tmp_path, runs):
    recipe = write_recipe(tmp_path, tiny(attribution={"methods": ["adam", "sgd"]}))
    res = cli("bench", recipe, "--steps", "2", "--warmup", "1", "--repeats", "1", "--threads", "1", "-q")
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    for line, pattern in zip(lines[-3:], CLOSING, strict=True):
        assert re.fullmatch(pattern, line), lines[-3:]
    (folder,) = (runs / "bench").iterdir()
    assert re.fullmatch(r"tiny-\d{8}-\d{6}", folder.name)
    frame = pd.read_parquet(folder / "bench.parquet")
    assert list(frame.columns[: len(bm.COLUMNS)]) == bm.COLUMNS
    assert frame["mode"].tolist() == ["plain", "attribution", "per_example"]
    assert (frame["recipe"] == "tiny").all() and (frame["device"] == "cpu").all()
    assert (frame["methods"] == "adam,sgd").all() and (frame["batch_size"] == 16).all()
    assert (frame["repeat"] == 1).all() and (frame["val_rows"] == 20).all()
    assert (frame["examples_per_s"] > 0).all() and (frame["peak_mb"] > 0).all()
    assert (frame["threads"] == 1).all() and (frame["fusion_blocked"] == "").all()
    contract = frame.set_index("mode")["contract_ms"]
    assert contract["attribution"] > 0 and contract.drop("attribution").isna().all()
    summary = json.loads((folder / "bench.json").read_text())
    bound = summary["variants"]["exact"]["contraction_bound"]
    assert f"its contraction alone takes {contract['attribution']:.3f} ms a step" in res.stdout
    assert f"the throughput ratio would be {bound:.3f}" in res.stdout
    assert "exact mode (the ratios below): memory ratio" in res.stdout
    assert "mode: throughput" not in res.stdout
    med = frame.set_index("mode")["examples_per_s"]
    assert summary["throughput_ratio"] == pytest.approx(med["attribution"] / med["plain"])
    assert f"throughput ratio: {summary['throughput_ratio']:.3f}" == lines[-3]
    assert f"wrote bench.parquet and bench.json into {folder}" in lines

    # --summary: every bench under a folder side by side, from their bench.json
    listed = cli("bench", "--summary", runs / "bench")
    assert listed.exit_code == 0, listed.output
    assert folder.name in listed.stdout and f"{summary['throughput_ratio']:.3f}" in listed.stdout
    table = pd.read_parquet(runs / "bench" / "summary.parquet")
    assert table["name"].tolist() == [folder.name]
    assert table["speedup_over_per_example"].iloc[0] == pytest.approx(summary["speedup_over_per_example"])
    assert table["contraction_bound"].iloc[0] == pytest.approx(bound)


def _bench_json(folder: Path, **fast_pearson) -> None:
    """A bench.json as ``bm.write`` leaves it: exact and fast modes, the fast one's Pearson per method."""
    from adamshap_core import runio

    fast = {"plain": (100, 400), "attribution": (50, 420), bm.FAST_KEY: (90, 410), "per_example": (10, 500)}
    summary = {"recipe": "tiny", "device": "cpu", "batch_size": 16, "val_rows": 20, "methods": ["adam"]}
    summary |= {"created": "2026-01-01T00:00:00", "load_1m_max": 0.5, "fast_pearson": fast_pearson}
    runio.atomic_write_json(folder / "bench.json", summary | bm.summarize(_frame([fast])))


@pytest.mark.parametrize("width", [80, 200])
def test_the_summary_fits_the_terminal_and_cuts_no_cell(tmp_path, monkeypatch, width):
    """A row per bench where that fits; on a narrower terminal a column per bench (its name folded),
    rather than 133 columns or cells cut short; the pair of Pearsons is never broken."""
    from adamshap_cli import common

    names = ["digits-mlp-20260101-000000", "digits-mlp-20260101-000100"]
    for name in names:
        (tmp_path / name).mkdir()
        _bench_json(tmp_path / name, adam={"min": 0.9871, "median": 0.99, "median_reused": 0.9932})
    monkeypatch.setattr(common.console, "_width", width)
    res = cli("bench", "--summary", tmp_path)
    assert res.exit_code == 0, res.output
    table = [line for line in res.stdout.splitlines() if line[:1] in "┏┃┡│└"]
    assert max(map(len, table)) <= width and "…" not in res.stdout
    pearsons = [line for line in table if "0.987 / 0.993" in line]
    if width == 200:
        assert len(pearsons) == 2 and all(names[1] in line for line in pearsons[1:])
    else:  # one row holds both fast modes' Pearsons; a column per bench, the name folded in its header
        assert len(pearsons) == 1 and pearsons[0].count("0.987 / 0.993") == 2


def test_summary_refuses_a_recipe_and_an_empty_folder(tmp_path, runs):
    res = cli("bench", write_recipe(tmp_path, TINY), "--summary", tmp_path)
    assert res.exit_code == 2 and "no RECIPE" in res.stderr
    res = cli("bench", "--summary", tmp_path, "--steps", "5", "--fast")  # options it would not read
    assert res.exit_code == 2 and "expected no --steps, --fast with it" in res.stderr
    (tmp_path / "empty").mkdir()
    res = cli("bench", "--summary", tmp_path / "empty")
    assert res.exit_code == 2 and "no bench.json" in res.stderr


def test_the_fidelity_lines_say_when_no_step_reused_the_validation_gradient(monkeypatch):
    from types import SimpleNamespace

    from adamshap_cli import bench as cb

    from adamshap_core import bench as bm

    summary = {"median": 1.0, "min": 1.0, "steps": 5, "undefined_steps": 0, "median_reused": math.nan}
    monkeypatch.setattr(bm, "fidelity_summary", lambda fid: {"adam": {**summary, "reused_steps": 0}})
    monkeypatch.setattr(bm, "low_rank_summary", lambda fid: {"rank": None})
    lines = cb.fidelity_lines(SimpleNamespace(fidelity={"max_parameter_gap": 0.0}))
    assert "no step reused ∇val (the fast mode's warm-up is longer" in lines[0] and "nan" not in lines[0]
    assert lines[1] == "low-rank M: off (rank null)"  # so nothing to put the differences down to
    # checks that refused reuse say so, with what they found
    fidelity = {"max_parameter_gap": 0.0, "checks": [math.nan, 0.97, None, 0.99, 0.5]}  # None: JSON's NaN
    lines = cb.fidelity_lines(SimpleNamespace(fidelity=fidelity))
    assert (
        "no step reused ∇val (its checks of reuse did not allow it: see attribution.fast.min_pearson)"
        in lines[0]
    )
    assert lines[1].startswith(
        "the fast mode's 3 checks of reuse found a Pearson of 0.5000 at the lowest (median 0.9700)"
    )


def test_the_default_recipe_is_found_from_another_folder(tmp_path, monkeypatch):
    from adamshap_core import bench as bm

    monkeypatch.chdir(tmp_path)  # no recipes/ here: the project's own is taken
    plan = bm.plan(steps=1, repeats=1, out=tmp_path / "out")
    assert Path(plan.recipe_path) == bm.SHIPPED_RECIPES / "digits-mlp.yaml"
    assert plan.recipe_name == "digits-mlp"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--steps", "0"], "--steps is 0"),
        (["--methods", "adam,newton"], "unknown method"),
        (["--methods", ""], "(none given)"),
        (["--batch-size", "500"], "larger than the training split"),
        (["--val-batch", "500"], "(--val-batch sets `attribution.val_batch` here.)"),
        (["--device", "tpu"], "--device"),
        pytest.param(
            ["--device", "cuda"],
            "--device is cuda, but no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here"),
        ),
        (["--batch-size", "0"], "--batch-size is 0"),
        (["--threads", "0"], "--threads is 0"),
        (["--set", "model.hidden=[0]"], "model.hidden"),
        (["--set", "attribution.enabled=false"], "`attribution.enabled` is false"),
    ],
    ids=[
        "steps",
        "method",
        "no-method",
        "batch",
        "val-batch",
        "device",
        "no-cuda",
        "batch-0",
        "threads-0",
        "set",
        "disabled",
    ],
)
def test_bad_options_exit_2_and_write_nothing(tmp_path, runs, args, expected):
    recipe = write_recipe(tmp_path, TINY)
    res = cli("bench", recipe, *args, "-q")
    assert res.exit_code == 2 and expected in res.stderr and "Traceback" not in res.output
    assert not runs.exists()


def test_a_missing_recipe_exits_2(tmp_path, runs):
    res = cli("bench", tmp_path / "nope.yaml", "-q")
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_fidelity_compares_fast_with_exact_values(tmp_path):
    fast = {"warmup": 1, "refresh_every": 3, "rank": None, "min_pearson": None}
    spec = _spec(tmp_path, tiny(attribution={"fast": fast}), methods=["adam", "sgd"], fast=True, steps=5)
    fid = bm.fidelity(spec)
    # ∇val is computed at the warm-up step and every third step after it, and reused in between
    assert fid["reused"] == [False, True, True, False, True, True]
    pearson = np.asarray(fid["pearson"]["adam"])
    assert np.allclose(pearson[~np.asarray(fid["reused"])], 1.0)  # those steps compute the exact values
    summary = bm.fidelity_summary(fid)
    assert set(summary) == {"adam", "sgd"}
    assert all(s["steps"] == spec.total_steps and s["reused_steps"] == 4 for s in summary.values())
    assert all(-1.0 <= s["min"] <= s["median"] <= 1.0 for s in summary.values())
    assert summary["adam"]["median_reused"] == pytest.approx(np.median(pearson[np.asarray(fid["reused"])]))


def test_fidelity_says_whether_the_low_rank_M_took_part(tmp_path, monkeypatch):
    """The bench reports how many weight matrices the fast mode factorised: none where factorising
    costs more than it saves (the default costs, on this tiny MLP), all where it is free."""
    from adamshap_cli.bench import low_rank_line

    from adamshap_core.engine import low_rank

    def summary(rank):
        fast = {"warmup": 1, "refresh_every": 2, "rank": rank}
        spec = _spec(tmp_path, tiny(attribution={"fast": fast}), fast=True, steps=3)
        return bm.low_rank_summary(bm.fidelity(spec))

    costly = summary(1)
    assert costly == {"rank": 1, "factorable": 2, "most_factored": 0, "steps_factored": 0, "steps": 4}
    # none factorised: the differences from the exact values are the reused ∇val's, where a step reused it
    assert "none costs less factorised at these sizes): the differences" in low_rank_line(costly, reused=True)
    assert low_rank_line(costly, reused=False).endswith("(none costs less factorised at these sizes)")
    monkeypatch.setattr(low_rank, "FACTORIZE_PASSES", 0)
    monkeypatch.setattr(low_rank, "FACTORIZE_OVERHEAD", 0)
    free = summary(1)
    assert free["most_factored"] == 2 and free["steps_factored"] == 4
    assert low_rank_line(free, reused=True).startswith(
        "low-rank M (rank 1): at most 2 of the 2 weight matrices"
    )
    assert "off (rank null)" in low_rank_line(summary(None), reused=True)


def test_fidelity_compares_on_the_same_updates_also_with_fused_rows(tmp_path):
    """The fast mode makes the exact mode's updates; fused rows (on every exact step, on few fast ones)
    must not make the two copies drift apart by rounding."""
    attribution = {"fuse_validation": True, "fast": {"warmup": 1, "refresh_every": 3}}
    spec = _spec(tmp_path, tiny(attribution=attribution), methods=["adam"], fast=True, steps=6)
    fid = bm.fidelity(spec)
    assert fid["max_parameter_gap"] == 0.0
    # the step after the fast mode's warm-up checks what reusing the warm-up's ∇val would cost
    assert len(fid["checks"]) == spec.total_steps and not math.isnan(fid["checks"][1])
    assert bm.checks_summary(fid)["min"] == min(c for c in fid["checks"] if not math.isnan(c))


def test_fidelity_steps_a_model_with_dropout_alike_in_both_copies(tmp_path):
    """Each copy draws its dropout masks from a random stream of its own: stepped in turn on torch's
    one stream, the copies of a GPT with dropout 0.2 drew other masks, ended 0.18 apart, and the
    per-step Pearson of steps that reused nothing fell to -0.54, read as the fast mode's cost."""
    fast = {"warmup": 3, "refresh_every": 2, "rank": None, "min_pearson": None}
    recipe = tiny_gpt(model={"dropout": 0.2}, attribution={"fast": fast})
    fid = bm.fidelity(_spec(tmp_path, recipe, methods=["adam"], fast=True, steps=3))
    assert fid["max_parameter_gap"] == 0.0
    exact_steps = ~np.asarray(fid["reused"])
    assert exact_steps.sum() >= 3 and np.allclose(np.asarray(fid["pearson"]["adam"])[exact_steps], 1.0)


def test_a_bench_of_fused_rows_that_took_the_separate_pass_says_so(tmp_path):
    from adamshap_cli.bench import fusion_lines

    spec = _spec(tmp_path, tiny_gpt(model={"dropout": 0.2}, attribution={"fuse_validation": True}))
    assert "drops out with p=0.2" in bm.measure(spec, "attribution")["fusion_blocked"]
    assert bm.measure(spec, "plain")["fusion_blocked"] == ""
    assert "took the separate pass (why)" in fusion_lines({"fusion_blocked": "why"})[0]
    assert fusion_lines({"fusion_blocked": None}) == []


@pytest.mark.slow
def test_bench_fast_end_to_end_measures_exact_and_fast(tmp_path, runs):
    out = tmp_path / "out"
    args = ["--steps", "2", "--warmup", "1", "--repeats", "1", "--threads", "1", "--fast", "--out", out]
    res = cli("bench", write_recipe(tmp_path, TINY), *args, "-q")
    assert res.exit_code == 0, res.output
    frame = pd.read_parquet(out / "bench.parquet")
    assert list(zip(frame["mode"], frame["fast"], strict=True)) == [
        ("plain", False),
        ("attribution", False),
        ("attribution", True),
        ("per_example", False),
    ]
    for m in ("adam", "adam_fixed", "sgd"):
        assert f"fast vs exact Pearson per step, {m}: median" in res.stdout
    assert "exact mode: throughput ratio" in res.stdout
    assert "fast mode (the ratios below): memory" in res.stdout
    summary = json.loads((out / "bench.json").read_text())
    assert summary["throughput_ratio"] == summary["variants"]["fast"]["throughput_ratio"]
    assert set(summary["fast_pearson"]) == {"adam", "adam_fixed", "sgd"}
    assert summary["fast_low_rank"]["rank"] == 8 and "low-rank M (rank 8)" in res.stdout
    listed = bm.collect(tmp_path)
    assert listed["variant"].tolist() == ["exact", "fast"]
    assert pd.isna(listed["fast_pearson_min"].iloc[0]) and listed["fast_pearson_min"].iloc[1] <= 1.0


def test_an_undefined_pearson_in_a_summary_reads_as_nan():
    # bench.json writes NaN as null: a fast mode timed before any step reused ∇val has no such median
    assert math.isnan(bm._worst([0.5, None])) and math.isnan(bm._worst([math.nan, 0.5]))
    assert bm._worst([0.7, 0.5]) == 0.5 and bm._worst([]) is None


def test_fast_uses_the_recipes_fast_settings_and_exact_stays_exact(tmp_path):
    from adamshap_core.fast import FastMode

    spec = _spec(tmp_path, tiny(attribution={"fast": {"refresh_every": 2, "warmup": 1, "rank": None}}))
    fast = bm.Session.build(spec, "attribution", fast=True)
    exact = bm.Session.build(spec, "attribution", fast=False)
    assert fast.stepper.tracker.fast == FastMode(refresh_every=2, warmup=1, rank=None)
    assert exact.stepper.tracker.fast is None
    default = bm.Session.build(_spec(tmp_path, tiny()), "attribution", fast=True)
    assert default.stepper.tracker.fast == FastMode()
    for session in (fast, exact, default):
        session.close()


def test_the_fast_mode_is_timed_past_its_own_warm_up(tmp_path, monkeypatch):
    attribution = {"fast": {"refresh_every": 2, "warmup": 3, "rank": None}}
    spec = _spec(tmp_path, tiny(attribution=attribution), steps=2, warmup=1)
    stepped = []
    step = bm.Session.step
    monkeypatch.setattr(bm.Session, "step", lambda self, x, y: stepped.append(1) or step(self, x, y))
    fast = bm.measure(spec, "attribution", fast=True)
    assert (fast["warmup_steps"], fast["untimed_rechecks"]) == (1 + 3, 0)  # timed: steps 5 and 6
    assert len(stepped) == 1 + 3 + 2
    # exact: step 2 re-checks the hooks' coverage (as steps 10, 100, ... do): run, not timed
    exact = bm.measure(spec, "attribution", fast=False)
    assert (exact["warmup_steps"], exact["untimed_rechecks"]) == (1, 1)  # timed: steps 3 and 4
    assert len(stepped) == 1 + 3 + 2 + (1 + 1 + 2)
    plain = bm.measure(spec, "plain")
    assert plain["untimed_rechecks"] == 0 and len(stepped) == 6 + 4 + (1 + 2)


def test_the_steps_of_a_coverage_recheck_are_run_but_not_timed(tmp_path):
    spec = _spec(tmp_path, tiny(), steps=20, warmup=3)
    session = bm.Session.build(spec, "attribution")
    assert [s for s in range(1, 200) if session.rechecks(s)] == [2, 10, 100]
    assert bm._timed_steps(session) == set(range(4, 3 + 20 + 2)) - {10}  # step 10 is not timed
    session.close()
    plain = bm.Session.build(spec, "plain")
    assert bm._timed_steps(plain) == set(range(4, 3 + 20 + 1)) and not plain.rechecks(10)


def test_the_contraction_alone_is_timed_on_a_valued_step_and_the_engine_left_as_it_was(tmp_path, monkeypatch):
    spec = _spec(tmp_path, tiny(), steps=2, warmup=1)
    contracted = []
    contract = GhostEngine.contract
    monkeypatch.setattr(GhostEngine, "contract", lambda *a, **k: contracted.append(1) or contract(*a, **k))
    session = bm.Session.build(spec, "attribution")
    memory = session.memory
    assert bm.contraction_ms(session, session.batches()[0], memory) > 0
    assert len(contracted) == 1 + bm.CONTRACT_RUNS  # the step's own, then the timed ones
    assert "contract" not in vars(session.stepper.tracker.engine)
    session.close()
    plain = bm.Session.build(spec, "plain")
    assert math.isnan(bm.contraction_ms(plain, plain.batches()[0], memory))


def _spec(tmp_path, recipe: dict, methods=("adam",), fast=False, steps=2, warmup=1) -> bm.BenchSpec:
    r = recipe_from_dict(recipe, base_dir=tmp_path)
    return bm.BenchSpec(r.to_dict(), steps, warmup, list(methods), fast)


# ---- the per-example baseline computes what the engine computes --------------------------------


def _mlp_case():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    gen = torch.Generator().manual_seed(1)

    def batch(n):
        return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)

    return model, per_example_loss, batch, torch.optim.Adam, {"weight_decay": 0.05}


def _gpt_case():
    torch.manual_seed(0)
    model = GPT(11, 6, n_layer=1, n_head=2, d_model=8, mlp_ratio=2, tie_weights=True)
    gen = torch.Generator().manual_seed(1)

    def batch(n):
        return torch.randint(1, 11, (n, 5), generator=gen), torch.randint(0, 11, (n, 5), generator=gen)

    return model, sequence_loss, batch, torch.optim.AdamW, {"weight_decay": 0.1}


@pytest.mark.parametrize("case", [_mlp_case, _gpt_case], ids=["mlp-adam-l2", "gpt-adamw-tied"])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clip", "clipped"])
def test_per_example_baseline_matches_the_engine(case, clip, float64):
    methods = ("adam", "adam_fixed", "sgd")
    model, loss_fn, batch, optim, kw = case()
    twin = copy.deepcopy(model)
    opt, twin_opt = optim(model.parameters(), lr=1e-2, **kw), optim(twin.parameters(), lr=1e-2, **kw)
    vx, vy = batch(3)
    tracker = InRunShapley(model, opt, loss_fn, vx, vy, methods, max_grad_norm=clip)
    baseline = bm.PerExampleStep(twin, twin_opt, loss_fn, vx, vy, methods, clip)
    for _ in range(3):  # the first step (no Adam state) and later ones
        x, y = batch(6)
        want = tracker.step(x, y)
        got = baseline(x, y)
        assert clip is None or want.clip_factor < 1.0  # the clipped case really clips
        assert got.shape == (6, len(methods), 1)
        for k, m in enumerate(methods):
            assert rel_err(got[:, k, 0], want.values[m]) <= 1e-10, m
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)  # the same updates


# ---- the pieces the parent uses -----------------------------------------------------------------


def test_every_repeat_times_the_modes_in_turn_then_runs_each_alone():
    assert bm.schedule(2) == [
        (1, bm.IN_TURN),
        (1, "plain"),
        (1, "attribution"),
        (1, "per_example"),
        (2, bm.IN_TURN),
        (2, "plain"),
        (2, "attribution"),
        (2, "per_example"),
    ]
    assert [task for _, task in bm.schedule(1, fast=True)] == [
        bm.IN_TURN,
        "plain",
        "attribution",
        "attribution-fast",
        "per_example",
    ]


def test_in_turn_the_sessions_step_alternately_and_each_is_timed_past_the_fast_warm_up(tmp_path, monkeypatch):
    attribution = {"fast": {"refresh_every": 2, "warmup": 2, "rank": None}}
    spec = _spec(tmp_path, tiny(attribution=attribution), fast=True, steps=2, warmup=1)
    order = []
    step = bm.Session.step
    monkeypatch.setattr(bm.Session, "step", lambda self, x, y: order.append(self) or step(self, x, y))
    monkeypatch.setattr(bm, "IN_TURN_BLOCK", 2)
    timings = bm.measure_in_turn(spec)
    assert list(timings) == ["plain", "attribution", "attribution-fast", "per_example"]
    for task, timing in timings.items():
        assert timing["warmup_steps"] == 1 + 2 and timing["examples_per_s"] > 0  # all warm up alike
        # the exact trackers re-check their coverage at step 2 (warm-up) and 10: none among 4 and 5
        assert timing["untimed_rechecks"] == 0, task
    # then one more step of each attribution mode, untimed, that times the contraction alone
    assert timings["attribution"]["contract_ms"] > 0 and timings["attribution-fast"]["contract_ms"] > 0
    assert math.isnan(timings["plain"]["contract_ms"]) and math.isnan(timings["per_example"]["contract_ms"])
    assert len(order) == 4 * 5 + 2
    # steps 1-2 of each session, then steps 3-4, then step 5: who goes first rotating
    pairs = [order[i : i + 2] for i in range(0, 16, 2)]
    assert all(first is second for first, second in pairs)
    turns = [first for first, _ in pairs]
    assert len(set(map(id, turns[:4]))) == 4
    assert turns[4:] == turns[1:4] + turns[:1] and order[16:20] == turns[2:4] + turns[:2]


def test_a_rows_throughput_is_the_in_turn_childs_and_its_memory_the_modes_own(tmp_path, monkeypatch):
    spec = _spec(tmp_path, tiny(), steps=2, warmup=1)
    plan = bm.BenchPlan(spec, "tiny", "tiny.yaml", "cpu", 16, 20, 2, tmp_path / "out", False)
    in_turn = {"plain": 100.0, "attribution": 80.0, "per_example": 10.0}

    def child(spec, task):
        if task == bm.IN_TURN:
            return {t: dict.fromkeys(bm.TIMING_FIELDS, eps) for t, eps in in_turn.items()}
        own = {"examples_per_s": 1.0, "step_ms": 1.0, "peak_mb": 400.0 + len(task)}
        return {**own, "peak_increase_mb": 1.0, "contract_ms": 1.0, "load_1m": 0.0}

    monkeypatch.setattr(bm, "run_child", child)
    frame = bm.run(plan).frame
    assert frame["mode"].tolist() == ["plain", "attribution", "per_example"] * 2
    assert frame["examples_per_s"].tolist() == list(in_turn.values()) * 2
    assert (frame["own_examples_per_s"] == 1.0).all()
    assert frame["peak_mb"].tolist() == [405.0, 411.0, 411.0] * 2
    assert bm.summarize(frame)["throughput_ratio"] == pytest.approx(0.8)


def _frame(per_repeat: list[dict]) -> pd.DataFrame:
    """Rows as ``run`` makes them, from {key: (examples/s, peak MB)} per repeat."""
    rows = []
    for repeat, measured in enumerate(per_repeat, start=1):
        for key, (eps, peak) in measured.items():
            mode, fast = ("attribution", True) if key == bm.FAST_KEY else (key, False)
            rows.append(
                {"mode": mode, "fast": fast, "repeat": repeat, "examples_per_s": eps, "peak_mb": peak}
                | {"peak_increase_mb": peak - 380, "step_ms": 1000 / eps}
                | {"contract_ms": 2.0 if mode == "attribution" else math.nan}
            )
    return pd.DataFrame(rows)


def test_summary_ratios_are_of_medians():
    frame = _frame(
        [
            {"plain": (100, 401), "attribution": (80, 421), "per_example": (10, 501)},
            {"plain": (200, 402), "attribution": (90, 422), "per_example": (5, 502)},
            {"plain": (120, 403), "attribution": (85, 423), "per_example": (9, 503)},
        ]
    )
    s = bm.summarize(frame)
    assert s["throughput_ratio"] == pytest.approx(85 / 120)
    assert s["memory_ratio"] == pytest.approx(422 / 402)
    assert s["memory_increase_ratio"] == pytest.approx(42 / 22)
    assert s["speedup_over_per_example"] == pytest.approx(85 / 9)
    # the plain step's median time over itself plus the contraction's
    assert s["contraction_bound"] == pytest.approx((1000 / 120) / (1000 / 120 + 2.0))
    assert list(s["variants"]) == ["exact"]
    # a bench.parquet written before the contraction was timed still summarises
    assert math.isnan(bm.summarize(frame.drop(columns="contract_ms"))["contraction_bound"])


def test_with_fast_the_headline_ratios_are_the_fast_modes():
    fast = {"plain": (100, 400), "attribution": (50, 420), bm.FAST_KEY: (90, 410), "per_example": (10, 500)}
    s = bm.summarize(_frame([fast]))
    assert s["throughput_ratio"] == pytest.approx(0.9) and s["memory_ratio"] == pytest.approx(410 / 400)
    assert s["speedup_over_per_example"] == pytest.approx(9.0)
    assert s["variants"]["exact"]["throughput_ratio"] == pytest.approx(0.5)
    assert s["variants"]["fast"]["throughput_ratio"] == pytest.approx(0.9)


def test_set_overrides_the_recipe_and_the_options_win(tmp_path):
    recipe = write_recipe(tmp_path, TINY)
    plan = bm.plan(recipe, overrides=["model.hidden=[5]", "train.batch_size=8"], batch_size=12, out=tmp_path)
    assert plan.spec.recipe["model"]["hidden"] == [5] and plan.batch_size == 12


def test_batches_are_full_and_follow_the_seed(tmp_path):
    spec = _spec(tmp_path, tiny(train={"batch_size": 30}), steps=5, warmup=2)
    one = bm.Session.build(spec, "plain").batches()
    two = bm.Session.build(spec, "plain").batches()
    assert len(one) == spec.total_steps and all(len(y) == 30 for _, y in one)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, two, strict=True))
    # 100 training rows: three full batches per epoch, then a fresh permutation
    first_epoch = torch.cat([y for _, y in one[:3]])
    assert len(first_epoch) == 90


def test_worker_writes_measurement_and_user_errors(tmp_path):
    spec = _spec(tmp_path, tiny(), methods=["adam"])
    spec_path, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(bm.asdict(spec)))
    assert bench_worker.main([str(spec_path), "attribution", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["examples_per_s"] > 0 and result["step_ms"] > 0
    assert result["peak_mb"] >= result["before_mb"] - 1.0 > 0  # the RSS counters may lag a few pages
    bad = bm.BenchSpec(spec.recipe, 1, 0, ["adam"], False)
    bad.recipe = {**spec.recipe, "model": {**spec.recipe["model"], "kind": "cnn"}}  # iris is no image
    spec_path.write_text(json.dumps(bm.asdict(bad)))
    assert bench_worker.main([str(spec_path), "plain", str(out)]) == 2
    assert "model.kind" in json.loads(out.read_text())["user_error"]


def test_profile_reports_phases_ops_and_the_extra_over_plain(tmp_path):
    from adamshap_core import precond

    scale = precond.scale
    spec = _spec(tmp_path, tiny(), methods=["adam"], steps=2, warmup=1)
    prof = bm.profile(spec, n_steps=2)
    assert "aten::" in prof["attribution"]["table"] and prof["attribution"]["steps"] == 2
    extra = bm.profile_extra(prof)
    assert list(extra.columns) == ["op", "attribution_ms", "plain_ms", "attribution_calls", "extra_ms"]
    assert extra["extra_ms"].is_monotonic_decreasing and len(extra) <= bm.PROFILE_ROWS
    phases = bm.phase_table(prof).set_index("phase")
    assert phases.loc["step", "attribution_ms"] > 0 and phases.loc["step", "plain_ms"] > 0
    # the tracker's phases were timed, the rules and the state inside the building of M
    assert {"validation_gradients", "matrices", "matrices: state", "matrices: rules"} <= set(phases.index)
    inner = phases.loc[list(bm.INNER_PHASES), "attribution_ms"]
    assert inner.sum() <= phases.loc["matrices", "attribution_ms"]
    named = phases.drop(index=["step", phases.index[-1], *bm.INNER_PHASES])["attribution_ms"]
    assert named.sum() <= phases.loc["step", "attribution_ms"]
    # the phase labels are gone after the profile
    assert precond.scale is scale and "state" in vars(precond.AdamRead)
    assert precond.AdamRead.state.__qualname__ == "AdamRead.state"


def test_an_out_folder_that_cannot_be_made_is_refused_before_measuring(tmp_path, runs, monkeypatch):
    from adamshap_cli import bench as bench_cli

    def measured(*args):
        raise AssertionError("measured before the folder was checked")

    monkeypatch.setattr(bench_cli, "_run_with_progress", measured)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = cli("bench", write_recipe(tmp_path, TINY), "--out", blocker / "sub", "-q")
    said = " ".join(res.stderr.split())
    assert res.exit_code == 2 and f"cannot create the folder {blocker / 'sub'}: {blocker} is a file" in said
    assert not runs.exists()


def test_a_bench_into_a_folder_of_earlier_results_says_it_replaces_them(tmp_path, runs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.json").write_text("{}")  # an earlier bench's (only its date is read)
    args = ("--steps", "1", "--warmup", "0", "--repeats", "1", "--threads", "1", "--out", out, "-q")
    res = cli("bench", write_recipe(tmp_path, TINY), *args)
    assert res.exit_code == 0, res.output
    assert "(replacing the earlier bench's results of " in " ".join(res.stdout.split())
    assert json.loads((out / "bench.json").read_text())["recipe"] == "tiny"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak is reset through Linux's /proc")
def test_the_memory_peak_is_that_of_the_steps_not_of_loading_the_data():
    """A large file's loading peaks above any step; the peak is reset once data and model are built,
    where it gave every mode the same peak (and a memory ratio of 1.000)."""
    from adamshap_core.bench import _Memory

    loading = np.ones(300 * 2**20 // 8)  # 300 MB, touched, then given back
    del loading
    memory = _Memory(torch.device("cpu")).report()
    assert memory["peak_mb"] < memory["before_mb"] + 100, memory


def test_the_memory_increase_is_over_the_memory_before_the_steps():
    from adamshap_core.bench import _Memory

    report = _Memory(torch.device("cpu")).report()
    assert report["peak_increase_mb"] == report["peak_mb"] - report["before_mb"] < report["peak_mb"]


@pytest.mark.parametrize("fast, profile", [(False, False), (True, False), (True, True), (False, True)])
def test_the_progress_bar_counts_every_child_run(fast, profile):
    """--fast adds the fidelity child, --profile the profiling one."""
    from types import SimpleNamespace

    from adamshap_core.bench import n_children, schedule

    plan = SimpleNamespace(repeats=3, spec=SimpleNamespace(fast=fast), profile=profile)
    # every repeat: the in-turn child, then each mode alone
    assert (
        n_children(plan)
        == 3 * (1 + 3 + int(fast)) + int(fast) + int(profile)
        == len(schedule(3, fast)) + int(fast) + int(profile)
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl's parent-death signal is Linux's")
def test_a_killed_bench_takes_its_child_and_its_temporary_folder_with_it(tmp_path, runs):
    """A SIGKILLed bench cannot stop its child or remove the child's folder itself: the child, told by
    the kernel, stops (else it measured on for minutes) and removes the folder from /tmp."""
    import os
    import signal
    import subprocess
    import time

    recipe = write_recipe(tmp_path, tiny())
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    cmd = [sys.executable, "-m", "adamshap_cli", "bench", str(recipe), "--steps", "1000000", "--repeats", "1"]
    bench = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{bench.pid}/task/{bench.pid}/children")

    def child() -> int | None:
        found = children.read_text().split() if children.exists() else []
        return int(found[0]) if found else None

    def folders() -> list[Path]:
        return list(scratch.glob("adamshap-bench-*"))

    deadline = time.monotonic() + 60
    while (child() is None or not folders()) and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = child()
    assert worker is not None and folders(), "the bench started no child within a minute"
    time.sleep(1.0)  # past the child's start-up, into its measuring
    bench.kill()
    bench.wait()
    deadline = time.monotonic() + 20
    stat = Path(f"/proc/{worker}/stat")

    def running() -> bool:  # a zombie has stopped, waiting for whichever process inherited it to reap it
        try:
            return stat.read_text().split()[2] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped = not running()
    if not stopped:
        os.kill(worker, signal.SIGKILL)
    assert stopped, "the bench's child kept running after the bench was killed"
    assert folders() == []
