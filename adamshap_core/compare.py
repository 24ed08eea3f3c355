"""``adamshap compare``: each method against the ground truth of the real optimizer step.

How a run's steps are recovered: a *deterministic replay*. The run's recipe is
prepared again and ``train.run`` walks the same trajectory; its ``on_step`` observer
sees the model and optimizer just before each step and computes the ground truth
there (``groundtruth.step_truth``). No checkpoints are kept, so training's own wall
time does not change. The replay is checked against the run before anything is
written: the batch of every recorded step must hold the same examples, the
validation loss at every evaluated step must match ``steps.parquet``, and the
replayed per-step values at the recorded steps (and, after a full replay, the
run's summed values) must equal ``steps_values.parquet`` (``values.parquet``) to
float tolerance. A run without recorded steps (``attribution.record_steps: 0``)
or without attribution cannot be checked and is refused.

Ground truth, per evaluated step: exact leave-one-out and antithetic Monte-Carlo
Shapley of U_t (``groundtruth.py``); cumulative: their sums over every step of the run.

Outputs, beside the run's files (written only once everything is computed):

- ``compare.parquet``: one row per (method, ground_truth, scope) with ``pearson``,
  ``spearman``, ``n`` and ``auroc``. ``ground_truth`` is ``shapley``, ``loo``, another
  method's name (method-vs-method rows) or ``is_noisy`` (mislabel-detection rows, whose
  ``auroc`` is that of "low value ⇒ noisy"; the other rows leave it empty); ``scope`` is
  a step number as text or ``cumulative``.
- ``groundtruth.parquet``: the ground truth itself beside the methods' values, one row
  per (scope, example_id), with the Monte-Carlo permutations drawn (the cumulative rows: the
  fewest of any step); ``compare_layers.parquet``: each method's per-step value split
  by parameter tensor (share of |value|, correlation with adam's, spread of Adam's scale).
- ``compare.json``: the settings, the replay check, standard errors, timings.
- PNG plots (see ``report.py``).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from . import groundtruth as gt
from .compare_options import CompareOptions
from .digests import check_same_data
from .errors import UserError
from .fused import random_draws
from .run_tables import reused_val_grads, value_column
from .runio import RunFolder
from .threads import intra_op_threads, recorded_threads

if TYPE_CHECKING:
    from .recipe import Recipe
    from .train import Prepared, StepContext

REPLAY_RTOL = 1e-5  # replayed vs recorded per-step values, relative to the step's largest |value|
VAL_LOSS_RTOL = 1e-4  # float64 ground-truth validation loss vs the run's float32 one
TRUTHS = ("shapley", "loo")
COMPARE_COLUMNS = ["method", "ground_truth", "scope", "pearson", "spearman", "n", "auroc"]


@dataclass
class RunInputs:
    """A finished run's files, checked to support a comparison."""

    folder: RunFolder
    recipe: Recipe
    methods: list[str]
    values: pd.DataFrame
    steps: pd.DataFrame
    steps_values: pd.DataFrame

    @property
    def recorded(self) -> list[int]:
        return sorted(int(s) for s in self.steps_values["step"].unique())

    @property
    def last_step(self) -> int:
        return int(self.steps["step"].max())


@dataclass
class TruthReplay:
    """What replaying a run gives compare: the ground truth at its steps and the values to check."""

    truths: dict[int, gt.StepTruth]
    batch_ids: dict[int, np.ndarray]  # step -> example ids of its batch, in batch order
    steps_values: pd.DataFrame  # replayed per-step values at the recorded and evaluated steps
    values: dict[str, np.ndarray] | None  # replayed summed values by position, after a full replay
    example_id: np.ndarray  # example id of each training position
    seconds: float


@dataclass
class CompareResult:
    table: pd.DataFrame  # compare.parquet
    truth: pd.DataFrame  # groundtruth.parquet
    layers: pd.DataFrame  # compare_layers.parquet
    summary: dict  # compare.json
    methods: list[str]
    baseline: str
    evaluated: list[int]
    values: pd.DataFrame  # the run's values.parquet: each example's values summed over the run


# ---- reading and checking the run -----------------------------------------------------------------


