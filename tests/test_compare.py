"""``adamshap compare`` end to end on a tiny recipe: the files, their columns, what they say,
and the runs and options it must refuse (exit 2, nothing written)."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import cli, facts_gpt, threads_of_runs, tiny, write_recipe

from adamshap_core.compare import COMPARE_COLUMNS, check_no_random_draws, resolve_steps
from adamshap_core.errors import UserError
from adamshap_core.run_tables import value_column

OUTPUTS = ("compare.parquet", "groundtruth.parquet", "compare_layers.parquet", "compare.json")
PLOTS = ("compare_values.png", "compare_steps.png", "compare_pearson.png")
METHODS = ["adam", "adam_fixed", "sgd"]


@pytest.fixture
def runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("ADAMSHAP_RUNS", str(root))
    return root


def train_tiny(tmp_path, name="tiny", **sections):
    recipe = write_recipe(tmp_path, tiny(name=name, **sections), name=f"{name}.yaml")
    res = cli("train", recipe, "--quiet")
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run (iris, 7 steps, steps 1-3 recorded), copied into each test's runs folder."""
    import os

    base = tmp_path_factory.mktemp("trained")
    old = os.environ.get("ADAMSHAP_RUNS")
    os.environ["ADAMSHAP_RUNS"] = str(base / "runs")
    try:
        train_tiny(base)
    finally:
        if old is None:
            del os.environ["ADAMSHAP_RUNS"]
        else:
            os.environ["ADAMSHAP_RUNS"] = old
    return base / "runs" / "tiny"


@pytest.fixture
def run(trained, runs):
    runs.mkdir(parents=True, exist_ok=True)
    return shutil.copytree(trained, runs / "tiny")


def test_compare_writes_the_report(run):
    res = cli("compare", "--permutations", "4")
    assert res.exit_code == 0, res.output
    opening = " ".join(res.stderr.split())  # the other steps are most of the work: how to leave them out
    assert "4 at the others (--no-cumulative: the evaluated steps only)" in opening, opening
    for name in OUTPUTS + PLOTS:
        assert (run / name).is_file(), name
    for name in PLOTS:
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = pd.read_parquet(run / "compare.parquet")
    assert list(table.columns) == COMPARE_COLUMNS
    assert not table.duplicated(["method", "ground_truth", "scope"]).any()
    steps = ["1", "2", "3"]  # auto = the recorded steps
    for scope in [*steps, "cumulative"]:
        for m in METHODS:
            for g in ("shapley", "loo"):
                row = table[(table.method == m) & (table.ground_truth == g) & (table.scope == scope)]
                assert len(row) == 1, (m, g, scope)
                assert -1 <= row.pearson.iloc[0] <= 1 and -1 <= row.spearman.iloc[0] <= 1
                assert row.n.iloc[0] == (16 if scope != "cumulative" else 100)
    vs_sgd = table[(table.ground_truth == "sgd") & (table.scope == "cumulative")]
    assert sorted(vs_sgd.method) == ["adam", "adam_fixed"]
    auc = table[table.ground_truth == "is_noisy"].set_index("method")["auroc"]
    assert sorted(auc.index) == sorted([*METHODS, "shapley", "loo"])
    assert auc.between(0, 1).all()
    assert table[table.ground_truth != "is_noisy"]["auroc"].isna().all()

    truth = pd.read_parquet(run / "groundtruth.parquet")
    summary = json.loads((run / "compare.json").read_text())
    values = pd.read_parquet(run / "values.parquet")
    recorded = pd.read_parquet(run / "steps_values.parquet")
    for s in summary["per_step"]:
        rows = truth[truth.scope == str(s["step"])]
        # MC Shapley is efficient: the values sum to U(N) − U(∅)
        assert rows.shapley.sum() == pytest.approx(s["u_full"] - s["u_empty"], rel=1e-9, abs=1e-15)
        assert (rows.permutations == 4).all() and (rows.shapley_se >= 0).all()
        # the methods' columns are the run's own recorded values of that step
        rec = recorded[recorded.step == s["step"]]
        assert np.allclose(rows.value_adam.to_numpy(), rec.value_adam.to_numpy(), rtol=0, atol=0)
    cum = truth[truth.scope == "cumulative"].set_index("example_id")
    assert len(cum) == len(values) and cum.shapley.notna().all()
    assert np.array_equal(cum.loc[values.example_id, "value_sgd"].to_numpy(), values.value_sgd.to_numpy())
    assert summary["replay_check"]["max_relative_difference"] <= 1e-5
    assert summary["engine_vs_bruteforce_max_relative_difference"] < 1e-3
    assert summary["ground_truth_steps"] == 7

    layers = pd.read_parquet(run / "compare_layers.parquet")
    assert set(layers.layer) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    shares = layers.groupby(["step", "method"])["share"].sum()
    assert np.allclose(shares, 1.0)
    assert np.allclose(layers[layers.method == "adam"].pearson_vs_adam, 1.0)

    out = res.stdout
    assert "vs MC Shapley" in out and "steps 2–5" in out and "cumulative" in out and "AUROC" in out
    assert "where sgd departs from adam" in out and "replay reproduced the run" in out


