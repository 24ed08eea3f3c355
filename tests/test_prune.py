"""`adamshap prune`: selection logic, bad input, and the command end to end on a tiny run."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
from helpers import cli, tiny, write_recipe

from adamshap_core import prune as pr
from adamshap_core.errors import UserError
from adamshap_core.recipe import load_recipe
from adamshap_core.train import train

# --------------------------------------------------------------------------- selection logic


def test_select_removed_low_takes_the_lowest_values():
    values = np.array([0.5, -2.0, 3.0, -1.0, 0.0])
    assert pr.select_removed(values, 2, "low").tolist() == [1, 3]
    assert pr.select_removed(values, 3, "low").tolist() == [1, 3, 4]


def test_select_removed_high_takes_the_highest_values():
    values = np.array([0.5, -2.0, 3.0, -1.0, 0.0])
    assert pr.select_removed(values, 2, "high").tolist() == [0, 2]


def test_select_removed_breaks_ties_by_position_in_both_directions():
    values = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    assert pr.select_removed(values, 2, "low").tolist() == [1, 2]  # of the three zeros, the first two
    assert pr.select_removed(values, 2, "high").tolist() == [0, 3]  # of the three ones, the first two


def test_n_to_remove_rounds_half_up_and_refuses_empty_sides():
    assert pr.n_to_remove(10, 0.25) == 3  # 2.5 rounds up
    assert pr.n_to_remove(1297, 0.3) == 389
    with pytest.raises(UserError, match="--frac"):
        pr.n_to_remove(10, 0.01)  # removes nothing
    with pytest.raises(UserError, match="--frac"):
        pr.n_to_remove(10, 0.99)  # leaves nothing


def test_random_removed_is_seeded_and_nested_across_fractions():
    a = pr.random_removed(100, 30, seed=4)
    assert a.tolist() == pr.random_removed(100, 30, seed=4).tolist()
    assert a.tolist() != pr.random_removed(100, 30, seed=5).tolist()
    assert set(pr.random_removed(100, 10, seed=4)) <= set(a)
    assert len(set(a)) == 30


def test_oracle_removes_every_flipped_label_before_any_clean_example():
    noisy = np.zeros(50, dtype=bool)
    noisy[[3, 17, 40]] = True
    assert pr.oracle_removed(noisy, 2, seed=0).tolist() in ([3, 17], [3, 40], [17, 40])
    five = pr.oracle_removed(noisy, 5, seed=0)
    assert {3, 17, 40} <= set(five) and len(set(five)) == 5
    assert five.tolist() == pr.oracle_removed(noisy, 5, seed=0).tolist()
    assert five.tolist() != pr.oracle_removed(noisy, 5, seed=1).tolist()  # the clean ones are drawn


def test_plan_uses_the_same_training_seeds_for_every_method():
    values = {"adam": np.arange(10.0)}
    noisy = np.zeros(10, dtype=bool)
    jobs = pr.plan_retrains(
        values, noisy, methods=["adam", "random"], fracs=[0.2, 0.5], seeds=2, direction="low", base_seed=7
    )
    assert len(jobs) == 2 * (1 + 2 * 2)
    for s in (0, 1):
        seeds = {j.train_seed for j in jobs if j.seed == s}
        assert seeds == {7 + s}
    assert {j.method for j in jobs if j.frac == 0.0} == {"full"}
    adam = [j for j in jobs if j.method == "adam" and j.frac == 0.2]
    assert [j.removed.tolist() for j in adam] == [[0, 1], [0, 1]]  # values fix the subset


def test_random_and_oracle_subsets_are_drawn_from_each_seeds_training_seed():
    noisy = np.arange(20) % 3 == 0
    jobs = pr.plan_retrains(
        {}, noisy, methods=["random", "oracle"], fracs=[0.5], seeds=3, direction="low", base_seed=7
    )
    for j in (j for j in jobs if j.method != "full"):
        draw = (
            pr.random_removed
            if j.method == "random"
            else lambda n, k, seed: pr.oracle_removed(noisy, k, seed)
        )
        assert j.removed.tolist() == draw(20, 10, 7 + j.seed).tolist(), (j.method, j.seed)
    assert len({tuple(j.removed) for j in jobs if j.method == "random"}) == 3  # one subset per seed


def test_a_journal_entry_is_reused_only_for_the_same_subset():
    base = pr.Retrain("adam", "low", 0.3, 0, 7, np.array([1, 2, 3]))
    assert pr.job_key(base) == pr.job_key(pr.Retrain("adam", "low", 0.3, 0, 7, np.array([3, 2, 1])))
    assert pr.job_key(base) != pr.job_key(pr.Retrain("adam", "low", 0.3, 0, 7, np.array([1, 2, 4])))


def test_the_summary_std_is_the_sample_std_over_seeds():
    rows = pd.DataFrame(
        {"method": "adam", "frac": 0.3, "seed": [0, 1, 2], "test_accuracy": [0.5, 0.7, 0.9],
         "test_loss": 1.0, "noisy_share_removed": 0.5, "n_kept": 7}
    )  # fmt: skip
    summary = pr.summarise(rows).iloc[0]
    assert summary.acc_mean == pytest.approx(0.7) and summary.acc_std == pytest.approx(0.2)  # ddof=1


@pytest.mark.parametrize("fracs", [[0.0], [1.0], [-0.1], [1.5], [0.3, float("nan")], []])
def test_check_fracs_rejects_out_of_range(fracs):
    with pytest.raises(UserError, match="--frac"):
        pr.check_fracs(fracs)


def test_check_prune_methods_names_the_option():
    assert pr.check_prune_methods(["sgd", "random", "sgd"], ["adam", "sgd"], noisy=True) == ["sgd", "random"]
    with pytest.raises(UserError, match="--by.*unknown method 'lion'"):
        pr.check_prune_methods(["lion"], ["adam"], noisy=True)
    with pytest.raises(UserError, match="--by.*no value_sgd column"):
        pr.check_prune_methods(["sgd"], ["adam"], noisy=True)
    assert pr.check_prune_methods(["oracle"], ["adam"], noisy=True) == ["oracle"]
    with pytest.raises(UserError, match="--by oracle.*no flipped labels"):
        pr.check_prune_methods(["oracle"], ["adam"], noisy=False)
    with pytest.raises(UserError, match="--by oracle.*--remove low"):
        pr.check_prune_methods(["oracle"], ["adam"], noisy=True, direction="high")


# --------------------------------------------------------------------------- the command end to end


def train_tiny(tmp_path, name="t", **sections):
    recipe = write_recipe(tmp_path, tiny(**sections), name=f"{name}.yaml")
    res = cli("train", recipe, "--name", name, "--runs-dir", tmp_path / "runs", "-q")
    assert res.exit_code == 0, res.output
    return tmp_path / "runs" / name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("prune"))


def test_prune_end_to_end(tiny_run):
    runs = tiny_run.parent
    res = cli("prune", "--frac", "0.3,0.5", "--by", "adam", "--by", "sgd,random,oracle", "--seeds", "2",
              "--runs-dir", runs, "-q")  # fmt: skip
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(tiny_run / "pruning.parquet")
    for col in ["method", "direction", "frac", "seed", "test_accuracy", "test_loss", "n_kept",
                "noisy_share_removed"]:  # fmt: skip
        assert col in df.columns
    assert len(df) == 2 * (1 + 2 * 4)
    assert set(df["direction"]) == {"low"}
    assert set(df["method"]) == {"full", "adam", "sgd", "random", "oracle"}
    values = pd.read_parquet(tiny_run / "values.parquet")
    n = len(values)
    full = df[df["method"] == "full"]
    assert (full["n_kept"] == n).all() and full["noisy_share_removed"].isna().all()
    kept = df.loc[(df["method"] == "adam") & (df["frac"] == 0.3), "n_kept"].iloc[0]
    assert f"({kept} kept)" in res.stdout  # the table's header counts what each fraction keeps
    assert df["test_accuracy"].between(0, 1).all() and np.isfinite(df["test_loss"]).all()

    # the seed-0 full-data retrain (valuation off) reproduces the run itself (valuation on), and
    # seed 1's is the recipe trained with train.seed + 1
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    f0 = full[full["seed"] == 0].iloc[0]
    assert f0["test_accuracy"] == metrics["test_accuracy"]
    assert f0["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-5)
    recipe = load_recipe(tiny_run / "recipe.yaml")
    seed_1 = train(pr.with_seed(recipe, recipe.train.seed + 1), attribution=False).metrics["test_loss"]
    assert full[full["seed"] == 1].iloc[0]["test_loss"] == pytest.approx(seed_1, rel=1e-6)
    assert seed_1 != pytest.approx(f0["test_loss"], rel=1e-6)

    # adam's subset is the lowest-valued 30%, and its noisy share is that subset's
    k = pr.n_to_remove(n, 0.3)
    lowest = values.sort_values(["value_adam", "example_id"]).head(k)
    adam = df[(df["method"] == "adam") & (df["frac"] == 0.3)]
    assert (adam["n_kept"] == n - k).all()
    assert adam["noisy_share_removed"].iloc[0] == pytest.approx(lowest["is_noisy"].mean())

    # the oracle removes every flipped label before any clean example
    n_noisy = int(values["is_noisy"].sum())
    oracle = df[df["method"] == "oracle"].set_index(["frac", "seed"])["noisy_share_removed"]
    for (f, _), share in oracle.items():
        assert share == pytest.approx(min(1.0, n_noisy / pr.n_to_remove(n, f)))

    assert (tiny_run / "pruning-low.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "full" in res.output and "adam" in res.output and "noisy" in res.output

    # the test sample's own standard error, at the full data's mean accuracy over the seeds
    p, n_test = full["test_accuracy"].mean(), metrics["n_test"]
    said = " ".join(res.stdout.split())
    assert (
        f"At the full data's accuracy ({p:.3f}), the {n_test} test examples alone give each cell a standard "
        f"error of about ±{math.sqrt(p * (1 - p) / n_test):.3f} (binomial)"
    ) in said


def test_prune_high_keeps_the_low_rows_and_defaults_to_the_latest_run(tmp_path):
    run = train_tiny(tmp_path, "older")
    latest = train_tiny(tmp_path, "newer")
    runs = tmp_path / "runs"
    assert (
        cli("prune", "--frac", "0.3", "--by", "adam", "--seeds", "1", "--runs-dir", runs, "-q").exit_code == 0
    )
    res = cli(
        "prune", "--frac", "0.3", "--by", "adam", "--seeds", "1", "--remove", "high", "--runs-dir", runs, "-q"
    )
    assert res.exit_code == 0, res.output
    assert "replacing" not in res.stdout  # the high direction's first results
    assert not (run / "pruning.parquet").exists()
    df = pd.read_parquet(latest / "pruning.parquet")
    assert sorted(df.groupby("direction").size().items()) == [("high", 2), ("low", 2)]
    low = df[(df["method"] == "adam") & (df["direction"] == "low")].iloc[0]
    high = df[(df["method"] == "adam") & (df["direction"] == "high")].iloc[0]
    assert low["n_kept"] == high["n_kept"]
    assert (latest / "pruning-high.png").is_file()
    res = cli("prune", "--frac", "0.5", "--by", "adam", "--seeds", "1", "--runs-dir", runs)
    assert "(replacing the earlier prune's results for --remove low of 20" in " ".join(res.stdout.split())


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_a_stopped_prune_keeps_its_retrains_and_the_same_command_continues(
    tmp_path, monkeypatch, signum, code
):
    """Ctrl-C or SIGTERM part-way: exit 130 or 143, no table, the finished retrains kept; the rerun
    retrains only the rest and writes the same table as an uninterrupted prune."""
    stopped, straight = train_tiny(tmp_path, "stopped"), train_tiny(tmp_path, "straight")
    args = ["--frac", "0.2,0.3", "--by", "adam,random", "--seeds", "2", "--runs-dir", tmp_path / "runs", "-q"]
    assert cli("prune", "--run", "straight", *args).exit_code == 0
    real, calls, stop_at = pr.retrain, [], [4]

    def stop_at_the_fourth(job, recipe, data):
        calls.append(job)
        if len(calls) == stop_at[0]:
            os.kill(os.getpid(), signum)
            raise AssertionError("the signal did not stop the prune")
        return real(job, recipe, data)

    monkeypatch.setattr(pr, "retrain", stop_at_the_fourth)
    res = cli("prune", "--run", "stopped", *args)
    assert res.exit_code == code and "stopped after 3 of 10 retrains" in res.output, res.output
    assert not (stopped / "pruning.parquet").exists()
    assert len((stopped / "pruning-low.partial.jsonl").read_text().splitlines()) == 3

    calls.clear()
    stop_at[0] = None
    res = cli("prune", "--run", "stopped", *args)
    assert res.exit_code == 0 and "continuing: 3 of 10" in res.output, res.output
    assert len(calls) == 10 - 3
    assert not (stopped / "pruning-low.partial.jsonl").exists()
    pd.testing.assert_frame_equal(
        pd.read_parquet(stopped / "pruning.parquet"), pd.read_parquet(straight / "pruning.parquet")
    )


def test_a_second_prune_of_a_run_that_one_is_pruning_is_refused(tmp_path):
    from adamshap_core.locks import run_lock

    run = train_tiny(tmp_path, "busy")
    args = ["--run", "busy", "--frac", "0.3", "--by", "adam", "--seeds", "1", "--runs-dir", tmp_path / "runs"]
    with run_lock(run, "prune"):  # as the first prune holds it, in its own process
        res = cli("prune", *args, "--remove", "high", "-q")
    assert res.exit_code == 2 and "(adamshap prune) right now" in " ".join(res.stderr.split()), res.output
    assert not any(run.glob("pruning*"))  # neither a journal nor a table
    assert cli("prune", *args, "-q").exit_code == 0  # once it is free


def test_a_torn_journal_line_is_retrained(tmp_path):
    journal = pr.Journal(tmp_path / "j.jsonl")
    journal.add("a", {"test_accuracy": 0.5, "noisy_share_removed": float("nan")})
    with open(journal.path, "a") as f:
        f.write('{"key": "b", "row": {"test_acc')  # killed mid-write
    assert list(journal.load()) == ["a"]
    journal.add("c", {"test_accuracy": 0.75})
    done = journal.load()
    assert list(done) == ["a", "c"] and np.isnan(done["a"]["noisy_share_removed"])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--frac", "0"], "--frac"),
        (["--frac", "1"], "--frac"),
        (["--frac", "-0.2"], "--frac"),
        (["--frac", "abc"], "--frac"),
        (["--frac", "0.3", "--by", "adam,lion"], "--by"),
        (["--frac", "0.3", "--seeds", "0"], "--seeds"),
        (["--frac", "0.3", "--seeds", "1001"], "expected 1 to 1000"),
        (["--frac", "0.3", "--remove", "middle"], "--remove"),
        (["--frac", "0.3", "--by", "oracle", "--remove", "high"], "--by oracle"),
        (["--frac", "0.3", "--run", "nope"], "nope"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_run, args, needle):
    runs = tiny_run.parent
    before = sorted(p.name for p in tiny_run.iterdir())
    which = [] if "--run" in args else ["--run", tiny_run.name]
    res = cli("prune", *args, *which, "--runs-dir", runs)
    assert res.exit_code == 2
    assert needle in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def test_a_folder_where_a_result_file_goes_is_refused_before_the_retrains(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "runs" / tiny_run.name)
    (run / "pruning.parquet").unlink(missing_ok=True)
    (run / "pruning.parquet").mkdir()
    res = cli("prune", "--frac", "0.3", "--run", run.name, "--runs-dir", run.parent)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "pruning.parquet is a folder where adamshap writes a file" in " ".join(res.output.split())
    assert not list(run.glob("pruning-*.partial.jsonl"))  # no retrain ran


def test_a_full_disk_while_a_retrain_is_journaled_names_the_journal(tiny_run, monkeypatch):
    import errno

    from adamshap_core import prune as pr

    def full(self, line):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pr.Journal, "_append", full)
    res = cli("prune", "--frac", "0.3", "--run", tiny_run.name, "--runs-dir", tiny_run.parent)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "No space left on device (" in res.output and "pruning-low.partial.jsonl)" in res.output
    assert "expected space left on the disk." in " ".join(res.output.split())


def test_run_without_values_exits_2(tmp_path):
    run = train_tiny(tmp_path, "novalues", attribution={"enabled": False})
    res = cli("prune", "--frac", "0.3", "--runs-dir", run.parent)
    assert res.exit_code == 2 and "has no values" in res.output
    assert not (run / "pruning.parquet").exists()


def test_run_without_the_requested_method_exits_2(tmp_path):
    run = train_tiny(tmp_path, "adamonly", attribution={"methods": ["adam"]})
    res = cli("prune", "--frac", "0.3", "--by", "sgd", "--runs-dir", run.parent)
    assert res.exit_code == 2 and "--by" in res.output and "value_sgd" in res.output
    assert not (run / "pruning.parquet").exists()


@pytest.mark.slow
def test_default_recipe_pruning_by_adam_beats_full_data_and_random(tmp_path):
    """On the default recipe (20% label noise, trained until it fits its labels): removing the
    lowest-valued 30% by adam, mostly the noisy examples, lifts test accuracy above the full-data
    model and random pruning, and removing the highest-valued 30% instead costs far more than random."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "digits-mlp.yaml"
    runs = tmp_path / "runs"
    assert cli("train", recipe, "--name", "d", "--runs-dir", runs, "-q").exit_code == 0
    for direction in ("low", "high"):
        res = cli("prune", "--frac", "0.3", "--by", "adam,random", "--seeds", "2", "--remove", direction,
                  "--runs-dir", runs, "-q")  # fmt: skip
        assert res.exit_code == 0, res.output
    df = pd.read_parquet(runs / "d" / "pruning.parquet")
    mean = df.groupby(["direction", "method"])["test_accuracy"].mean()
    noisy = df.groupby(["direction", "method"])["noisy_share_removed"].mean()
    assert mean["low", "adam"] > max(mean["low", "full"], mean["low", "random"]) + 0.02
    assert mean["high", "adam"] < mean["high", "random"] - 0.05
    assert noisy["low", "adam"] > 0.5 > 0.3 > noisy["low", "random"]
    assert noisy["high", "adam"] < 0.1


