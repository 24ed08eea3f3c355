"""Output integrity: every table a run writes opens in pandas and matches the run-folder schema,
metrics.json carries the schema version, a NaN value or malformed table is never written, and
``runio.open_complete_run`` / ``RunFolder.require_complete`` refuse what readers must not read."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from helpers import cli, tiny, write_recipe

from adamshap_core import run_tables, runio
from adamshap_core.errors import UserError

GPT_RECIPE = tiny(
    name="words",
    data={"source": "text:corpus.txt", "val_size": 2, "test_size": 2, "label_noise": 0},
    model={"kind": "gpt", "n_layer": 1, "d_model": 8, "n_head": 2},
    train={"epochs": 1, "batch_size": 4},
)
CORPUS = "\n".join(f"the {a} cat sat on mat {b}" for a, b in zip("abcdefghijkl", "mnopqrstuvwx", strict=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A complete classification run and a complete language-model run (in-process CLI)."""
    root = tmp_path_factory.mktemp("integrity")
    (root / "corpus.txt").write_text(CORPUS + "\n")
    for recipe in (tiny(train={"epochs": 2}), GPT_RECIPE):
        res = cli(
            "train", write_recipe(root, recipe, f"{recipe['name']}.yaml"), "-q", "--runs-dir", root / "runs"
        )
        assert res.exit_code == 0, res.output
    return root / "runs"


@pytest.mark.parametrize("name", ["tiny", "words"])
def test_every_table_opens_and_matches_its_schema(runs, name):
    folder = runio.RunFolder(runs / name)
    metrics = json.loads(folder.file("metrics.json").read_text())
    assert metrics["schema_version"] == run_tables.SCHEMA_VERSION and metrics["status"] == "complete"
    assert len(metrics["params_sha256"]) == 64
    tables = sorted(p.name for p in folder.path.glob("*.parquet"))
    assert tables == ["steps.parquet", "steps_values.parquet", "values.parquet"]
    for table in tables:
        df = pd.read_parquet(folder.file(table))
        assert run_tables.table_problems(table, df, metrics["methods"]) == [], table
    values, steps = folder.values(), folder.steps()
    assert len(values) == metrics["n_train"] and values["example_id"].is_unique
    assert steps["step"].tolist() == list(range(1, metrics["steps"] + 1))
    assert (values["n_steps"] == folder.recipe().train.epochs).all()  # every example once per epoch
    assert folder.require_complete() is folder


def test_text_runs_name_texts_instead_of_labels(runs):
    values = runio.RunFolder(runs / "words").values()
    assert "text" in values.columns and "label" not in values.columns
    assert (runs / "words" / "tokenizer.json").is_file()


def test_open_complete_run_by_name_path_and_latest(runs):
    assert runio.open_complete_run(runs, "tiny").name == "tiny"
    assert runio.open_complete_run(runs, str(runs / "words")).name == "words"
    assert runio.open_complete_run(runs).name == "words"  # the latest


# --------------------------------------------------------------------------- what readers must refuse


@pytest.fixture
def run_copy(runs, tmp_path):
    """A private copy of the complete classification run, to damage."""
    import shutil

    shutil.copytree(runs / "tiny", tmp_path / "tiny")
    return runio.RunFolder(tmp_path / "tiny")


def edit_metrics(folder: runio.RunFolder, **changes) -> None:
    metrics = json.loads(folder.file("metrics.json").read_text())
    folder.file("metrics.json").write_text(json.dumps({**metrics, **changes}))


def refusal(folder: runio.RunFolder) -> str:
    with pytest.raises(UserError) as info:
        runio.open_complete_run(folder.path.parent, folder.name)
    return " ".join(str(info.value).split())


def test_refuses_an_unknown_schema_version(run_copy):
    edit_metrics(run_copy, schema_version=99)
    assert "schema version 99" in refusal(run_copy)
    edit_metrics(run_copy, schema_version=None)
    assert "schema version None" in refusal(run_copy)


def test_the_latest_run_when_incomplete_is_refused_saying_how_to_pick_another(run_copy):
    edit_metrics(run_copy, status="incomplete")
    with pytest.raises(UserError) as info:
        runio.open_complete_run(run_copy.path.parent)  # no name: the latest run, this one
    said = " ".join(str(info.value).split())
    assert "run 'tiny' (the latest run; --run NAME picks another" in said and "is incomplete" in said
    assert "the latest run" not in refusal(run_copy)  # named: nothing to pick


