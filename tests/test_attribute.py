"""``adamshap attribute``: end to end on a tiny corpus, the queries it accepts and refuses, the ranks."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import cli, tiny, tiny_gpt, write_recipe

from adamshap_core.attribute import bm25_scores, ranks, score_mask, source_rank
from adamshap_core.data.facts import LEVELS
from adamshap_core.errors import UserError

FACTS = tiny_gpt(
    name="facts",
    data={"facts": {"n_facts": 12, "seed": 0}},
    train={"epochs": 2},
    attribution={"methods": ["adam", "sgd"]},
)
METHODS = ["adam", "adam_fixed", "sgd", "bm25", "random"]
CORPUS = [
    "the river runs to the sea",
    "a fox sleeps under the old oak",
    "rain falls on the quiet town",
    "the miller grinds wheat into flour",
    "owls hunt mice at night",
    "the baker sells bread at dawn",
    "snow covers the northern hills",
    "ships leave the harbour at noon",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs folder with a tiny builtin:facts run, a jsonl corpus run and a tabular run."""
    root = tmp_path_factory.mktemp("attr")
    runs = root / "runs"
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": 500 + i, "text": t}) for i, t in enumerate(CORPUS)))
    text_run = {
        **FACTS,
        "name": "corpus",
        "data": {"source": f"jsonl:{corpus}", "val_size": 1, "test_size": 1},
    }
    for rec in (FACTS, text_run, tiny(name="tab")):
        res = cli("train", write_recipe(root, rec, f"{rec['name']}.yaml"), "--runs-dir", runs, "-q")
        assert res.exit_code == 0, res.output
    return runs


def attribute(runs, *args):
    return cli("attribute", "--runs-dir", runs, "-q", *args)


# ---------------------------------------------------------------- end to end


def test_builtin_queries_end_to_end(runs):
    res = attribute(runs, "--run", "facts", "--top", "3")
    assert res.exit_code == 0, res.output
    run = runs / "facts"
    df = pd.read_parquet(run / "attribution.parquet")
    n, Q = 12, 4 * 12
    assert len(df) == n * Q
    valued = ["adam", "adam_fixed", "sgd", "bm25"]
    assert list(df.columns) == ["query_id", "example_id"] + [
        f"{k}_{m}" for m in valued for k in ("value", "rank")
    ] + ["is_source"]
    for m in valued:  # every query ranks every training text once, 1 = highest value
        assert (
            df.groupby("query_id")[f"rank_{m}"].apply(sorted) == pd.Series([list(range(1, n + 1))] * Q)
        ).all()
        top = df.loc[df[f"rank_{m}"] == 1].set_index("query_id")[f"value_{m}"]
        assert (top == df.groupby("query_id")[f"value_{m}"].max()).all()
    assert df["is_source"].sum() == Q
    bench = pd.read_parquet(run / "attribution_benchmark.parquet")
    assert list(bench["level"].unique()) == list(LEVELS)
    assert list(bench["method"].unique()) == METHODS
    assert (bench["n_queries"] == n).all() and bench["mean_rank"].between(1, n).all()
    assert bench.loc[bench["method"] == "random", "mean_rank"].eq((n + 1) / 2).all()
    # bm25 finds the exact text: it shares every word with its source
    exact_bm25 = bench[(bench["level"] == "exact") & (bench["method"] == "bm25")].iloc[0]
    assert exact_bm25["recall_at_1"] == 1.0
    summary = json.loads((run / "attribution.json").read_text())
    assert summary["replay_matches_run"] is True and summary["n_queries"] == Q
    assert "rank of the true source" in res.output and "replay matched the run bit for bit" in res.output


def test_typed_queries_with_unseen_words(runs):
    res = attribute(
        runs, "--run", "facts", "--query", "who plays the zither", "--query", "the pet of", "--top", "2"
    )
    assert res.exit_code == 0, res.output
    assert "<unk>" in res.output and "zither" in res.output
    q = pd.read_parquet(runs / "facts" / "attribution_queries.parquet")
    assert q["query_id"].tolist() == [0, 1] and q["n_unknown_words"].tolist() == [2, 0]
    assert not (runs / "facts" / "attribution_benchmark.parquet").exists()  # no sources, no (stale) table
    assert q["source_id"].isna().all()