def test_a_run_whose_data_source_changed_is_refused(tmp_path):
    """A CSV whose feature columns changed since the run keeps its labels, so the example columns match;
    the digest of the training split in metrics.json does not."""
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(60, 4)), columns=list("abcd")).assign(y=rng.integers(0, 3, 60))
    table.to_csv(tmp_path / "d.csv", index=False)
    run = train_tiny(tmp_path, "csv", data={"source": f"csv:{tmp_path / 'd.csv'}", "target": "y"})
    assert json.loads((run / "metrics.json").read_text())["data_sha256"]
    table.assign(a=table["b"], b=table["a"]).to_csv(tmp_path / "d.csv", index=False)  # features swapped
    res = cli("prune", "--frac", "0.3", "--seeds", "1", "--runs-dir", run.parent)
    assert res.exit_code == 2, res.output
    assert "the data source changed since the run was trained" in " ".join(res.output.split())
    assert not (run / "pruning.parquet").exists()


@pytest.mark.parametrize("direction, bold", [("low", 0.92), ("high", 0.70)])
def test_the_table_highlights_the_accuracy_that_shows_the_values_right(direction, bold):
    """Removing the lowest-valued, the best accuracy; removing the highest-valued, the lowest one,
    never the full-data model's (which removed nothing) nor the oracle's."""
    from types import SimpleNamespace

    import torch
    from adamshap_cli.prune import pruning_table

    acc = {"full": 0.90, "adam": 0.92 if direction == "low" else 0.70, "random": 0.85, "oracle": 0.60}
    rows = [(m, 0.0 if m == "full" else 0.3, a) for m, a in acc.items()]
    summary = pd.DataFrame(
        {"method": [r[0] for r in rows], "frac": [r[1] for r in rows], "acc_mean": [r[2] for r in rows]}
    ).assign(acc_std=float("nan"), noisy_share=0.5)
    plan = SimpleNamespace(
        data=SimpleNamespace(n_train=100, is_noisy=torch.zeros(100, dtype=torch.bool)),
        fracs=[0.3],
        methods=["adam", "random", "oracle"],
        direction=direction,
        seeds=1,
    )
    cells = pruning_table(summary, plan).columns[1]._cells
    assert [c for c in cells if "bold green" in c] == [f"[bold green]{bold:.3f}[/]"]