def test_cumulative_truth_is_the_sum_of_every_steps_truth(run):
    res = cli("compare", "--permutations", "2", "--steps", "1-7", "--baseline", "adam", "-q")
    assert res.exit_code == 0, res.output
    truth = pd.read_parquet(run / "groundtruth.parquet")
    per_step = truth[truth.scope != "cumulative"]
    assert sorted(per_step.scope.unique(), key=int) == [str(s) for s in range(1, 8)]
    summed = per_step.groupby("example_id")[["shapley", "loo"]].sum()
    cum = truth[truth.scope == "cumulative"].set_index("example_id").loc[summed.index]
    assert np.allclose(cum.shapley, summed.shapley, rtol=1e-12, atol=1e-18)
    assert np.allclose(cum.loo, summed.loo, rtol=1e-12, atol=1e-18)
    table = pd.read_parquet(run / "compare.parquet")
    assert set(table[table.ground_truth == "adam"].method) == {"adam_fixed", "sgd"}
    # the "cumulative, steps >= 2" figure is the correlation of the sums over steps 2..7
    later = per_step[per_step.scope != "1"].groupby("example_id")[["shapley", "value_sgd"]].sum()
    later = later.reindex(per_step.example_id.unique(), fill_value=0.0)  # step 1's examples: 0 after it
    want = np.corrcoef(later.shapley, later.value_sgd)[0, 1]
    got = json.loads((run / "compare.json").read_text())["cumulative_from_step_2"]["sgd"]["pearson"]
    assert got == pytest.approx(want, rel=1e-9)


def test_the_printed_table_shows_the_medians_and_pearson_before_spearman(run):
    """The console table's "all evaluated steps" and "cumulative" cells are compare.parquet's median
    per-step (Pearson, Spearman) and its cumulative (Pearson, Spearman), in that order, as its title
    and caption say."""
    res = cli("compare", "--permutations", "4", "--steps", "1-7")
    assert res.exit_code == 0, res.output
    t = pd.read_parquet(run / "compare.parquet")
    methods = ["adam", "adam_fixed", "sgd"]
    per_step = t[(t.ground_truth == "shapley") & (t.scope != "cumulative")].groupby("method")
    cumulative = t[(t.ground_truth == "shapley") & (t.scope == "cumulative")].set_index("method")
    lines = res.stdout.splitlines()
    every_step = next(line for line in lines if "all evaluated steps" in line)
    summed = next(line for line in lines if re.search(r"^\W*cumulative\W", line))
    medians = [(per_step.pearson.median()[m], per_step.spearman.median()[m]) for m in methods]
    sums = [(cumulative.loc[m, "pearson"], cumulative.loc[m, "spearman"]) for m in methods]
    for line, want in ((every_step, medians), (summed, sums)):
        pairs = re.findall(r"(-?\d\.\d{3}) / (-?\d\.\d{3})", line)
        assert pairs == [(f"{p:.3f}", f"{s:.3f}") for p, s in want], line