def load_run(folder: RunFolder) -> RunInputs:
    """The run's files; a ``UserError`` naming what is missing when the run cannot be compared."""
    name = folder.name
    folder.require_complete()  # complete, of a known schema version, its tables as the schema says
    recipe = folder.recipe()
    if not recipe.attribution.enabled:
        raise UserError(
            f"run {name!r} was trained with attribution.enabled: false, so it has no values to compare; "
            "retrain it with attribution on (the default)."
        )
    if recipe.attribution.record_steps == 0:
        raise UserError(
            f"run {name!r} was trained with attribution.record_steps: 0 (recording off), so compare cannot "
            "check that its replay reproduces the run; retrain it with attribution.record_steps > 0 "
            "(the default is 8)."
        )
    values, steps, steps_values = folder.values(), folder.steps(), folder.steps_values()
    methods = folder.methods()  # require_complete checked both tables hold their value columns
    if not methods or steps_values.empty or steps.empty:
        raise UserError(
            f"run {name!r} has no per-step values in steps_values.parquet (or no values/steps), so compare "
            "cannot check its replay; retrain it with attribution on and attribution.record_steps > 0."
        )
    return RunInputs(folder, recipe, methods, values, steps, steps_values)


def check_baseline(baseline: str | None, methods: Sequence[str]) -> str:
    """The method the others are set against: ``baseline``, which the run must have valued, or by default
    ``sgd`` (the formula the Adam-aware methods correct), else the run's first method other than adam."""
    if baseline is None:
        others = [m for m in methods if m != "adam"]
        return "sgd" if "sgd" in methods else (others or list(methods))[0]
    if baseline not in methods:
        raise UserError(
            f"--baseline {baseline!r} is not a method of this run; expected one of {', '.join(methods)}."
        )
    return baseline


# far above the default of 32 per step (compare_options.py): a larger number is more likely a typo than
# a wish, and would run for days
MAX_PERMUTATIONS = 100_000


def check_permutations(permutations: int, option: str = "--permutations") -> int:
    if permutations < 2 or permutations % 2 or permutations > MAX_PERMUTATIONS:
        raise UserError(
            f"{option} {permutations}: expected an even number from 2 to {MAX_PERMUTATIONS:,} "
            "(permutations are drawn in antithetic pairs)."
        )
    return permutations


def resolve_steps(spec: str, recorded: Sequence[int], last_step: int) -> list[int]:
    """``auto`` = the recorded steps; else a comma list of steps and ranges (``1-5,50``) in 1..last_step."""
    text = (spec or "").strip().lower()
    if text == "auto":
        return sorted(recorded)
    steps: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(
                f"--steps {spec!r}: cannot read {part.strip()!r}; expected auto or a comma list of steps and "
                "ranges such as 1-5,50,100."
            )
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise UserError(
                f"--steps {spec!r}: the range {part.strip()} runs backwards; write it as {hi}-{lo}."
            )
        outside = [s for s in (lo, hi) if not 1 <= s <= last_step]
        if outside:  # checked before the range is built: a huge one would fill the memory
            raise UserError(
                f"--steps {spec!r}: step(s) {outside} are outside the run, whose steps are 1..{last_step}."
            )
        steps.update(range(lo, hi + 1))
    return sorted(steps)


# ---- the replay -------------------------------------------------------------------------------------


class Progress(NamedTuple):
    """How far the ground truth is (or its total): steps, and work (permutations + 1 per step)."""

    steps: int
    work: int


def prepare_replay(inputs: RunInputs) -> Prepared:
    """The run's data, model and tracker, built again, and refused before any output where the
    replay could not reproduce the run: other data, or random draws in training."""
    from .train import prepare

    prep = prepare(inputs.recipe)
    try:
        check_same_data(inputs.folder, prep.data)  # before the replay, which would stop at the first change
        check_no_random_draws(prep.model, inputs.folder.name)
        if not np.array_equal(
            np.sort(prep.data.example_id.numpy()), np.sort(inputs.values["example_id"].to_numpy())
        ):
            raise UserError(
                f"the data of run {inputs.folder.name!r} cannot be rebuilt: its recipe now loads other "
                "training examples than values.parquet holds (has the data source changed?)."
            )
    except UserError:
        if prep.tracker is not None:
            prep.tracker.close()
        raise
    return prep