@pytest.mark.parametrize("width", [80, 30])
def test_the_table_keeps_each_mean_and_std_on_one_line(width, monkeypatch):
    """The README's demo (three fractions, ten seeds, flipped labels): every "mean ± std" whole on its
    line, every method's name whole, the noisy share below each; on an 80-column terminal within it,
    on a narrower one at the table's own width (which the terminal wraps), never cut."""
    import io
    from types import SimpleNamespace

    import torch
    from adamshap_cli import common
    from adamshap_cli.prune import pruning_table
    from rich.console import Console

    methods, fracs = ["adam", "adam_fixed", "sgd", "random", "oracle"], [0.1, 0.2, 0.3]
    rows = [("full", 0.0)] + [(m, f) for m in methods for f in fracs]
    summary = pd.DataFrame(rows, columns=["method", "frac"]).assign(
        acc_mean=0.858, acc_std=0.018, noisy_share=0.94
    )
    noisy = torch.zeros(1297, dtype=torch.bool)
    noisy[:259] = True
    plan = SimpleNamespace(
        data=SimpleNamespace(n_train=1297, is_noisy=noisy),
        fracs=fracs,
        methods=methods,
        direction="low",
        seeds=10,
    )
    out = io.StringIO()
    monkeypatch.setattr(common, "console", Console(file=out, width=width))
    monkeypatch.setattr(common, "Console", lambda **kw: Console(file=out, **kw))  # the wider one, if any
    common.print_unbroken(pruning_table(summary, plan))
    lines = out.getvalue().splitlines()
    assert max(map(len, lines)) <= max(width, 65) and "…" not in out.getvalue()  # 65: its own width
    assert sum(line.count("0.858 ± 0.018") for line in lines) == (1 + len(methods)) * len(fracs)
    assert all(any(f"│ {m} " in line for line in lines) for m in methods)
    assert sum(line.count("94% noisy") for line in lines) == len(methods) * len(fracs)