def test_every_figure_of_the_report_is_recomputed_from_its_tables(run):
    """compare.parquet's correlations and AUROCs, the cumulative standard errors and the worst
    steps, recomputed with scipy and scikit-learn from groundtruth.parquet and values.parquet."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import roc_auc_score

    res = cli("compare", "--permutations", "4", "--steps", "1-7", "-q")
    assert res.exit_code == 0, res.output
    truth = pd.read_parquet(run / "groundtruth.parquet")
    table = pd.read_parquet(run / "compare.parquet")
    values = pd.read_parquet(run / "values.parquet")
    summary = json.loads((run / "compare.json").read_text())
    checked = 0
    for r in table.itertuples(index=False):
        if r.ground_truth == "is_noisy":  # low value ⇒ noisy, on the run's values or the summed truth
            source = values if r.method in METHODS else truth[truth.scope == "cumulative"]
            score = source[value_column(r.method) if r.method in METHODS else r.method]
            assert r.auroc == pytest.approx(roc_auc_score(source.is_noisy, -score), abs=1e-12)
        else:
            rows = truth[truth.scope == r.scope]
            if r.ground_truth in METHODS and r.scope == "cumulative":  # method vs method: the run's values
                rows = values
            other = value_column(r.ground_truth) if r.ground_truth in METHODS else r.ground_truth
            a, b = rows[value_column(r.method)], rows[other]
            assert (r.pearson, r.spearman) == pytest.approx(
                (pearsonr(a, b)[0], spearmanr(a, b)[0]), abs=1e-12
            )
            assert r.n == len(rows)
        checked += 1
    assert checked == len(table) and {"shapley", "loo", "is_noisy", "sgd"} <= set(table.ground_truth)
    per_step = truth[truth.scope != "cumulative"]
    se = np.sqrt((per_step.shapley_se**2).groupby(per_step.example_id).sum())
    cum = truth[truth.scope == "cumulative"].set_index("example_id")
    assert np.allclose(cum.loc[se.index, "shapley_se"], se, rtol=1e-12)
    baseline = summary["divergence"]["baseline"]
    steps = table[
        (table.method == baseline) & (table.ground_truth == "shapley") & (table.scope != "cumulative")
    ]
    worst = steps.nsmallest(3, "pearson")
    assert [w["step"] for w in summary["divergence"]["worst_steps"]] == [int(s) for s in worst.scope]


def test_cumulative_rows_of_mixed_permutation_counts(run):
    """Steps evaluated with 6 permutations, the others with 4: the cumulative rows say 4 (the
    fewest any step drew), and its noise ratio takes the values' spread as the per-step one does."""
    res = cli("compare", "--steps", "1-2", "--permutations", "6", "--cumulative-permutations", "4", "-q")
    assert res.exit_code == 0, res.output
    truth = pd.read_parquet(run / "groundtruth.parquet")
    assert (truth[truth.scope != "cumulative"].permutations == 6).all()
    cum = truth[truth.scope == "cumulative"]
    assert (cum.permutations == 4).all()
    summary = json.loads((run / "compare.json").read_text())
    for s in summary["per_step"]:
        rows = truth[truth.scope == str(s["step"])]
        assert s["se_over_sd"] == pytest.approx(rows.shapley_se.median() / np.std(rows.shapley), rel=1e-12)
    want = cum.shapley_se.median() / np.std(cum.shapley)
    assert summary["cumulative"]["se_over_sd"] == pytest.approx(want, rel=1e-12)


def test_one_pair_a_step_leaves_the_cumulative_standard_error_unknown_not_zero(run):
    res = cli("compare", "--steps", "1-2", "--permutations", "2", "--cumulative-permutations", "2")
    assert res.exit_code == 0, res.output
    truth = pd.read_parquet(run / "groundtruth.parquet")
    cum = truth[truth.scope == "cumulative"]
    assert len(cum) and cum.shapley_se.isna().all()  # one antithetic pair has no spread to measure
    assert json.loads((run / "compare.json").read_text())["cumulative"]["median_se"] is None
    assert "cumulative se unknown" in " ".join(res.stdout.split())


@pytest.mark.parametrize("cumulative", [True, False], ids=["cumulative", "no-cumulative"])
def test_the_baseline_plot_shows_the_summed_values_its_title_correlates(run, cumulative, monkeypatch):
    from scipy.stats import pearsonr

    from adamshap_core import report

    plotted = []
    monkeypatch.setattr(report, "scatter_marked", lambda ax, x, y, marked=None: plotted.append((x, y)))
    args = ["--permutations", "2", "--steps", "2", "--cumulative-permutations", "2", "-q"]
    assert cli("compare", *args, *([] if cumulative else ["--no-cumulative"])).exit_code == 0
    values = pd.read_parquet(run / "values.parquet")
    table = pd.read_parquet(run / "compare.parquet")
    for x, y in plotted:  # adam against the baseline (sgd)
        assert x.tolist() == values["value_sgd"].tolist() and len(x) == len(values)
        method = values.columns[(values == y.to_numpy()[:, None]).all()].item().removeprefix("value_")
        row = table[(table.method == method) & (table.ground_truth == "sgd") & (table.scope == "cumulative")]
        assert pearsonr(x, y)[0] == pytest.approx(row.pearson.item(), rel=1e-9)
    assert len(plotted) == 1