def test_one_query_is_counted_as_one(runs):
    res = cli(
        "attribute", "--runs-dir", runs, "--run", "facts", "--query", "who plays the zither", "--top", "1"
    )
    assert res.exit_code == 0, res.output
    said = " ".join(res.stderr.split())
    assert "facts: 1 query against 12 training texts" in said
    assert "never had, read as <unk>, in 1 of 1 query: who, zither" in said


def test_the_latest_run_refused_names_the_latest_run_that_attribute_can_replay(runs, tmp_path):
    """With no --run, the latest run (the tabular one) is refused; the message names the latest
    language-model run and the command for it, or says that there is none."""
    import shutil

    res = cli("attribute", "--runs-dir", runs, "-q")
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "run 'tab' trained a mlp" in said
    assert (
        f"the latest language-model run is 'corpus': adamshap attribute --run corpus --runs-dir {runs}"
        in said
    )
    named = " ".join(attribute(runs, "--run", "tab").output.split())
    assert "needs a language-model run" in named and "latest" not in named  # a run asked for by name
    only_tabular = tmp_path / "runs"
    shutil.copytree(runs / "tab", only_tabular / "tab")
    res = cli("attribute", "--runs-dir", only_tabular, "-q")
    assert res.exit_code == 2 and "is a language-model run; train one with" in " ".join(res.output.split())


def test_a_queries_file_with_ids_levels_and_sources(runs, tmp_path):
    p = tmp_path / "q.jsonl"
    lines = [
        {"id": "first", "text": "the pet of somebody", "level": "mine", "source_id": 3},
        {"id": "second", "text": "plays the piano", "level": "mine", "source_id": 1},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines))
    res = attribute(runs, "--run", "facts", "--queries", p, "--methods", "sgd,bm25", "--show", "0")
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(runs / "facts" / "attribution.parquet")
    assert set(df["query_id"]) == {"first", "second"}
    assert [c for c in df.columns if c.startswith("value_")] == ["value_sgd", "value_bm25"]
    bench = pd.read_parquet(runs / "facts" / "attribution_benchmark.parquet")
    assert bench["level"].tolist() == ["mine", "mine"] and bench["method"].tolist() == ["sgd", "bm25"]
    source = df["query_id"].map({"first": 3, "second": 1})  # each row: is it its query's source?
    assert (df["is_source"] == (df["example_id"] == source)).all() and df["is_source"].sum() == 2


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--query", "the pet of", "--query", " "], "query 1 is empty"),
        (["--query", "the pet of", "--queries", "builtin"], "not both"),
        (["--query", " ".join(["pet"] * 40)], "more than the model's context"),
        (["--methods", "adam,lasso"], "unknown method"),
        (["--methods", "random"], "--methods random alone ranks nothing"),
        (["--methods", ""], "--methods names no method"),
        (["--run", "tab"], "needs a language-model run"),
        (["--run", "facts", "--queries", "missing.jsonl"], "does not exist"),
    ],
)
def test_bad_queries_and_options_exit_2(runs, args, fragment):
    if "--run" not in args:
        args = ["--run", "facts", *args]
    res = attribute(runs, *args)
    assert res.exit_code == 2, res.output
    assert fragment in " ".join(res.output.split()), res.output


def test_a_source_id_must_be_a_training_example_and_is_checked_before_the_replay(runs, tmp_path):
    from adamshap_core import runio
    from adamshap_core.attribute import plan

    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"text": "the pet of", "source_id": 999}) + "\n")
    res = attribute(runs, "--run", "facts", "--queries", p)
    assert res.exit_code == 2 and "source_id 999" in res.output
    with pytest.raises(UserError, match="source_id 999, which is not a training example"):
        plan(runio.open_run(runs, "facts"), queries_file=str(p))  # the plan, before any replay


