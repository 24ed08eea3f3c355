"""Source attribution: which training texts taught the model what a query says (README: Language
models and source attribution).

``attribute`` replays a finished language-model run with the queries as validation
targets. At every step each example of the batch is valued against every query
separately: the tracker's ``per_target`` mode gives values [B, Q] in one pass per step
(the engine stacks the methods × queries matrices M into one GEMM per layer). Summed
over the run, that is each training text's value for each query. The replay *is* the
run: the same recipe, seed, data order and updates (valuation never changes a step);
this is checked, the replay's final parameters must equal the run's bit for bit
(``params_sha256`` in metrics.json), and a mismatch is reported.

A query's validation loss is the mean next-token loss over its scored tokens, the loss the
model trained with; its words go through the run's tokenizer (unseen words → ``<unk>``).
Where a query names an ``answer`` (the built-in ones do: the fact-bearing word), only the
answer's tokens are scored, given the words before them ("which texts taught the model to
say *tailor* here"); otherwise, or with ``score="text"``, every token of the query is. The
whole-text loss of a restated fact is dominated by tokens that carry no fact: the phrasing's
function words and the prediction of the entity's name from the words before it.

Baselines: ``bm25`` scores the training texts against the query's words (rank-bm25's
BM25Okapi over the same lower-cased words, punctuation dropped); ``random`` is the
expectation for a uniformly random ranking (mean rank (N+1)/2, recall@k = k/N), exact
rather than sampled. Where queries carry ``source_id`` the benchmark reports, per level
and method, the mean rank of the true source (rank 1 = highest value; ties share their
average rank), recall@1 and recall@10.

Cost: per training step, the step itself, the Q per-query validation gradients
(``torch.func.vmap``, 64 queries per call), and the value contraction, which for a
Linear layer is ≈ 2·B·T·d_in·d_out·K flops with K = methods × Q (T× the cost of
K per-example-gradient dot products, the price of never building them), and K × (number
of parameters) floats for the matrices M. Queries are valued ``chunk`` at a time (by
default 256, fewer where their M would pass ``M_BUDGET``); each further chunk replays
the run again, so memory stays bounded and the time grows with Q.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .choices import LANGUAGE_MODELS
from .data import TextDataset, load_dataset
from .data.facts import LEVELS
from .data.text import check_ids, read_jsonl, record_text
from .errors import UserError, listed
from .models import build_model, context_length
from .precond import METHODS
from .recipe import Recipe
from .run_tables import value_column
from .runio import (
    RunFolder,
    atomic_write_json,
    atomic_write_parquet,
    list_runs,
    runs_dir_option,
    writing_results,
)
from .threads import intra_op_threads, recorded_threads
from .tokenizer import IGNORE, WordTokenizer, split_words

BASELINES = ("bm25", "random")
ALL_METHODS = (*METHODS, *BASELINES)
RECALL_AT = (1, 10)
DEFAULT_CHUNK = 256  # queries per replay, unless their matrices M would pass M_BUDGET
M_BUDGET = 1 << 28  # floats the matrices M of one replay may take (1 GiB in float32): methods × queries × N
SCORES = ("answer", "text")  # what a query's utility scores: its answer words, or its whole text


# --------------------------------------------------------------------------- queries


@dataclass
class Queries:
    """The queries of one attribution: ids, texts, and (optionally) level, true source and answer."""

    ids: list  # query_id: the `id` field of a query file, else the 0-based position
    texts: list[str]
    levels: list[str]  # "" where not given
    source_ids: list[int | None]
    answers: list[str | None]  # the words whose loss is the utility (see ``score_mask``); None: all
    # where each query was read ("line 3 of q.jsonl"), for a query file
    places: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def has_sources(self) -> bool:
        return any(s is not None for s in self.source_ids)

    def where(self, i: int) -> str:
        query = f"query {self.ids[i]!r}" if isinstance(self.ids[i], str) else f"query {self.ids[i]}"
        return f"{query} ({self.places[i]})" if self.places else query


def queries_from_texts(texts: Sequence[str]) -> Queries:
    """Queries typed on the command line: ids are their positions."""
    n = len(texts)
    return Queries(list(range(n)), list(texts), [""] * n, [None] * n, [None] * n)


def queries_from_file(path: str | Path) -> Queries:
    """A JSON-lines file: ``text``, optional ``id`` (int or string), ``level``, ``source_id``, ``answer``."""
    path = str(path)
    what = "--queries"
    records = read_jsonl(path, what)
    check_ids(records, path, what, kinds=(int, str))
    q = Queries([], [], [], [], [])
    for pos, (row, rec) in enumerate(records):
        name = f"line {row + 1} of {path}"
        q.places.append(name)
        q.texts.append(record_text(rec, name, what))
        q.ids.append(rec.get("id", pos))
        level = rec.get("level", "")
        if not isinstance(level, str):
            raise UserError(f"{what}: {name} has `level` {level!r}; expected a string such as 'paraphrase'.")
        q.levels.append(level)
        source = rec.get("source_id")
        if source is not None and (isinstance(source, bool) or not isinstance(source, int)):
            raise UserError(f"{what}: {name} has `source_id` {source!r}; expected the integer example_id.")
        q.source_ids.append(source)
        answer = rec.get("answer")
        if answer is not None and not (isinstance(answer, str) and answer.strip()):
            raise UserError(f"{what}: {name} has `answer` {answer!r}; expected some words of its text.")
        q.answers.append(answer)
    return q


def builtin_queries(data: TextDataset, source: str) -> Queries:
    if not data.queries:
        raise UserError(
            f"--queries builtin: the run trained on {source!r}, which has no built-in queries "
            "(only builtin:facts does); give --query TEXT or --queries FILE.jsonl."
        )
    qs = data.queries
    return Queries(
        [q.id for q in qs],
        [q.text for q in qs],
        [q.level for q in qs],
        [q.source_id for q in qs],
        [q.answer for q in qs],
    )


def encode_queries(
    queries: Queries, tok: WordTokenizer, context: int, score: str = "answer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded inputs and targets [Q, T]; an empty query or one longer than the context is an error.

    ``score``: "answer" keeps only the targets of a query's answer words (where it has an
    answer), "text" keeps every target, so the utility is the whole query's loss.
    """
    if score not in SCORES:
        raise UserError(f"--score is {score!r}; expected one of {', '.join(SCORES)}.")
    x, y = tok.batch(queries.texts, [queries.where(i) for i in range(len(queries))])
    lengths = (y >= 0).sum(dim=1)  # every token, before the answer's mask leaves some unscored
    if score == "answer":
        for i, answer in enumerate(queries.answers):
            if answer is not None:
                y[i, ~score_mask(queries.texts[i], answer, y.shape[1], queries.where(i))] = IGNORE
    too_long = [i for i in range(len(queries)) if int(lengths[i]) > context]
    if too_long:
        i = too_long[0]
        raise UserError(
            f"{queries.where(i)} is {int(lengths[i])} tokens long (with <bos>), more than the model's "
            f"context of {context} (model.block_size); expected a shorter query."
        )
    return x, y