def test_no_cumulative_and_a_step_list(run):
    res = cli("compare", "--permutations", "2", "--steps", "2,5", "--no-cumulative")
    assert res.exit_code == 0, res.output
    opening = " ".join(res.stderr.split())
    assert "ground truth at 2 steps: 2 permutations at the evaluated steps 2, 5" in opening
    assert "--no-cumulative" not in opening  # said only where the other steps are evaluated
    assert "replacing" not in res.stdout
    table = pd.read_parquet(run / "compare.parquet")
    truth_rows = table[table.ground_truth.isin(["shapley", "loo"])]
    assert sorted(truth_rows.scope.unique()) == ["2", "5"]
    assert (table[table.scope == "cumulative"].ground_truth.isin(["sgd", "is_noisy"])).all()
    assert json.loads((run / "compare.json").read_text())["ground_truth_steps"] == 2
    assert (run / "compare_pearson.png").is_file()  # two steps: Pearson by step
    res = cli("compare", "--permutations", "2", "--steps", "2", "--no-cumulative", "-q")
    assert res.exit_code == 0, res.output
    assert not (run / "compare_pearson.png").exists()  # one step draws none: the last compare's is gone
    assert "(replacing the earlier compare's results of 20" in " ".join(res.stdout.split())  # not silently


def assert_refused(res, *words):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    text = " ".join(res.output.split())
    for w in words:
        assert w in text, (w, text)


@pytest.mark.parametrize(
    "attribution, words",
    [
        ({"record_steps": 0}, ["record_steps: 0", "recording off"]),
        ({"enabled": False}, ["attribution.enabled: false"]),
    ],
)
def test_runs_that_cannot_be_compared_are_refused(tmp_path, runs, attribution, words):
    train_tiny(tmp_path, attribution=attribution)
    assert_refused(cli("compare", "-q"), *words)
    assert not (runs / "tiny" / "compare.parquet").exists()


def test_an_incomplete_run_is_refused(run):
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "status": "incomplete"}))
    assert_refused(cli("compare", "-q"), "incomplete")
    assert not (run / "compare.parquet").exists()


GPT = facts_gpt(name="gpt", attribution={"record_steps": 2})


def test_a_language_model_run_compares_and_dropout_is_refused(tmp_path, runs):
    """Token inputs (an embedding, a tied head, sequence losses) go through the same ground truth."""
    assert cli("train", write_recipe(tmp_path, GPT), "--quiet").exit_code == 0
    res = cli("compare", "--run", "gpt", "--permutations", "2", "--no-cumulative", "-q")
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(runs / "gpt" / "compare.parquet")
    assert set(table[table.ground_truth == "shapley"].scope) == {"1", "2"}
    assert table[table.ground_truth == "shapley"].pearson.notna().all()
    dropout = {**GPT, "name": "gptdrop", "model": {**GPT["model"], "dropout": 0.1}}
    assert cli("train", write_recipe(tmp_path, dropout), "--quiet").exit_code == 0
    refused = cli("compare", "--run", "gptdrop")  # before its opening line and progress bar
    assert_refused(refused, "dropout", "model.dropout: 0")
    assert "replaying" not in refused.output, refused.output


class Rated(torch.nn.Module):
    """Keeps a dropout rate under its own name and draws with F.dropout in its forward."""

    def __init__(self, name: str, rate: float):
        super().__init__()
        setattr(self, name, rate)


@pytest.mark.parametrize(
    "module, drawn",
    [
        (lambda: torch.nn.Dropout(0.1), "drops out with p=0.1"),
        (lambda: torch.nn.MultiheadAttention(4, 2, dropout=0.2), "has dropout=0.2"),  # an attribute only
        (lambda: torch.nn.RReLU(), "random slopes"),
        (lambda: Rated("attention_dropout", 0.3), "has attention_dropout=0.3"),  # transformers' Llama
        (lambda: Rated("hidden_pdrop", 0.1), "has hidden_pdrop=0.1"),
    ],
)
def test_every_random_draw_in_training_is_refused(module, drawn):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), module())
    with pytest.raises(UserError, match=drawn):
        check_no_random_draws(model, "r")
    check_no_random_draws(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.0)), "r")