def test_the_retrains_take_the_runs_thread_count_whatever_the_shell_sets(tmp_path, monkeypatch):
    """The thread count orders a product's additions: a run trained with one thread and pruned from a
    shell of four retrained seed 0 onto another trajectory (a GPT's test loss 4.99227270 became
    4.99227276). The retrains take the run's count, and the prune gives the shell's back."""
    import json

    import torch

    run = train_tiny(tmp_path, "threads")
    recorded = json.loads((run / "metrics.json").read_text())["torch_threads"]
    seen, real = [], pr.retrain
    monkeypatch.setattr(pr, "retrain", lambda *args: seen.append(torch.get_num_threads()) or real(*args))
    shell = recorded + 1
    before = torch.get_num_threads()
    torch.set_num_threads(shell)
    try:
        args = ["--frac", "0.2", "--by", "adam", "--runs-dir", tmp_path / "runs", "-q"]
        res = cli("prune", "--run", "threads", *args)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert res.exit_code == 0, res.output
    assert seen and set(seen) == {recorded} and after == shell


def test_a_text_runs_note_counts_the_scored_tokens_its_accuracy_is_over():
    """A language model's accuracy is next-token accuracy over the tokens it predicts: the note gave
    the binomial error over the texts instead (±0.135 for 6 texts where 52 tokens were scored)."""
    from types import SimpleNamespace

    import torch
    from adamshap_cli.prune import table_notes

    y_test = torch.full((6, 12), -100)
    y_test[:, :9] = 1  # 54 scored tokens in 6 texts
    y_test[0, :2] = -100  # ... 52
    data = SimpleNamespace(y_test=y_test, is_noisy=torch.zeros(20, dtype=torch.bool))
    recipe = SimpleNamespace(train=SimpleNamespace(seed=0))
    plan = SimpleNamespace(seeds=1, data=data, recipe=recipe, direction="low", methods=["full", "adam"])
    summary = pd.DataFrame({"method": ["full"], "acc_mean": [0.5]})
    notes = " ".join(table_notes(plan, summary).split())
    assert "next-token accuracy on the held-out test split (6 texts, 52 scored tokens" in notes
    se = math.sqrt(0.5 * 0.5 / 52)
    assert f"the 52 test tokens alone give each cell a standard error of about ±{se:.3f}" in notes
    assert "a lower bound" in notes