def replay(
    inputs: RunInputs,
    prep: Prepared,
    evaluated: Sequence[int],
    options: CompareOptions,
    on_progress: Callable[[Progress, Progress], None] | None = None,
    on_replay: Callable[[int, int], None] | None = None,
) -> TruthReplay:
    """Replay the run from ``prepare_replay``, computing the ground truth just before each step that
    needs it. ``on_replay`` hears of the steps replayed: the replay goes on past the last step with a
    ground truth to the last step whose values the run recorded (by default the run's last), to check
    them."""
    from .train import run

    example_id = prep.data.example_id.numpy()
    detail = set(evaluated)
    truth_steps = set(range(1, inputs.last_step + 1)) if options.cumulative else detail
    record = sorted(detail | set(inputs.recorded))
    horizon = max(max(truth_steps), record[-1])
    expected_ids = {s: g["example_id"].to_numpy() for s, g in inputs.steps_values.groupby("step")}
    val_loss = dict(zip(inputs.steps["step"], inputs.steps["val_loss"], strict=True))
    methods = tuple(dict.fromkeys([*inputs.methods, "adam"]))
    truths: dict[int, gt.StepTruth] = {}
    batch_ids: dict[int, np.ndarray] = {}
    # progress counts work, not steps: a step's ground truth costs about its permutations plus one (the
    # leave-one-out coalitions), so the evaluated steps weigh far more than the others
    permutations = {
        s: options.permutations if s in detail else options.cumulative_permutations for s in truth_steps
    }
    total, done = Progress(len(truth_steps), sum(permutations.values()) + len(truth_steps)), 0

    def observe(step: int, batch: torch.Tensor, ctx) -> None:
        nonlocal done
        ids = example_id[batch.numpy()]
        if step in expected_ids and not np.array_equal(ids, expected_ids[step]):
            raise _unfaithful(inputs, f"the batch of step {step} holds other examples than the run's")
        if step not in truth_steps:
            return
        truth = _step_truth(
            ctx, prep, inputs, options.seed, permutations[step], methods if step in detail else ()
        )
        _check_val_loss(inputs, step, truth.val_loss, val_loss.get(step, math.nan))
        truths[step], batch_ids[step] = truth, ids
        done += permutations[step] + 1
        if on_progress is not None:
            on_progress(Progress(len(truths), done), total)

    t0 = time.perf_counter()
    try:
        with intra_op_threads(recorded_threads(inputs.folder.metrics())):
            replayed = None if on_replay is None else lambda done, total, *_: on_replay(done, total)
            result = run(
                prep, on_step=observe, max_steps=horizon, record=record, splits=(), on_progress=replayed
            )
    finally:
        if prep.tracker is not None:
            prep.tracker.close()
    full = result.steps_done == inputs.last_step
    return TruthReplay(
        truths,
        batch_ids,
        result.steps_values,
        result.values if full else None,
        example_id,
        time.perf_counter() - t0,
    )


def _step_truth(
    ctx: StepContext, prep: Prepared, inputs: RunInputs, seed: int, permutations: int, methods: Sequence[str]
) -> gt.StepTruth:
    """The ground truth of the step ``ctx`` is about to take."""
    return gt.step_truth(
        ctx.step,
        ctx.model,
        ctx.optimizer,
        prep.loss_fn,
        ctx.inputs,
        ctx.targets,
        prep.val_x,
        prep.val_y,
        max_grad_norm=inputs.recipe.train.grad_clip,
        permutations=permutations,
        generator=torch.Generator().manual_seed(seed * 1_000_003 + ctx.step),
        methods=tuple(methods),
    )


def _check_val_loss(inputs: RunInputs, step: int, replayed: float, recorded: float) -> None:
    """Refuse a replay whose validation loss before ``step`` is not the run's (NaN ``recorded``: a
    fast-mode step that reused ∇val measured none)."""
    if math.isfinite(recorded) and not math.isclose(replayed, recorded, rel_tol=VAL_LOSS_RTOL, abs_tol=1e-7):
        raise _unfaithful(
            inputs,
            f"before step {step} the validation loss is {replayed:.6g}, the run recorded {recorded:.6g}",
        )