def test_a_replay_that_does_not_reproduce_the_run_is_refused(run):
    sv = pd.read_parquet(run / "steps_values.parquet")
    sv.loc[sv.step == 3, "value_adam"] *= 1.001
    sv.to_parquet(run / "steps_values.parquet", index=False)
    assert_refused(
        cli("compare", "--permutations", "2", "--no-cumulative", "-q"), "does not reproduce", "step 3"
    )
    assert not any((run / name).exists() for name in OUTPUTS + PLOTS)


def test_a_replay_whose_validation_loss_differs_from_the_run_is_refused(run):
    steps = pd.read_parquet(run / "steps.parquet")
    steps.loc[steps.step == 4, "val_loss"] *= 1.01
    steps.to_parquet(run / "steps.parquet", index=False)
    assert_refused(
        cli("compare", "--permutations", "2", "--steps", "4", "--no-cumulative", "-q"),
        "does not reproduce",
        "before step 4",
    )


def test_a_replay_with_other_batches_is_refused_at_once(run):
    sv = pd.read_parquet(run / "steps_values.parquet")
    ids = sv.loc[sv.step == 1, "example_id"].to_numpy()
    sv.loc[sv.step == 1, "example_id"] = ids[::-1]
    sv.to_parquet(run / "steps_values.parquet", index=False)
    assert_refused(cli("compare", "--permutations", "2", "-q"), "does not reproduce", "step 1")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--permutations", "3"], ["--permutations 3", "even"]),
        (["--cumulative-permutations", "0"], ["--cumulative-permutations 0", "even"]),
        (["--steps", "0,2"], ["--steps", "outside the run", "1..7"]),
        (["--steps", "2-x"], ["--steps", "cannot read"]),
        (["--baseline", "newton"], ["--baseline 'newton'", "adam, adam_fixed, sgd"]),
        (["--permutations", "100002"], ["--permutations 100002", "2 to 100,000"]),
        # a range far beyond the run is refused before it is built (it would fill the memory)
        (["--steps", "1-100000000000000"], ["--steps", "[100000000000000] are outside the run"]),
        (["--run", "nope"], ["no run 'nope'"]),
    ],
)
def test_bad_options_exit_2(run, args, words):
    assert_refused(cli("compare", *args, "-q"), *words)
    assert not (run / "compare.parquet").exists()


def test_progress_weighs_each_step_by_its_permutations(run):
    """The bar (and so its time left) follows the work: an evaluated step of 6 permutations weighs 7
    (its permutations and the leave-one-out coalitions), another step of 2 weighs 3."""
    from adamshap_core.compare import CompareOptions, compare_run
    from adamshap_core.runio import RunFolder

    reports = []
    options = CompareOptions("sgd", "2,5", 6, True, 2, 0)
    compare_run(RunFolder(run), options, on_progress=lambda done, total: reports.append((done, total)))
    assert [tuple(total) for _, total in reports] == [(7, 2 * 7 + 5 * 3)] * 7
    work = [3, 10, 13, 16, 23, 26, 29]  # steps 2 and 5 weigh 7, the others 3
    assert [tuple(done) for done, _ in reports] == list(zip(range(1, 8), work, strict=True))


def test_the_replay_past_the_last_ground_truth_step_is_reported_too(run):
    """The replay goes on to the last step whose values the run recorded (by default its last step), to
    check them: here steps 2 and 3 after the ground truth of step 1 alone (on a large text run, minutes
    after a bar that said done)."""
    from adamshap_core.compare import CompareOptions, compare_run
    from adamshap_core.runio import RunFolder

    truth, replayed = [], []
    options = CompareOptions("sgd", "1", 2, False, 2, 0)
    compare_run(
        RunFolder(run),
        options,
        on_progress=lambda done, total: truth.append(tuple(done)),
        on_replay=lambda done, total: replayed.append((done, total)),
    )
    assert truth == [(1, 3)]
    assert replayed == [(step, 3) for step in range(4)]  # the run recorded steps 1 to 3