def test_query_ids_must_differ_as_the_tables_write_them(tmp_path):
    """The tables write query ids as text, so 7 and "7" would be one query_id there."""
    from adamshap_core.attribute import queries_from_file

    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"id": "7", "text": "a b"}) + "\n" + json.dumps({"id": 7, "text": "c"}) + "\n")
    with pytest.raises(UserError, match="lines 1 and 2 of .* share the id '7'"):
        queries_from_file(p)


def test_a_query_of_a_file_is_named_by_its_line(runs, tmp_path):
    p = tmp_path / "q.jsonl"
    long = " ".join(["pet"] * 40)
    p.write_text(json.dumps({"id": "a", "text": "the pet of"}) + "\n" + json.dumps({"id": "b", "text": long}))
    res = attribute(runs, "--run", "facts", "--queries", p)
    assert res.exit_code == 2, res.output
    assert f"query 'b' (line 2 of {p}) is 41 tokens long" in " ".join(res.output.split())
    # scored by its answer alone, it is still as long: its other words are the model's input
    p.write_text(json.dumps({"id": "c", "text": long + " cat", "answer": "cat"}))
    res = attribute(runs, "--run", "facts", "--queries", p)
    assert res.exit_code == 2, res.output
    assert f"query 'c' (line 1 of {p}) is 42 tokens long" in " ".join(res.output.split())


def test_a_gpt_run_whose_recipe_now_loads_data_other_than_text_is_refused(runs, tmp_path):
    """A gpt trains on text only, so such a recipe was edited after the run: a clear error, not a
    crash on the tokenizer a tabular dataset lacks."""
    import shutil

    import yaml

    edited = tmp_path / "runs"
    shutil.copytree(runs / "facts", edited / "facts")
    path = edited / "facts" / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**recipe, "data": {"source": "sklearn:digits"}}, sort_keys=False))
    res = attribute(edited, "--run", "facts")
    assert res.exit_code == 2, res.output
    assert "'sklearn:digits' is not text" in " ".join(res.output.split()), res.output


def test_replay_values_needs_a_query(runs):
    """No query to value against is an error that says so (no replay runs at all)."""
    from adamshap_core import attribute as at
    from adamshap_core import runio

    plan = at.plan(runio.open_run(runs, "facts"))
    none_x, none_y = plan.queries_x[:0], plan.queries_y[:0]
    with pytest.raises(ValueError, match="no queries"):
        at.replay_values(plan.recipe, plan.data, none_x, none_y, plan.valued)


def test_replays_that_end_with_other_parameters_say_so(runs, monkeypatch):
    """Replays in chunks whose parameters end differently (as a nondeterministic one's would) are
    reported as differing, and never as matching the run."""
    from adamshap_core import attribute as at
    from adamshap_core import runio
    from adamshap_core import train as tr

    plan = at.plan(runio.open_run(runs, "facts"))
    real_run, calls = tr.run, []

    def run(*args, **kwargs):
        result = real_run(*args, **kwargs)
        calls.append(1)
        result.metrics["params_sha256"] = f"digest-{len(calls)}"
        return result

    monkeypatch.setattr(tr, "run", run)
    x, y = plan.queries_x[:2], plan.queries_y[:2]
    replay = at.replay_values(plan.recipe, plan.data, x, y, ["adam"], chunk=1, expected_sha256="digest-1")
    assert replay.replays == 2 and len(calls) == 2
    assert replay.params_sha256 == "differs between replays" and replay.matches_run is False


# ---------------------------------------------------------------- ranks and baselines


def test_ranks_put_the_highest_value_first_and_ties_in_row_order():
    v = np.array([[0.5, 1.0], [2.0, 1.0], [-1.0, 3.0]])
    assert ranks(v).tolist() == [[2, 2], [1, 3], [3, 1]]


def test_source_rank_shares_ties():
    s = np.array([3.0, 1.0, 1.0, 1.0, 0.0])
    assert source_rank(s, 0) == 1.0
    assert source_rank(s, 2) == 3.0  # ranks 2, 3, 4 shared
    assert source_rank(s, 4) == 5.0