def test_refuses_an_incomplete_run_and_says_how_to_finish_it(run_copy, monkeypatch):
    edit_metrics(run_copy, status="incomplete", error="training interrupted after step 3 of 14")
    before = sorted(os.listdir(run_copy.path)), run_copy.path.stat().st_mtime_ns
    msg = refusal(run_copy)
    assert (sorted(os.listdir(run_copy.path)), run_copy.path.stat().st_mtime_ns) == before  # read only
    assert "is incomplete" in msg and "interrupted after step 3 of 14. It has no checkpoint" in msg
    assert f"train it again with: {runio.restart_command(run_copy.path)}" in msg
    edit_metrics(run_copy, error=None)  # killed (kill -9): no reason recorded, and no sentence starts
    assert "is incomplete: it has no checkpoint" in refusal(run_copy)
    run_copy.file(runio.CHECKPOINT_FILE).write_bytes(b"")
    assert "is incomplete: finish it with `adamshap train --resume tiny" in refusal(run_copy)
    edit_metrics(run_copy, error="training interrupted after step 3 of 14")
    # the command names the runs folder where the run is not in the default one
    assert f"`adamshap train --resume tiny --runs-dir {run_copy.path.parent}` first" in refusal(run_copy)
    monkeypatch.setenv("ADAMSHAP_RUNS", str(run_copy.path.parent))
    assert "`adamshap train --resume tiny` first" in refusal(run_copy)
    from adamshap_core.locks import run_lock

    with run_lock(run_copy.path):  # a train of it still running: not "finish it with --resume"
        assert "is being trained by another process right now; wait for it to finish" in refusal(run_copy)


def test_refuses_a_diverged_run_with_partial_tables(tmp_path):
    res = cli(
        "train",
        write_recipe(tmp_path, tiny(optim={"name": "sgd", "lr": 1e30}, train={"epochs": 3})),
        "-q",
        "--runs-dir",
        tmp_path / "runs",
    )
    assert res.exit_code == 2
    folder = runio.RunFolder(tmp_path / "runs" / "tiny")
    assert folder.file("values.parquet").is_file()  # kept for inspection, but not for readers
    assert "training diverged at step 2" in refusal(folder)


def test_refuses_missing_or_unreadable_metrics(run_copy):
    run_copy.file("metrics.json").write_text("{not json")
    assert "metrics.json cannot be read" in refusal(run_copy)
    os.unlink(run_copy.file("metrics.json"))
    assert "has no metrics.json" in refusal(run_copy)


def test_refuses_a_complete_run_missing_a_table(run_copy):
    os.unlink(run_copy.file("steps.parquet"))
    assert "lacks steps.parquet" in refusal(run_copy)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda df: df.drop(columns="n_steps"), "column `n_steps` is missing"),
        (lambda df: df.drop(columns="value_sgd"), "column `value_sgd` is missing"),
        # text's dtype: str from pandas 3 on, object before
        (lambda df: df.assign(value_adam=df["value_adam"].astype(str)), f"has type {pd.Series(['']).dtype}"),
        (lambda df: df.assign(example_id=df["example_id"].astype(float)), "`example_id` has type float64"),
    ],
    ids=["no-n_steps", "no-method-column", "text-values", "float-ids"],
)
def test_refuses_a_table_that_breaks_its_schema(run_copy, damage, says):
    df = damage(pd.read_parquet(run_copy.file("values.parquet")))
    df.to_parquet(run_copy.file("values.parquet"), index=False)  # behind the schema check's back
    msg = refusal(run_copy)
    assert "values.parquet does not match the run-folder schema" in msg and says in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_refuses_a_complete_run_whose_values_were_changed_to_non_finite(run_copy, bad):
    """compare crashed in scikit-learn's AUROC on such a file; every reader now refuses it up front."""
    df = pd.read_parquet(run_copy.file("values.parquet"))
    df.loc[3, "value_sgd"] = bad
    df.to_parquet(run_copy.file("values.parquet"), index=False)  # behind the writer's check
    assert "value_sgd of values.parquet holds 1 non-finite value(s), which training never writes" in (
        refusal(run_copy)
    )
    res = cli("compare", "--run", run_copy.path, "--no-cumulative", "--steps", "1")
    assert res.exit_code == 2 and "non-finite" in res.output


def test_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "junk").mkdir()
    assert "has no metrics.json" in refusal(runio.RunFolder(tmp_path / "junk"))


# --------------------------------------------------------------------------- what writers must refuse


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_is_never_written(run_copy, bad):
    before = run_copy.file("values.parquet").read_bytes()
    df = pd.read_parquet(run_copy.file("values.parquet"))
    df.loc[3, "value_adam"] = bad
    with pytest.raises(ValueError, match="value_adam` holds 1 NaN or infinite"):
        run_copy.write_parquet("values.parquet", df)
    assert run_copy.file("values.parquet").read_bytes() == before
    assert not [p for p in os.listdir(run_copy.path) if p.endswith(".tmp")]


def test_duplicate_example_ids_are_never_written(run_copy):
    df = pd.read_parquet(run_copy.file("values.parquet"))
    df.loc[1, "example_id"] = df.loc[0, "example_id"]
    with pytest.raises(ValueError, match="repeat the key"):
        run_copy.write_parquet("values.parquet", df)


def test_tables_without_a_schema_are_written_as_given(tmp_path):
    folder = runio.RunFolder(tmp_path)
    folder.write_parquet("compare.parquet", pd.DataFrame({"x": [np.nan]}))
    assert pd.read_parquet(folder.file("compare.parquet"))["x"].isna().all()