def test_the_opening_line_counts_one_step_as_one(run):
    res = cli("compare", "--permutations", "2", "--steps", "5", "--no-cumulative")
    assert res.exit_code == 0, res.output
    assert "replaying 7 steps; ground truth at 1 step: 2 permutations" in " ".join(res.stderr.split())


def test_a_fast_mode_run_compares(tmp_path, runs):
    """Its steps that reused ∇val record no validation loss (NaN), which the replay check skips."""
    fast = {"fast": {"warmup": 1, "refresh_every": 3, "rank": None, "min_pearson": None}}
    train_tiny(tmp_path, name="fast", attribution=fast)
    steps = pd.read_parquet(runs / "fast" / "steps.parquet")
    assert steps.val_loss.isna().tolist() == [False, True, True, False, True, True, False]
    res = cli(
        "compare", "--run", "fast", "--steps", "3,4", "--permutations", "2", "--cumulative-permutations", "2"
    )
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(runs / "fast" / "compare.parquet")
    assert set(table[table.ground_truth == "shapley"].scope) == {"3", "4", "cumulative"}  # a reuse, a refresh
    # the engine is checked against materialised gradients at the refresh step alone, where both use
    # this step's ∇val; at a reuse step alone it is not checked
    summary = json.loads((runs / "fast" / "compare.json").read_text())
    assert summary["engine_vs_bruteforce_max_relative_difference"] < 1e-3
    res = cli("compare", "--run", "fast", "--steps", "3", "--no-cumulative", "--permutations", "2")
    assert res.exit_code == 0, res.output
    assert "engine vs materialised gradients not checked" in " ".join(res.stdout.split())
    assert (
        json.loads((runs / "fast" / "compare.json").read_text())[
            "engine_vs_bruteforce_max_relative_difference"
        ]
        is None
    )


def test_a_run_valued_without_adam_shows_adams_share_by_layer_too(tmp_path, runs):
    """The replay computes adam whatever the run valued, so the layer table sets the baseline's share
    beside adam's: it printed '-' for adam's share while filling in their correlation."""
    train_tiny(tmp_path, name="noadam", attribution={"methods": ["adam_fixed", "sgd"]})
    res = cli("compare", "--run", "noadam", "--steps", "1,2", "--permutations", "2", "--no-cumulative", "-q")
    assert res.exit_code == 0, res.output
    layers = pd.read_parquet(runs / "noadam" / "compare_layers.parquet")
    assert set(layers.method) == {"adam", "adam_fixed", "sgd"}
    assert np.allclose(layers.groupby(["step", "method"])["share"].sum(), 1.0)
    rows = json.loads((runs / "noadam" / "compare.json").read_text())["divergence"]["layers"]
    assert rows and all(0 <= r["share_adam"] <= 1 for r in rows)


def test_a_refusal_without_quiet_is_the_error_line_alone(run):
    # the progress bar starts only once the replay does: a refusal before it prints nothing else
    res = cli("compare", "--permutations", "3")
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: --permutations 3"), repr(res.output)


def test_a_run_whose_data_changed_is_refused_before_the_replay(run):
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["data_sha256"] = "0" * 64
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert_refused(cli("compare", "--permutations", "2", "-q"), "differs from the one it valued")


