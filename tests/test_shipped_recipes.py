"""The recipes in recipes/: each validates and builds (fast); each trains end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import cli

from adamshap_core.choices import HF_MODEL_KINDS, LANGUAGE_MODELS, transformers_missing
from adamshap_core.recipe import load_recipe
from adamshap_core.train import prepare

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _extra_installed(request):
    """A recipe of transformers' models is skipped where the optional extra is not installed."""
    path = request.node.callspec.params.get("path") if hasattr(request.node, "callspec") else None
    if path is not None and yaml.safe_load(path.read_text())["model"]["kind"] in HF_MODEL_KINDS:
        if transformers_missing():
            pytest.skip("needs the optional extra: pip install 'adamshap[hf]'")


def test_the_default_recipe_is_shipped():
    assert {"digits-mlp.yaml", "digits-cnn.yaml", "breast-cancer-mlp.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_and_builds(path):
    r = load_recipe(path)
    assert r.name == path.stem
    prep = prepare(r)
    try:
        assert prep.total_steps > 0 and prep.data.n_train > 0
        assert (prep.tracker is not None) == r.attribution.enabled
    finally:
        if prep.tracker is not None:
            prep.tracker.close()


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_end_to_end(tmp_path, path, monkeypatch):
    res = cli("train", path, "--quiet", "--runs-dir", tmp_path)
    assert res.exit_code == 0, res.output
    run = tmp_path / load_recipe(path).name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    if load_recipe(path).model.kind in LANGUAGE_MODELS:
        # a language model memorises its corpus: next-token accuracy on the training texts (the
        # held-out texts of builtin:facts restate facts in unseen wording, so they say little)
        assert metrics["train_accuracy"] > 0.8
    else:
        assert metrics["test_accuracy"] > 0.8
    values = pd.read_parquet(run / "values.parquet")
    if values["is_noisy"].any():
        low = values.nsmallest(len(values) // 5, "value_adam")
        assert low["is_noisy"].mean() > 0.4  # far above the 20% base rate
    from adamshap_cli.common import console

    monkeypatch.setattr(console, "width", 200)  # the listing's cells unwrapped
    listed = cli("runs", "--runs-dir", tmp_path)
    assert listed.exit_code == 0 and run.name in listed.output and "complete" in listed.output
    if load_recipe(path).model.kind in LANGUAGE_MODELS:  # the command a language-model run leads to
        queries = [values["text"].iloc[0], values["text"].iloc[1]]  # two of its own training texts
        res = cli(
            "attribute",
            "--run",
            run.name,
            "--runs-dir",
            tmp_path,
            "--quiet",
            *(a for q in queries for a in ("--query", q)),
            "--score",
            "text",
        )
        assert res.exit_code == 0, res.output
        ranks = pd.read_parquet(run / "attribution.parquet")
        assert ranks["query_id"].nunique() == 2 and {"rank_adam", "rank_bm25"} <= set(ranks.columns)