def score_mask(text: str, answer: str, length: int, where: str = "the query") -> torch.Tensor:
    """Which targets of ``text`` predict the words of ``answer`` (its last occurrence in the text).

    Target j predicts word j (the inputs are <bos> w0 w1 ...), so the answer's targets are
    the positions of its words; the utility is then the loss of the answer given the words
    before it, the usual way to ask a language model for a fact.
    """
    words, ans = split_words(text), split_words(answer)
    starts = [j for j in range(len(words) - len(ans) + 1) if ans and words[j : j + len(ans)] == ans]
    if not starts:
        raise UserError(
            f"{where}: its answer {answer!r} does not occur in its text {text!r}; expected some of its words."
        )
    mask = torch.zeros(length, dtype=torch.bool)
    mask[starts[-1] : starts[-1] + len(ans)] = True
    return mask


# --------------------------------------------------------------------------- the replay


class QueryValues:
    """Stands in for the run's tracker during a replay (a ``train.StepValuer``).

    Values every batch example against each query (values [B, Q]), adds them up per
    training example, and hands the training loop their mean over the queries (the
    value against the mean query loss), so the loop itself needs no change.
    """

    fuse_validation = False  # the replay never fuses: its steps must equal plain training's bit for bit
    fusion_blocked: str | None = None
    rows_blocked: str | None = None  # (a property of the tracker)

    def __init__(self, tracker, queries_x: torch.Tensor, queries_y: torch.Tensor, n_train: int):
        self.tracker = tracker
        self.methods = list(tracker.methods)
        tracker.set_validation(queries_x, queries_y, per_target=True)
        self.sums = {m: np.zeros((n_train, len(queries_y))) for m in self.methods}
        self._batch: np.ndarray | None = None

    def observe(self, batch: torch.Tensor) -> None:
        """Called before each step with the positions of its examples."""
        self._batch = batch.numpy()

    def step(self, inputs, targets):
        res = self.tracker.step(inputs, targets)
        for m in self.methods:
            self.sums[m][self._batch] += res.values[m].detach().to("cpu", torch.float64).numpy()
        return dataclasses.replace(res, values={m: v.mean(dim=1) for m, v in res.values.items()})

    def set_validation(self, *args, **kwargs) -> None:
        self.tracker.set_validation(*args, **kwargs)

    def state_dict(self) -> dict:
        return {
            "tracker": self.tracker.state_dict(),
            "sums": {m: torch.from_numpy(s) for m, s in self.sums.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.sums = {m: s.numpy().copy() for m, s in state["sums"].items()}

    def close(self) -> None:
        self.tracker.close()


@dataclass
class QueryReplay:
    """What replaying a run against the queries gives: each training text's value per query."""

    values: dict[str, np.ndarray]  # method -> [n_train, Q]
    model: torch.nn.Module  # the replayed run's final model
    params_sha256: str
    matches_run: bool | None  # None: the run recorded no digest
    replays: int


def replay_recipe(recipe: Recipe, methods: Sequence[str]) -> Recipe:
    """The run's recipe with exact attribution on for ``methods`` (attribution never changes a step).

    The validation rows are never fused into the batch here: that would change the update's
    rounding with the queries, and the replay must walk plain training's trajectory bit for bit.
    """
    update = {"enabled": True, "methods": list(methods), "record_steps": 0, "fast": None}
    attribution = recipe.attribution.model_copy(update={**update, "fuse_validation": False})
    return recipe.model_copy(update={"attribution": attribution})


def replay_values(
    recipe: Recipe,
    data: TextDataset,
    queries_x: torch.Tensor,
    queries_y: torch.Tensor,
    methods: Sequence[str],
    *,
    chunk: int = DEFAULT_CHUNK,
    expected_sha256: str | None = None,
    threads: int | None = None,
    on_step: Callable[[], None] | None = None,
) -> QueryReplay:
    """Each training example's value for each query, summed over the replayed run; ``threads``: the
    run's intra-op thread count, which the replay takes (None: as they are; ``threads.py``)."""
    from .train import prepare, run

    if len(queries_y) == 0:
        raise ValueError("no queries to value the training examples for: expected at least one")
    rec = replay_recipe(recipe, methods)
    Q, n = len(queries_y), data.n_train
    values = {m: np.zeros((n, Q)) for m in methods}
    digests, result = set(), None
    for start in range(0, Q, chunk):
        part = slice(start, min(start + chunk, Q))
        prep = prepare(rec, data=data, attribution=True)
        valuer = QueryValues(
            prep.tracker, queries_x[part].to(prep.device), queries_y[part].to(prep.device), n
        )
        prep.tracker = valuer

        def observe(step, batch, ctx, valuer=valuer):
            valuer.observe(batch)
            if on_step is not None:
                on_step()

        try:
            with intra_op_threads(threads):
                result = run(prep, on_step=observe, record=[], splits=())  # its digest is all it reads
        finally:
            valuer.close()
        for m in methods:
            values[m][:, part] = valuer.sums[m]
        digests.add(result.metrics["params_sha256"])
    assert result is not None  # Q >= 1: at least one replay ran
    digest = digests.pop() if len(digests) == 1 else "differs between replays"
    matches = None if expected_sha256 is None else digest == expected_sha256
    return QueryReplay(values, result.model, digest, matches, -(-Q // chunk))


# --------------------------------------------------------------------------- scores and ranks


def bm25_scores(train_texts: Sequence[str], query_texts: Sequence[str]) -> np.ndarray:
    """BM25Okapi score of every training text for every query: [n_train, Q]."""
    from rank_bm25 import BM25Okapi

    def words(text: str) -> list[str]:
        return [w for w in split_words(text) if w[0].isalnum() or w[0] == "_"]

    bm25 = BM25Okapi([words(t) for t in train_texts])
    return np.stack([bm25.get_scores(words(q)) for q in query_texts], axis=1).astype(np.float64)


def ranks(values: np.ndarray) -> np.ndarray:
    """Per column, the rank of each row: 1 = highest value; ties in row order. int64 [n, Q]."""
    order = np.argsort(-values, axis=0, kind="stable")
    out = np.empty_like(order)
    np.put_along_axis(out, order, np.arange(1, len(values) + 1)[:, None].repeat(values.shape[1], 1), axis=0)
    return out.astype(np.int64)


def source_rank(scores: np.ndarray, source: int) -> float:
    """Rank of row ``source`` in ``scores`` (1 = highest); tied rows share their average rank."""
    s = scores[source]
    return 1.0 + float((scores > s).sum()) + 0.5 * float((scores == s).sum() - 1)


# --------------------------------------------------------------------------- the result


@dataclass
class Attribution:
    queries: Queries
    example_ids: np.ndarray  # int64 [n_train]
    texts: list[str]  # training texts
    scores: dict[str, np.ndarray]  # method (valued ones and bm25) -> [n_train, Q]
    unknown_words: list[list[str]]  # per query, the words the tokenizer lacked
    with_random: bool = True  # the benchmark lists the random baseline
    scored: list[str] = field(default_factory=list)  # per query: "answer" or "text"
    source_ranks: dict[str, np.ndarray] = field(default_factory=dict)  # method -> [Q] (NaN: no source)
    replay: QueryReplay | None = None
    fact_recall: float | None = None
    wall_seconds: float = 0.0

    @property
    def methods(self) -> list[str]:
        return list(self.scores)

    def query_ids(self) -> pd.Series:
        ids = self.queries.ids
        return pd.Series(ids, dtype="int64" if all(isinstance(i, int) for i in ids) else "string")

    def frame(self) -> pd.DataFrame:
        """attribution.parquet: one row per (query, training example)."""
        n, Q = len(self.example_ids), len(self.queries)
        cols: dict[str, object] = {
            "query_id": self.query_ids().repeat(n).reset_index(drop=True),
            "example_id": np.tile(self.example_ids, Q),
        }
        for m, s in self.scores.items():
            cols[value_column(m)] = s.T.reshape(-1)
            cols[f"rank_{m}"] = ranks(s).T.reshape(-1)
        if self.queries.has_sources:
            src = np.array([-1 if s is None else s for s in self.queries.source_ids])
            cols["is_source"] = np.tile(self.example_ids, Q) == np.repeat(src, n)
        return pd.DataFrame(cols)

    def queries_frame(self) -> pd.DataFrame:
        """attribution_queries.parquet: one row per query, with the true source's rank per method."""
        q = self.queries
        df = pd.DataFrame(
            {
                "query_id": self.query_ids(),
                "text": q.texts,
                "level": q.levels,
                "source_id": pd.array(q.source_ids, dtype="Int64"),
                "answer": pd.array(q.answers, dtype="string"),
                "scored": self.scored,
                "n_unknown_words": [len(u) for u in self.unknown_words],
            }
        )
        for m, r in self.source_ranks.items():
            df[f"source_rank_{m}"] = r
        return df

    def benchmark(self) -> pd.DataFrame:
        """Per level × method: mean rank of the true source, recall@1, recall@10."""
        q = self.queries
        n = len(self.example_ids)
        rows = []
        for level in ordered_levels(q.levels, q.source_ids):
            sel = np.array(
                [lv == level and s is not None for lv, s in zip(q.levels, q.source_ids, strict=True)]
            )
            for m in [*self.source_ranks, *(["random"] if self.with_random else [])]:
                if m == "random":
                    mean, recall = (n + 1) / 2, {k: min(k, n) / n for k in RECALL_AT}
                else:
                    r = self.source_ranks[m][sel]
                    mean, recall = float(r.mean()), {k: float((r <= k).mean()) for k in RECALL_AT}
                row = {"level": level or "all", "method": m, "n_queries": int(sel.sum()), "mean_rank": mean}
                rows.append(row | {f"recall_at_{k}": recall[k] for k in RECALL_AT} | {"n_train": n})
        return pd.DataFrame(rows)


def ordered_levels(levels: Sequence[str], sources: Sequence[int | None]) -> list[str]:
    """The levels of the queries that have a source: the built-in order first, then the rest sorted."""
    present = {lv for lv, s in zip(levels, sources, strict=True) if s is not None}
    return [lv for lv in LEVELS if lv in present] + sorted(present - set(LEVELS))


def check_sources(queries: Queries, example_ids: np.ndarray) -> None:
    """Every query's true source (where given) is one of the run's training examples."""
    known = {int(e) for e in example_ids}
    missing = [i for i, s in enumerate(queries.source_ids) if s is not None and s not in known]
    if missing:
        i = missing[0]
        raise UserError(
            f"{queries.where(i)} has source_id {queries.source_ids[i]}, which is not a training example "
            "of this run (held-out texts and unknown ids cannot be a source); expected an example_id "
            "from values.parquet."
        )


def rank_sources(
    scores: dict[str, np.ndarray], queries: Queries, example_ids: np.ndarray
) -> dict[str, np.ndarray]:
    """Per method, the rank of each query's true source (NaN where the query has none)."""
    check_sources(queries, example_ids)
    pos = {int(e): i for i, e in enumerate(example_ids)}
    out = {}
    for m, s in scores.items():
        out[m] = np.array(
            [
                np.nan if src is None else source_rank(s[:, q], pos[src])
                for q, src in enumerate(queries.source_ids)
            ]
        )
    return out


@torch.no_grad()
def fact_recall(model: torch.nn.Module, data: TextDataset, recipe: Recipe) -> float | None:
    """For builtin:facts: the share of training facts whose value the model predicts (greedy) in its text."""
    if recipe.data.source != "builtin:facts":
        return None
    from .data.facts import generate

    assert recipe.data.facts is not None  # DataCfg fills in the defaults for builtin:facts
    facts, _ = generate(recipe.data.facts.n_facts, recipe.data.facts.seed)
    value = {f.id: data.tokenizer.index[f.value] for f in facts}
    was_training = model.training
    model.eval()
    try:
        x, y = data.x_train, data.y_train
        pred = model(x.to(next(model.parameters()).device)).argmax(dim=-1).cpu()
    finally:
        model.train(was_training)
    hits = 0
    for i, eid in enumerate(data.example_id.tolist()):
        at = int((y[i] == value[eid]).nonzero()[0, 0])  # the value's position among the targets
        hits += int(pred[i, at] == value[eid])
    return hits / data.n_train


# --------------------------------------------------------------------------- the whole command


@dataclass
class Plan:
    """A checked attribution job: everything that can fail on bad input, before any replay."""

    folder: RunFolder
    recipe: Recipe
    data: TextDataset
    queries: Queries
    queries_x: torch.Tensor
    queries_y: torch.Tensor
    valued: list[str]  # adam, adam_fixed, sgd among the methods
    baselines: list[str]  # bm25, random among the methods
    chunk: int
    score: str  # "answer" or "text" (see ``encode_queries``)
    total_steps: int  # steps of all replays together


def check_attribution_methods(methods: Sequence[str] | None) -> list[str]:
    """The requested methods (None: all), validated, each once."""
    if methods is None:
        return list(ALL_METHODS)
    names = list(dict.fromkeys(methods))
    if not names:
        raise UserError(f"--methods names no method; expected some of {', '.join(ALL_METHODS)}.")
    unknown = [m for m in names if m not in ALL_METHODS]
    if unknown:
        raise UserError(f"--methods: unknown method(s) {unknown}; expected some of {', '.join(ALL_METHODS)}.")
    if names == ["random"]:
        scoring = ", ".join(m for m in ALL_METHODS if m != "random")
        raise UserError(
            "--methods random alone ranks nothing: it is the chance level the benchmark lists beside the "
            f"methods that score the training texts; expected at least one of {scoring} with it."
        )
    return names


def _another_run(refused: RunFolder) -> str:
    """For a run refused that was taken as the latest (no --run given): the most recent run that
    attribution can replay, with the command for it, or that there is none; nothing for a run named."""
    if not refused.latest:
        return ""
    root = refused.path.parent
    for folder in reversed(list_runs(root)):
        if folder.path != refused.path and _is_language_model_run(folder):
            command = f"adamshap attribute --run {shlex.quote(folder.name)}{runs_dir_option(folder.path)}"
            return (
                f" It was taken as the latest run (no --run given); the latest language-model run is "
                f"{folder.name!r}: {command}"
            )
    return (
        f" It was taken as the latest run (no --run given), and no run under {root} is a language-model "
        "run; train one with `adamshap train recipes/facts-gpt.yaml`."
    )


def _is_language_model_run(folder: RunFolder) -> bool:
    """A complete run of a gpt (which trains on text only)."""
    if folder.text_field("status") != "complete":
        return False
    try:
        return folder.recipe().model.kind in LANGUAGE_MODELS
    except UserError:  # a recipe.yaml that no longer loads: not one to offer
        return False


def plan(
    folder: RunFolder,
    *,
    texts: Sequence[str] | None = None,
    queries_file: str | None = None,
    methods: Sequence[str] | None = None,
    chunk: int | None = None,
    score: str = "answer",
) -> Plan:
    """Load the run, its data and the queries; check everything a replay needs. ``chunk``: queries
    per replay (None: ``auto_chunk``)."""
    metrics = folder.require_complete().metrics()
    recipe = folder.recipe()
    if recipe.model.kind not in LANGUAGE_MODELS:
        raise UserError(
            f"run {folder.name!r} trained a {recipe.model.kind} on {recipe.data.source!r}; attribution "
            f"needs a language-model run (model.kind: {listed(LANGUAGE_MODELS, 'or')} on a text source such "
            "as builtin:facts)." + _another_run(folder)
        )
    if chunk is not None and chunk < 1:
        raise UserError(f"--chunk is {chunk}; expected at least 1 query per replay.")
    data = load_dataset(recipe.data)
    if not isinstance(data, TextDataset):  # (a gpt trains on text only: its recipe was edited since)
        raise UserError(
            f"run {folder.name!r} trained a gpt, but its recipe's data {recipe.data.source!r} is not text; "
            "attribution replays the run on the texts it trained on." + _another_run(folder)
        )
    check_tokenizer(folder, data.tokenizer)
    queries = pick_queries(data, recipe, texts, queries_file)
    check_sources(queries, data.example_id.numpy())  # before the replay, not minutes after it
    qx, qy = encode_queries(queries, data.tokenizer, context_length(recipe.model, data), score)
    names = check_attribution_methods(methods)
    valued = [m for m in names if m in METHODS]
    chunk = chunk or auto_chunk(recipe, data, len(valued))
    steps = int(metrics.get("total_steps") or 0)
    return Plan(
        folder,
        recipe,
        data,
        queries,
        qx,
        qy,
        valued,
        [m for m in names if m in BASELINES],
        chunk,
        score,
        steps * -(-len(queries) // chunk) if valued else 0,
    )


def auto_chunk(recipe: Recipe, data: TextDataset, n_methods: int) -> int:
    """Queries per replay: ``DEFAULT_CHUNK``, or fewer where their matrices M (methods × queries
    × the model's parameters, in floats) would pass ``M_BUDGET``; at least one."""
    if n_methods == 0:
        return DEFAULT_CHUNK
    with torch.device("meta"):  # the shapes only: nothing allocated, no random numbers drawn
        model = build_model(recipe.model, data)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # a tied weight once
    return max(1, min(DEFAULT_CHUNK, M_BUDGET // (n_methods * n_params)))


def pick_queries(data: TextDataset, recipe: Recipe, texts, queries_file) -> Queries:
    if texts and queries_file:
        raise UserError("give either --query TEXT (repeatable) or --queries FILE.jsonl|builtin, not both.")
    if texts:
        return queries_from_texts(texts)
    if queries_file == "builtin" or (queries_file is None and data.queries):
        return builtin_queries(data, recipe.data.source)
    if queries_file is None:
        raise UserError(
            f"no queries: give --query TEXT (repeatable) or --queries FILE.jsonl; the run's data "
            f"{recipe.data.source!r} has no built-in queries."
        )
    return queries_from_file(queries_file)


def check_tokenizer(folder: RunFolder, tok: WordTokenizer) -> None:
    """The corpus must still give the run's tokenizer (else the replay is of other data)."""
    import json

    path = folder.file("tokenizer.json")
    if not path.is_file():
        return  # a run folder written before tokenizers were saved: the replay digest still checks
    try:
        saved = WordTokenizer.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}.") from None
    if saved != tok:
        raise UserError(
            f"the training texts of run {folder.name!r} have changed since it was trained (the corpus now "
            f"gives another vocabulary than {path}); attribution must replay the run on the same data."
        )


def attribute(p: Plan, on_step: Callable[[], None] | None = None) -> Attribution:
    """Replay (if any value method was asked for), score the baselines, rank the sources."""
    t0 = time.perf_counter()
    d, q = p.data, p.queries
    scores: dict[str, np.ndarray] = {}
    replay = None
    if p.valued:
        metrics = p.folder.metrics()
        replay = replay_values(
            p.recipe,
            d,
            p.queries_x,
            p.queries_y,
            p.valued,
            chunk=p.chunk,
            expected_sha256=metrics.get("params_sha256"),
            threads=recorded_threads(metrics),
            on_step=on_step,
        )
        scores.update(replay.values)
    if "bm25" in p.baselines:
        scores["bm25"] = bm25_scores(d.texts, q.texts)
    example_ids = d.example_id.numpy().astype(np.int64)
    result = Attribution(
        q,
        example_ids,
        list(d.texts),
        scores,
        [d.tokenizer.unknown_words(t) for t in q.texts],
        with_random="random" in p.baselines,
        scored=["answer" if p.score == "answer" and a is not None else "text" for a in q.answers],
        replay=replay,
    )
    if q.has_sources:
        result.source_ranks = rank_sources(scores, q, example_ids)
    if replay is not None:
        result.fact_recall = fact_recall(replay.model, d, p.recipe)
    result.wall_seconds = time.perf_counter() - t0
    return result


def write_outputs(p: Plan, result: Attribution) -> dict[str, Path]:
    """attribution.parquet, attribution_queries.parquet, attribution_benchmark.parquet (with sources),
    then attribution.json, each written atomically, the set as ``writing_results`` writes one."""
    f = p.folder
    paths = {"values": f.file("attribution.parquet"), "queries": f.file("attribution_queries.parquet")}
    summary = f.file("attribution.json")
    bench = result.benchmark() if result.queries.has_sources else None
    with writing_results(summary):
        atomic_write_parquet(paths["values"], result.frame())
        atomic_write_parquet(paths["queries"], result.queries_frame())
        if bench is not None:
            paths["benchmark"] = f.file("attribution_benchmark.parquet")
            atomic_write_parquet(paths["benchmark"], bench)
        else:  # a benchmark of earlier queries must not sit beside these results
            f.file("attribution_benchmark.parquet").unlink(missing_ok=True)
        atomic_write_json(summary, attribution_summary(p, result, bench))
    paths["summary"] = summary
    return paths


def attribution_summary(p: Plan, result: Attribution, bench: pd.DataFrame | None) -> dict:
    """attribution.json: what was attributed, how, and the benchmark's figures."""
    r = result.replay
    return {
        "run": p.folder.name,
        "methods": result.methods + (["random"] if result.with_random else []),
        "n_queries": len(result.queries),
        "n_train": len(result.example_ids),
        "chunk": p.chunk,
        "score": p.score,
        "replays": r.replays if r else 0,
        "replay_params_sha256": r.params_sha256 if r else None,
        "replay_matches_run": r.matches_run if r else None,
        "fact_recall": result.fact_recall,
        "wall_seconds": result.wall_seconds,
        "benchmark": bench.to_dict(orient="records") if bench is not None else None,
    }