def test_resolve_steps():
    assert resolve_steps("auto", [5, 1, 3], 9) == [1, 3, 5]
    assert resolve_steps(" 1-3, 7,2 ", [1], 9) == [1, 2, 3, 7]
    with pytest.raises(UserError, match="backwards"):
        resolve_steps("5-3", [1], 9)
    with pytest.raises(UserError, match="outside"):
        resolve_steps("10", [1], 9)


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    # the cumulative ground truth replays every step: on 2 busy cores about 4 to 6 minutes for the default
    # recipe's 4,100 steps and 4 to 5 for the CNN's float64 convolutions
    [
        pytest.param("digits-mlp", marks=pytest.mark.timeout(900)),
        "breast-cancer-mlp",
        pytest.param("digits-cnn", marks=pytest.mark.timeout(900)),
    ],
)
def test_shipped_recipes_compare(runs, recipe):
    """The same command on each shipped recipe; on the default one, the acceptance figure."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / f"{recipe}.yaml"
    assert cli("train", path, "--quiet").exit_code == 0
    res = cli("compare", "--quiet")
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(runs / recipe / "compare.parquet")
    per_step = table[(table.ground_truth == "shapley") & (table.scope != "cumulative")]
    assert set(per_step.scope) >= {"1", "2", "3", "4", "5"}
    if recipe == "digits-mlp":
        adam = per_step[per_step.method == "adam"].pearson
        assert adam.median() >= 0.99


def test_noise_levels_print_with_their_digits_not_as_zero():
    from adamshap_core.report import fmt_ratio

    assert fmt_ratio(4.49e-5) == "4.5e-05" and fmt_ratio(0.104) == "0.1" and fmt_ratio(0.0214) == "0.021"
    assert fmt_ratio(math.nan) == "–" and fmt_ratio(None) == "–"


def test_the_default_baseline_is_sgd_or_else_a_method_the_run_valued():
    from adamshap_core.compare import check_baseline

    assert check_baseline(None, ["adam", "adam_fixed", "sgd"]) == "sgd"
    assert check_baseline(None, ["adam", "adam_fixed"]) == "adam_fixed"
    assert check_baseline(None, ["adam"]) == "adam"
    assert check_baseline("adam", ["adam", "sgd"]) == "adam"
    with pytest.raises(UserError, match="--baseline 'sgd' is not a method of this run; expected one of adam"):
        check_baseline("sgd", ["adam", "adam_fixed"])


def test_a_non_finite_value_in_the_replay_check_is_the_largest_difference():
    """``nan > worst`` is False, so a NaN once passed the replay check as no difference at all."""
    from adamshap_core.compare import _rel_diff

    assert _rel_diff(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert _rel_diff(np.array([1.0, np.nan]), np.array([1.0, 2.0])) == math.inf
    assert _rel_diff(np.array([1.0, 2.0]), np.array([np.inf, 2.0])) == math.inf


def test_the_replay_runs_with_the_runs_thread_count(run, monkeypatch):
    """The run recorded its intra-op thread count, and the replay takes it whatever the shell sets
    (other counts round the same steps differently, and a replay then leaves the run's trajectory);
    the count is restored afterwards."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["torch_threads"] == torch.get_num_threads()  # as the test process trained it
    recorded = 1 if torch.get_num_threads() != 1 else 2
    (run / "metrics.json").write_text(json.dumps({**metrics, "torch_threads": recorded}))
    seen = threads_of_runs(monkeypatch)
    before = torch.get_num_threads()
    res = cli("compare", "--permutations", "2", "--steps", "3", "--no-cumulative", "-q")
    assert res.exit_code == 0, res.output
    assert seen == [recorded] and torch.get_num_threads() == before


def test_the_summary_counts_only_the_steps_its_medians_are_over():
    """A step without a correlation (a last batch of two examples) is left out of the median, and of
    the count beside it, method by method."""
    from rich.console import Console

    from adamshap_core.compare import CompareResult
    from adamshap_core.report import compare_summary_table

    rows = [
        {"method": m, "ground_truth": gt, "scope": str(step), "pearson": p, "spearman": p, "auroc": math.nan}
        for m in ("adam", "sgd")
        for gt in ("shapley", "loo")
        for step, p in ((1, 0.5), (6, 0.8), (7, math.nan), (8, 0.6), (9, math.nan if m == "sgd" else 0.9))
    ]
    result = CompareResult(
        table=pd.DataFrame(rows), truth=pd.DataFrame(), layers=pd.DataFrame(), summary={"run": "r"},
        methods=["adam", "sgd"], baseline="sgd", evaluated=[1, 6, 7, 8, 9], values=pd.DataFrame(),
    )  # fmt: skip
    console = Console(width=200, record=True)
    console.print(compare_summary_table(result))
    text = console.export_text()
    # adam has a correlation at steps 6, 8 and 9, sgd at 6 and 8 only
    assert "later steps, t > 5 (4; with a correlation: adam 3, sgd 2)" in text
    assert "early steps, t ≤ 5 (1)" in text
    assert "0.700" in text  # sgd's median of 0.8 and 0.6 (adam's is 0.800)
    result.table.loc[result.table["scope"] == "9", "pearson"] = math.nan  # now both lack steps 7 and 9
    console = Console(width=200, record=True)
    console.print(compare_summary_table(result))
    assert "all evaluated steps (3 of 5 with a correlation)" in console.export_text()