def check_no_random_draws(model: torch.nn.Module, run_name: str) -> None:
    """Refuse models that draw random numbers in training (dropout masks, random slopes): the real
    step's gradient depends on that step's draws, which the ground truth (per-example gradients by
    vmap) cannot reproduce."""
    if draws := random_draws(model):
        raise UserError(
            f"run {run_name!r} trains with random draws ({'; '.join(draws[:3])}"
            f"{'; ...' if len(draws) > 3 else ''}); the ground truth of a step "
            "needs that step's exact draws, such as dropout masks, which compare cannot reproduce per "
            "example. Compare a run with model.dropout: 0."
        )


def _unfaithful(inputs: RunInputs, what: str) -> UserError:
    return UserError(
        f"the replay of run {inputs.folder.name!r} does not reproduce the run: {what}. Compare needs the run "
        "to be replayed exactly (same code, data, torch version, device, e.g. train.device: cpu, and CPU "
        "threads, which a run made before adamshap recorded them takes from OMP_NUM_THREADS); "
        "retrain the run here, then compare again."
    )


def check_replay(inputs: RunInputs, rep: TruthReplay) -> dict:
    """Replayed per-step values at the recorded steps (and summed values) against the run's files."""
    worst, worst_where = 0.0, ""
    recorded = inputs.steps_values
    replayed = rep.steps_values[rep.steps_values["step"].isin(inputs.recorded)]
    keys = ["step", "example_id"]
    if not recorded[keys].reset_index(drop=True).equals(replayed[keys].reset_index(drop=True)):
        raise _unfaithful(inputs, "the recorded steps hold other examples in the replay")
    for step, rec in recorded.groupby("step"):
        rep_step = replayed[replayed["step"] == step]
        for m in inputs.methods:
            rel = _rel_diff(rep_step[value_column(m)].to_numpy(), rec[value_column(m)].to_numpy())
            if rel > worst:
                worst, worst_where = rel, f"{value_column(m)} at step {step}"
    if rep.values is not None:
        pos = pd.Series(np.arange(len(rep.example_id)), index=rep.example_id)
        order = pos.loc[inputs.values["example_id"].to_numpy()].to_numpy()
        for m in inputs.methods:
            rel = _rel_diff(rep.values[m][order], inputs.values[value_column(m)].to_numpy())
            if rel > worst:
                worst, worst_where = rel, f"{value_column(m)} summed over the run"
    if worst > REPLAY_RTOL:
        raise _unfaithful(
            inputs,
            f"the replayed {worst_where} differs from the recorded one by {worst:.2e} of its largest "
            f"magnitude (tolerance {REPLAY_RTOL:g})",
        )
    return {
        "checked_steps": inputs.recorded,
        "checked_run_values": rep.values is not None,
        "max_relative_difference": worst,
        "tolerance": REPLAY_RTOL,
    }


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf  # a NaN compares as no difference at all: report it as the largest instead
    scale = float(np.abs(b).max()) if len(b) else 0.0
    diff = float(np.abs(a - b).max()) if len(b) else 0.0
    return diff / scale if scale > 0 else diff


# ---- tables -------------------------------------------------------------------------------------


def truth_frame(
    inputs: RunInputs, rep: TruthReplay, evaluated: Sequence[int], cumulative: bool
) -> pd.DataFrame:
    """Ground truth beside each method's values: per evaluated step, and summed over the run."""
    noisy = inputs.values.set_index("example_id")["is_noisy"] if "is_noisy" in inputs.values else None
    frames = []
    for step in evaluated:
        t = rep.truths[step]
        df = pd.DataFrame(
            {
                "scope": str(step),
                "example_id": rep.batch_ids[step],
                "shapley": t.shapley,
                "shapley_se": t.shapley_se,
                "loo": t.loo,
                "permutations": t.permutations,
            }
        )
        vals = rep.steps_values[rep.steps_values["step"] == step].drop(columns="step")
        frames.append(df.merge(vals, on="example_id", how="left", validate="one_to_one"))
    if cumulative:
        frames.append(_cumulative_truth(inputs, rep))
    out = pd.concat(frames, ignore_index=True)
    if noisy is not None:
        out["is_noisy"] = noisy.reindex(out["example_id"]).to_numpy()
    return out