def test_bm25_prefers_the_text_sharing_the_rare_words():
    texts = ["the cat sat on the mat", "the dog sat on the log", "a bird flew"]
    s = bm25_scores(texts, ["where did the dog sit ?", "bird"])
    assert s.shape == (3, 2) and s[:, 0].argmax() == 1 and s[:, 1].argmax() == 2
    assert not bm25_scores(["a , b .", "c d", "e f"], [", ."]).any()  # punctuation is no evidence


def test_score_mask_keeps_the_answer_targets():
    # inputs <bos> the job of x is tailor . ; target j predicts word j
    assert score_mask("the job of x is tailor .", "tailor", 8).nonzero().flatten().tolist() == [5]
    assert score_mask("a b a b c", "a b", 6).nonzero().flatten().tolist() == [2, 3]  # the last occurrence
    with pytest.raises(UserError, match="does not occur in its text"):
        score_mask("the job of x", "tailor", 5, "query 3")


def test_answer_or_whole_text_scoring(runs, tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"text": "the pet of somebody is a cat .", "answer": "cat"}) + "\n")
    values = {}
    for score in ("answer", "text"):
        res = attribute(runs, "--run", "facts", "--queries", p, "--methods", "sgd", "--score", score)
        assert res.exit_code == 0, res.output
        values[score] = pd.read_parquet(runs / "facts" / "attribution.parquet")["value_sgd"].to_numpy()
        q = pd.read_parquet(runs / "facts" / "attribution_queries.parquet")
        assert q["scored"].tolist() == [score] and q["answer"].tolist() == ["cat"]
    assert not np.allclose(values["answer"], values["text"])
    p.write_text(json.dumps({"text": "the pet of somebody", "answer": "cat"}) + "\n")
    res = attribute(runs, "--run", "facts", "--queries", p)
    assert res.exit_code == 2 and "does not occur in its text" in " ".join(res.output.split())


def test_a_jsonl_corpus_run_keeps_its_ids(runs):
    res = attribute(runs, "--run", "corpus", "--query", "who sells bread ?", "--top", "2")
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(runs / "corpus" / "attribution.parquet")
    assert set(df["example_id"]) <= set(range(500, 508)) and df["example_id"].nunique() == 6
    assert not (runs / "corpus" / "attribution_benchmark.parquet").exists()
    for args, fragment in [((), "no queries"), (("--queries", "builtin"), "no built-in queries")]:
        res = attribute(runs, "--run", "corpus", *args)
        assert res.exit_code == 2 and fragment in " ".join(res.output.split()), res.output


def test_the_default_chunk_keeps_one_replays_matrices_within_the_budget(runs, monkeypatch):
    """By default a replay values at most 256 queries, fewer where methods × queries × parameters
    floats of M would pass the budget; a given --chunk is taken as it is."""
    from adamshap_core import attribute as at
    from adamshap_core import runio
    from adamshap_core.models import build_model

    folder = runio.open_run(runs, "facts")
    rng = torch.get_rng_state()
    plan = at.plan(folder)
    assert torch.equal(torch.get_rng_state(), rng)  # sizing the model drew no random numbers
    assert plan.chunk == at.DEFAULT_CHUNK  # a tiny model: far within the budget
    n_params = sum(p.numel() for p in build_model(plan.recipe.model, plan.data).parameters())
    monkeypatch.setattr(at, "M_BUDGET", 7 * 3 * n_params + 1)  # room for 7 queries of 3 methods
    assert at.plan(folder).chunk == 7
    assert at.plan(folder, methods=["adam"]).chunk == 21
    assert at.plan(folder, methods=["bm25"]).chunk == at.DEFAULT_CHUNK  # no matrices at all
    monkeypatch.setattr(at, "M_BUDGET", 1)
    assert at.plan(folder).chunk == 1
    assert at.plan(folder, chunk=5).chunk == 5


def test_attribute_says_when_it_replaces_an_earlier_attributes_results(runs):
    args = ("--run", "corpus", "--query", "owls at night", "--methods", "bm25", "--show", "0")
    assert attribute(runs, *args).exit_code == 0
    res = attribute(runs, *args)
    assert res.exit_code == 0, res.output
    assert "(replacing the earlier attribution's results of 20" in " ".join(res.stdout.split())