def _cumulative_truth(inputs: RunInputs, rep: TruthReplay) -> pd.DataFrame:
    """Σ over the run's steps of per-step Shapley and LOO; the standard errors add in quadrature."""
    n = len(rep.example_id)
    shap, var, loo = np.zeros(n), np.zeros(n), np.zeros(n)
    pos_of = pd.Series(np.arange(n), index=rep.example_id)
    for step, t in rep.truths.items():
        pos = pos_of.loc[rep.batch_ids[step]].to_numpy()
        np.add.at(shap, pos, t.shapley)
        np.add.at(var, pos, t.shapley_se**2)  # NaN (one pair per step: no spread) stays unknown, not 0
        np.add.at(loo, pos, t.loo)
    df = pd.DataFrame(
        {
            "scope": "cumulative",
            "example_id": rep.example_id,
            "shapley": shap,
            "shapley_se": np.sqrt(var),
            "loo": loo,
            # the fewest any step drew: the evaluated steps draw --permutations, the others
            # --cumulative-permutations
            "permutations": min(t.permutations for t in rep.truths.values()),
        }
    )
    run_values = inputs.values[["example_id", *[value_column(m) for m in inputs.methods]]]
    return df.merge(run_values, on="example_id", how="left", validate="one_to_one")


def correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Pearson, Spearman); NaN when fewer than 3 points or either side is constant."""
    from scipy.stats import pearsonr, spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(pearsonr(a, b)[0]), float(spearmanr(a, b)[0])


def auroc_low_value_noisy(values: np.ndarray, noisy: np.ndarray) -> float:
    """AUROC of "low value ⇒ noisy"; NaN unless both clean and noisy examples are present."""
    from sklearn.metrics import roc_auc_score

    noisy = np.asarray(noisy, dtype=bool)
    if noisy.all() or not noisy.any():
        return float("nan")
    return float(roc_auc_score(noisy, -np.asarray(values, dtype=float)))


def compare_table(truth: pd.DataFrame, inputs: RunInputs, baseline: str) -> pd.DataFrame:
    """The rows of compare.parquet."""
    methods = inputs.methods
    rows = []

    def add(method, ground_truth, scope, a, b):
        p, s = correlation(a, b)
        rows.append((method, ground_truth, scope, p, s, len(a), float("nan")))

    for scope, df in truth.groupby("scope", sort=False):
        for m in methods:
            for g in TRUTHS:
                add(m, g, scope, df[value_column(m)], df[g])
            if m != baseline and scope != "cumulative":
                add(m, baseline, scope, df[value_column(m)], df[value_column(baseline)])
    run_values = inputs.values
    for m in methods:
        if m != baseline:  # method vs method on the run's own summed values
            add(m, baseline, "cumulative", run_values[value_column(m)], run_values[value_column(baseline)])
    if "is_noisy" in run_values and run_values["is_noisy"].any():
        noisy = run_values["is_noisy"].to_numpy()
        for m in methods:
            auc = auroc_low_value_noisy(run_values[value_column(m)].to_numpy(), noisy)
            rows.append((m, "is_noisy", "cumulative", float("nan"), float("nan"), len(noisy), auc))
        cum = truth[truth["scope"] == "cumulative"]
        for g in TRUTHS if len(cum) else ():
            auc = auroc_low_value_noisy(cum[g].to_numpy(), cum["is_noisy"].to_numpy())
            rows.append((g, "is_noisy", "cumulative", float("nan"), float("nan"), len(cum), auc))
    table = pd.DataFrame(rows, columns=COMPARE_COLUMNS)
    return table.astype({"n": "int64"})


def cumulative_from_step_2(truth: pd.DataFrame, methods: Sequence[str]) -> dict | None:
    """Cumulative correlations against MC Shapley with step 1 taken out of both sides.

    At t = 1 Adam's state is empty and its step is η·sign(g) per coordinate, which no linear
    rule follows; this says how much that single step weighs in the cumulative figure.
    """
    cum = truth[truth["scope"] == "cumulative"].set_index("example_id")
    first = truth[truth["scope"] == "1"].set_index("example_id")
    if cum.empty or first.empty:
        return None
    out = {}
    for m in methods:
        values, shapley = cum[value_column(m)].copy(), cum["shapley"].copy()
        values.loc[first.index] -= first[value_column(m)]
        shapley.loc[first.index] -= first["shapley"]
        p, s = correlation(values.to_numpy(), shapley.to_numpy())
        out[m] = {"pearson": p, "spearman": s}
    return out


def layer_frame(rep: TruthReplay, evaluated: Sequence[int]) -> pd.DataFrame:
    """Per evaluated step and parameter tensor: each method's share of |value| there (the tensor's part
    of Σ over the batch's examples and the tensors of |an example's contribution through a tensor|),
    the correlation of its contribution there with adam's, and the spread of Adam's per-coordinate
    scale. Every method the replay split by tensor: the run's, and adam, which it always computes."""
    rows = []
    for step in evaluated:
        t = rep.truths[step]
        # an evaluated step's truth splits each method's value by parameter
        assert t.by_param is not None and t.param_names is not None and t.scale_spread is not None
        for m in t.by_param:
            terms = t.by_param[m]
            # float(): numpy 2.5's stubs type the sum of a bare ndarray's np.abs as an integer
            total = float(np.abs(terms).sum())
            for j, name in enumerate(t.param_names):
                pearson, _ = correlation(terms[:, j], t.by_param["adam"][:, j])
                share = float(np.abs(terms[:, j]).sum()) / total if total > 0 else float("nan")
                rows.append((step, name, m, share, pearson, t.scale_spread[j]))
    cols = ["step", "layer", "method", "share", "pearson_vs_adam", "adam_scale_log10_iqr"]
    return pd.DataFrame(rows, columns=cols).astype({"step": "int64"})


def divergence(table: pd.DataFrame, layers: pd.DataFrame, baseline: str) -> dict:
    """Where the baseline departs most from the ground truth and from adam: which steps, which layers."""
    per_step = table[
        (table["method"] == baseline)
        & (table["ground_truth"] == "shapley")
        & (table["scope"] != "cumulative")
    ]
    worst = per_step.sort_values("pearson").head(3)
    out: dict[str, Any] = {
        "baseline": baseline,
        "worst_steps": [
            {"step": int(r.scope), "pearson_vs_shapley": r.pearson} for r in worst.itertuples(index=False)
        ],
        "layers": [],
    }
    for phase, keep in (("early, t ≤ 5", lambda s: s <= 5), ("later, t > 5", lambda s: s > 5)):
        part = layers[layers["step"].map(keep)]
        if part.empty:
            continue
        med = part.groupby(["layer", "method"], sort=False).median(numeric_only=True).reset_index()
        for layer, grp in med.groupby("layer", sort=False):
            by = grp.set_index("method")
            out["layers"].append(
                {
                    "phase": phase,
                    "layer": layer,
                    "share_baseline": float(by.loc[baseline, "share"]),
                    "share_adam": float(by.loc["adam", "share"]) if "adam" in by.index else float("nan"),
                    "pearson_baseline_vs_adam": float(by.loc[baseline, "pearson_vs_adam"]),
                    "adam_scale_log10_iqr": float(by.loc[baseline, "adam_scale_log10_iqr"]),
                }
            )
    return out


def step_summaries(rep: TruthReplay, evaluated: Sequence[int]) -> list[dict]:
    out = []
    for step in evaluated:
        t = rep.truths[step]
        se = float(np.median(t.shapley_se)) if np.isfinite(t.shapley_se).all() else float("nan")
        out.append(
            {
                "step": step,
                "u_full": t.u_full,
                "u_empty": t.u_empty,
                "val_loss": t.val_loss,
                "permutations": t.permutations,
                "median_se": se,
                "se_over_sd": se_over_sd(se, t.shapley),
            }
        )
    return out


def fresh_steps(inputs: RunInputs, evaluated: Sequence[int]) -> list[int]:
    """The evaluated steps whose values used the validation gradient of that step, not one the fast
    mode reused from an earlier step (those record no validation loss): the materialised gradients
    recompute the former only."""
    reused = reused_val_grads(inputs.steps.set_index("step"))
    return [s for s in evaluated if s in reused.index and not reused[s]]


def se_over_sd(median_se: float, shapley: np.ndarray) -> float:
    """The Monte-Carlo noise against the spread of the values it estimates (the examples' std);
    NaN where the values do not spread."""
    sd = float(np.std(shapley))
    return median_se / sd if sd > 0 else float("nan")


def engine_vs_bruteforce(rep: TruthReplay, steps: Sequence[int], methods: Sequence[str]) -> float:
    """Largest relative gap between the run's (ghost engine) values and the same rule from
    materialised per-example gradients: a cross-check of the two implementations, at ``steps``
    (NaN where there are none)."""
    worst = 0.0 if steps else float("nan")
    for step in steps:
        t = rep.truths[step]
        assert t.by_param is not None  # an evaluated step's truth splits each method's value by parameter
        sv = rep.steps_values[rep.steps_values["step"] == step].set_index("example_id")
        for m in methods:
            engine = sv.loc[rep.batch_ids[step], value_column(m)].to_numpy()
            worst = max(worst, _rel_diff(engine, t.by_param[m].sum(1)))
    return worst


# ---- the whole comparison ------------------------------------------------------------------------


def compare_run(
    folder: RunFolder,
    options: CompareOptions,
    on_progress: Callable[[Progress, Progress], None] | None = None,
    on_start: Callable[[RunInputs, list[int]], None] | None = None,
    on_replay: Callable[[int, int], None] | None = None,
) -> CompareResult:
    """Everything ``adamshap compare`` computes; nothing is written here (see ``write_outputs``).
    ``on_progress``: the ground truth's (done, total); ``on_replay``: the replay's (steps done, of)."""
    inputs = load_run(folder)
    baseline = check_baseline(options.baseline, inputs.methods)
    check_permutations(options.permutations)
    check_permutations(options.cumulative_permutations, "--cumulative-permutations")
    evaluated = resolve_steps(options.steps, inputs.recorded, inputs.last_step)
    prep = prepare_replay(inputs)
    if on_start is not None:
        on_start(inputs, evaluated)
    t0 = time.perf_counter()
    rep = replay(inputs, prep, evaluated, options, on_progress, on_replay)
    replay_check = check_replay(inputs, rep)
    truth = truth_frame(inputs, rep, evaluated, options.cumulative)
    table = compare_table(truth, inputs, baseline)
    layers = layer_frame(rep, evaluated)
    cum = truth[truth["scope"] == "cumulative"]
    summary = {
        "run": folder.name,
        "options": asdict(options),
        "methods": inputs.methods,
        "evaluated_steps": list(evaluated),
        "ground_truth_steps": len(rep.truths),
        "replay_check": replay_check,
        "engine_vs_bruteforce_max_relative_difference": engine_vs_bruteforce(
            rep, fresh_steps(inputs, evaluated), inputs.methods
        ),
        "per_step": step_summaries(rep, evaluated),
        "cumulative": {
            "steps": len(rep.truths),
            "median_se": float(cum["shapley_se"].median(skipna=False)),
            "se_over_sd": se_over_sd(
                float(cum["shapley_se"].median(skipna=False)), cum["shapley"].to_numpy()
            ),
        }
        if len(cum)
        else None,
        "cumulative_from_step_2": cumulative_from_step_2(truth, inputs.methods),
        "divergence": divergence(table, layers, baseline),
        "seconds": {"replay_and_ground_truth": rep.seconds, "total": time.perf_counter() - t0},
    }
    return CompareResult(
        table, truth, layers, summary, inputs.methods, baseline, list(evaluated), inputs.values
    )


def write_outputs(folder: RunFolder, result: CompareResult) -> list[str]:
    """Plots first (in memory), then every file atomically, compare.json last (``writing_results``);
    returns the names written."""
    from . import report
    from .runio import atomic_write_bytes, atomic_write_json, writing_results

    plots = report.compare_plots(result)
    with writing_results(folder.file("compare.json")):
        folder.write_parquet("compare.parquet", result.table)
        folder.write_parquet("groundtruth.parquet", result.truth)
        folder.write_parquet("compare_layers.parquet", result.layers)
        for name, png in plots.items():
            atomic_write_bytes(folder.file(name), png)
        for name in set(report.COMPARE_PLOTS) - set(plots):  # an earlier compare's, which this one replaces
            folder.file(name).unlink(missing_ok=True)
        atomic_write_json(folder.file("compare.json"), result.summary)
    return ["compare.parquet", "groundtruth.parquet", "compare_layers.parquet", "compare.json", *plots]
