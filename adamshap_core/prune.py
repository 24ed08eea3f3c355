"""Pruning by value: drop a fraction of the training set, retrain, test.

For each fraction and each method, the examples a method values lowest (or, with
``direction="high"``, highest) are removed and the run's recipe is retrained from
scratch on what remains, through the one training loop (``train.prepare`` +
``train.run``, valuation off). Each model is scored on the held-out *test* split,
never the validation split the values were computed against.

Seeds, applied alike to every method so the comparison is like for like: seed
``s`` (0, 1, ...) retrains with ``train.seed + s`` (seed 0 is the run's own seed),
which sets both the initial weights and the data order. The full-data reference
and each value method's subset are retrained under every seed; ``random`` also
draws its subset from ``train.seed + s``. A value method's subset depends only on
the values, so across seeds only the training randomness changes.

``pruning.parquet`` holds one row per (method, direction, fraction, seed); the
rows of one direction are replaced as a whole each time that direction is run, so
``low`` and ``high`` results live side by side. Each finished retrain is also appended to a
journal in the run folder (``pruning-<direction>.partial.jsonl``) until the table is written,
so that a prune stopped part-way (Ctrl-C, a crash) continues where it stopped when run again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .choices import METHOD_NAMES
from .digests import check_same_data
from .errors import UserError
from .recipe import Recipe
from .run_tables import value_column
from .runio import RunFolder, atomic_write, name_the_file
from .threads import intra_op_threads, recorded_threads

if TYPE_CHECKING:
    from .data import Dataset

FULL = "full"
RANDOM = "random"
# removes the examples whose label was flipped first, then random clean ones: what a perfect
# mislabel detector would reach at each fraction (only for data with injected label noise)
ORACLE = "oracle"
BASELINES = (RANDOM, ORACLE)
DIRECTIONS = ("low", "high")
PRUNING_FILE = "pruning.parquet"
METHOD_CHOICES = ", ".join([*METHOD_NAMES, *BASELINES])
COLUMNS = [
    "method",
    "direction",
    "frac",
    "seed",
    "train_seed",
    "test_accuracy",
    "test_loss",
    "n_kept",
    "n_removed",
    "noisy_share_removed",
]


# --------------------------------------------------------------------------- checking the request


def check_fracs(fracs: Iterable[float]) -> list[float]:
    """The distinct fractions, sorted; each must lie strictly between 0 and 1."""
    out = sorted({float(f) for f in fracs})
    if not out:
        raise UserError("give at least one fraction to remove with --frac (e.g. --frac 0.3).")
    bad = [f for f in out if not (math.isfinite(f) and 0.0 < f < 1.0)]
    if bad:
        raise UserError(
            f"--frac {bad[0]:g} is not allowed; expected a fraction of the training set strictly "
            "between 0 and 1 (e.g. --frac 0.3 removes 30%)."
        )
    return out


def check_prune_methods(
    methods: Iterable[str], available: Sequence[str], *, noisy: bool, direction: str = "low"
) -> list[str]:
    """The requested methods in order, without repeats; each must be a baseline or valued in the run.

    ``noisy``: the data has injected label noise (else ``oracle`` has nothing to find)."""
    out = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    if not out:
        raise UserError(f"--by names no method; expected some of: {METHOD_CHOICES}.")
    for m in out:
        if m not in BASELINES and m not in METHOD_NAMES:
            raise UserError(f"--by names the unknown method {m!r}; expected some of: {METHOD_CHOICES}.")
        why = oracle_blocker(noisy, direction) if m == ORACLE else None
        if why:
            raise UserError(
                f"--by oracle removes the examples whose label was flipped first, but {why}; expected "
                "a run with data.label_noise > 0 and --remove low."
            )
        if m not in BASELINES and m not in available:
            have = ", ".join(available) if available else "none (it was trained with attribution off)"
            raise UserError(
                f"--by asks for {m!r}, but the run has no {value_column(m)} column in values.parquet; "
                f"its valued methods are: {have}. Pick among those or retrain with that method."
            )
    return out


def oracle_blocker(noisy: bool, direction: str) -> str | None:
    """Why the oracle has nothing to do here (None: it has)."""
    if not noisy:
        return "the run's data has no flipped labels"
    if direction != "low":
        return "it has no values to rank high"
    return None


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise UserError(
            f"--remove is {direction!r}; expected low (drop the lowest-valued examples) or high "
            "(drop the highest-valued ones, the sanity check)."
        )
    return direction


MAX_SEEDS = 1000  # retrains per method and fraction: more is a typo, which would run for weeks


def check_seeds(seeds: int) -> int:
    if not 1 <= seeds <= MAX_SEEDS:
        raise UserError(f"--seeds is {seeds}; expected 1 to {MAX_SEEDS} retrains per method and fraction.")
    return seeds


def n_to_remove(n: int, frac: float) -> int:
    """round(frac * n), halves rounded up; must leave at least one example and remove at least one."""
    k = int(math.floor(frac * n + 0.5))
    if k < 1 or k > n - 1:
        raise UserError(
            f"--frac {frac:g} of the {n} training examples removes {k}, which leaves "
            f"{'nothing to prune' if k < 1 else 'nothing to train on'}; expected a fraction that removes "
            f"between 1 and {n - 1} examples."
        )
    return k


# --------------------------------------------------------------------------- which examples go


def select_removed(values: np.ndarray, n_remove: int, direction: str = "low") -> np.ndarray:
    """Positions of the ``n_remove`` lowest (``low``) or highest (``high``) values, ascending.

    Ties are broken by position (the earlier example goes first) in both directions,
    so the choice is deterministic.
    """
    values = np.asarray(values, dtype=np.float64)
    pos = np.arange(len(values))
    key = values if direction == "low" else -values
    order = np.lexsort((pos, key))  # last key is the primary one
    return np.sort(order[:n_remove])


def random_removed(n: int, n_remove: int, seed: int) -> np.ndarray:
    """``n_remove`` positions drawn uniformly from ``seed``; for one seed, a smaller fraction's
    subset is contained in a larger one's (a prefix of the same permutation)."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:n_remove])


def oracle_removed(is_noisy: np.ndarray, n_remove: int, seed: int) -> np.ndarray:
    """The flipped-label examples first, then clean ones, each group in a random order drawn
    from ``seed``: the subset a perfect mislabel detector would remove."""
    order = np.random.default_rng(seed).permutation(len(is_noisy))
    ranked = np.r_[order[is_noisy[order]], order[~is_noisy[order]]]
    return np.sort(ranked[:n_remove])


def kept_positions(n: int, removed: np.ndarray) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[removed] = False
    return np.flatnonzero(keep)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Retrain:
    """One retrain: which examples are removed and with which training seed."""

    method: str
    direction: str
    frac: float  # 0 for the full-data reference
    seed: int  # offset s: the retrain uses train.seed + s
    train_seed: int
    removed: np.ndarray  # positions into the training split

    @property
    def label(self) -> str:
        if self.method == FULL:
            return f"full data, seed {self.seed}"
        return f"{self.method} {self.direction} {self.frac:.0%}, seed {self.seed}"


def aligned_values(folder: RunFolder, data, methods: Sequence[str]) -> dict[str, np.ndarray]:
    """``value_<method>`` of values.parquet in the order of the training split ``data``.

    Fails when values.parquet and the run's dataset disagree (other ids, labels, noise
    flags, ...), since the subsets would then be wrong.
    """
    df = folder.values()
    ids = data.example_id.numpy()
    if "example_id" not in df.columns or len(df) != len(ids) or set(df["example_id"]) != set(ids.tolist()):
        raise UserError(
            f"values.parquet of run {folder.name!r} does not list the training examples of its recipe's "
            f"dataset ({len(df)} rows vs {len(ids)} examples); expected the files of one complete run."
        )
    df = df.set_index("example_id").loc[ids]
    for col, expected in data.example_columns().items():
        if col in df.columns and list(df[col]) != list(expected):
            raise UserError(
                f"the column {col!r} of values.parquet of run {folder.name!r} differs from its recipe's "
                "dataset; the data source changed since the run was trained. Retrain it first."
            )
    # finite: the run's require_complete checked
    return {m: df[value_column(m)].to_numpy(dtype=np.float64) for m in methods}


def plan_retrains(
    values: dict[str, np.ndarray],
    is_noisy: np.ndarray,
    *,
    methods: Sequence[str],
    fracs: Sequence[float],
    seeds: int,
    direction: str,
    base_seed: int,
) -> list[Retrain]:
    """Every retrain, seed by seed: the full-data reference, then each method at each fraction."""
    none = np.zeros(0, dtype=np.int64)
    n = len(is_noisy)
    jobs = []
    for s in range(seeds):
        train_seed = base_seed + s
        jobs.append(Retrain(FULL, direction, 0.0, s, train_seed, none))
        for m in methods:
            for f in fracs:
                k = n_to_remove(n, f)
                if m == RANDOM:
                    removed = random_removed(n, k, train_seed)
                elif m == ORACLE:
                    removed = oracle_removed(is_noisy, k, train_seed)
                else:
                    removed = select_removed(values[m], k, direction)
                jobs.append(Retrain(m, direction, f, s, train_seed, removed))
    return jobs


@dataclass
class PrunePlan:
    """A checked request: the run's recipe and dataset, and every retrain to do."""

    folder: RunFolder
    recipe: Recipe
    data: Dataset  # on the CPU
    methods: list[str]
    fracs: list[float]
    seeds: int
    direction: str
    jobs: list[Retrain]
    # the run's intra-op thread count, which the retrains take: with another, even seed 0's would round
    # its sums apart from the run's and leave its trajectory (threads.py)
    threads: int | None = None


def plan_for_run(
    folder: RunFolder,
    *,
    fracs: Iterable[float],
    methods: Iterable[str] | None = None,
    seeds: int = 1,
    direction: str = "low",
) -> PrunePlan:
    """Check everything about the request and the run, then plan; writes nothing.

    ``methods=None`` means every method the run valued, then ``random``, then ``oracle``
    where the data has injected label noise and the lowest-valued are removed.
    """
    from .data import load_dataset

    fracs = check_fracs(fracs)
    direction = check_direction(direction)
    seeds = check_seeds(seeds)
    folder.require_complete()
    available = folder.methods()
    if not available:
        raise UserError(
            f"run {folder.name!r} has no values (values.parquet holds no value_<method> column; was it "
            "trained with attribution off?); expected a run trained with attribution.enabled: true."
        )
    recipe = folder.recipe()
    data = load_dataset(recipe.data, image=recipe.model.kind == "cnn")
    check_same_data(folder, data)
    is_noisy = data.is_noisy.numpy().astype(bool)
    noisy = bool(is_noisy.any())
    if methods is None:
        methods = [*available, RANDOM, *([ORACLE] if oracle_blocker(noisy, direction) is None else [])]
    methods = check_prune_methods(methods, available, noisy=noisy, direction=direction)
    values = aligned_values(folder, data, [m for m in methods if m not in BASELINES])
    jobs = plan_retrains(
        values,
        is_noisy,
        methods=methods,
        fracs=fracs,
        seeds=seeds,
        direction=direction,
        base_seed=recipe.train.seed,
    )
    threads = recorded_threads(folder.metrics())
    return PrunePlan(folder, recipe, data, methods, fracs, seeds, direction, jobs, threads)


# --------------------------------------------------------------------------- retraining


def with_seed(recipe: Recipe, seed: int) -> Recipe:
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"seed": seed})})


def retrain(job: Retrain, recipe: Recipe, data) -> dict:
    """Train ``recipe`` (seeded with ``job.train_seed``) without ``job.removed``; one result row."""
    from .train import train

    n = data.n_train
    keep = kept_positions(n, job.removed)
    seeded = with_seed(recipe, job.train_seed)
    # the test split's metrics alone, and no validation loss per step: a retrain reads neither
    result = train(seeded, data=data, keep=keep, attribution=False, splits=("test",), measure_val_loss=False)
    noisy = data.is_noisy.numpy()
    share = float(noisy[job.removed].mean()) if len(job.removed) and noisy.any() else float("nan")
    return {
        "method": job.method,
        "direction": job.direction,
        "frac": job.frac,
        "seed": job.seed,
        "train_seed": job.train_seed,
        "test_accuracy": float(result.metrics["test_accuracy"]),
        "test_loss": float(result.metrics["test_loss"]),
        "n_kept": len(keep),
        "n_removed": len(job.removed),
        "noisy_share_removed": share,
    }


def job_key(job: Retrain) -> str:
    """What determines a retrain's result within one run: method, fraction, seeds and the subset."""
    subset = hashlib.sha256(np.sort(job.removed).astype(np.int64).tobytes()).hexdigest()[:16]
    return f"{job.method}|{job.direction}|{job.frac!r}|{job.seed}|{job.train_seed}|{subset}"


class Journal:
    """The finished retrains of one prune, one JSON line each (key and row), appended as they end."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        done = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    done[entry["key"]] = entry["row"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill mid-write: that retrain runs again
        return done

    def finished(self, jobs: Sequence[Retrain]) -> int:
        """How many of ``jobs`` the journal already holds."""
        done = self.load()
        return sum(job_key(job) in done for job in jobs)

    def add(self, key: str, row: dict) -> None:
        try:
            self._append(json.dumps({"key": key, "row": row}) + "\n")
        except OSError as e:
            name_the_file(e, self.path)
            raise

    def _append(self, line: str) -> None:
        with open(self.path, "ab+") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line  # after a torn line, start a fresh one (appends go to the end)
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def journal_for(folder: RunFolder, direction: str) -> Journal:
    return Journal(folder.file(f"pruning-{direction}.partial.jsonl"))


def run_plan(
    jobs: Sequence[Retrain],
    recipe: Recipe,
    data,
    on_done: Callable[[Retrain, dict], None] | None = None,
    journal: Journal | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """Retrain every job in turn, reusing those ``journal`` already holds; ``on_done(job, row)``
    after each (progress); ``threads``: the intra-op thread count they train with (None: as set)."""
    done = journal.load() if journal is not None else {}
    rows = []
    for job in jobs:
        key = job_key(job)
        row = done.get(key)
        if row is None:
            with intra_op_threads(threads):
                row = retrain(job, recipe, data)
            if journal is not None:
                journal.add(key, row)
        rows.append(row)
        if on_done is not None:
            on_done(job, row)
    return results_frame(rows)


def results_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype(
        {
            "method": str,
            "direction": str,
            "frac": "float64",
            "seed": "int64",
            "train_seed": "int64",
            "test_accuracy": "float64",
            "test_loss": "float64",
            "n_kept": "int64",
            "n_removed": "int64",
            "noisy_share_removed": "float64",
        }
    )


# --------------------------------------------------------------------------- summaries and outputs


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (over seeds) per (method, frac), in the order the methods first appear."""
    order = list(dict.fromkeys(df["method"]))
    g = df.groupby(["method", "frac"], sort=False)
    out = g.agg(
        acc_mean=("test_accuracy", "mean"),
        acc_std=("test_accuracy", "std"),
        loss_mean=("test_loss", "mean"),
        noisy_share=("noisy_share_removed", "mean"),
        n_kept=("n_kept", "first"),
        n_seeds=("seed", "nunique"),
    ).reset_index()
    out["_m"] = out["method"].map(order.index)
    return out.sort_values(["_m", "frac"], kind="stable").drop(columns="_m").reset_index(drop=True)


def merge_direction(folder: RunFolder, df: pd.DataFrame) -> pd.DataFrame:
    """The existing pruning.parquet's rows of the *other* directions, plus ``df``."""
    path = folder.file(PRUNING_FILE)
    if not path.is_file():
        return df
    try:
        old = pd.read_parquet(path)
    except Exception:  # noqa: BLE001 -- an unreadable old table is replaced
        return df
    if "direction" not in old.columns:
        return df
    others = old[~old["direction"].isin(set(df["direction"]))]
    return pd.concat([others.reindex(columns=df.columns), df], ignore_index=True) if len(others) else df


def plot_accuracy(summary: pd.DataFrame, path: Path, title: str) -> Path:
    """Test accuracy against the fraction removed, one line per method (mean ± std), PNG."""
    from .report import figure

    fig, axes = figure(1, 1, (6.4, 4.2), dpi=120)
    ax = axes[0, 0]
    full = summary[summary["method"] == FULL]
    full_mean = float(full["acc_mean"].iloc[0]) if len(full) else None
    if full_mean is not None:
        ax.axhline(full_mean, color="0.4", ls="--", lw=1, label="full data")
    for method, part in summary[summary["method"] != FULL].groupby("method", sort=False):
        x, y = part["frac"].to_numpy(), part["acc_mean"].to_numpy()
        err = part["acc_std"].fillna(0.0).to_numpy()
        if full_mean is not None:  # every curve starts at the full-data model
            x, y, err = (
                np.r_[0.0, x],
                np.r_[full_mean, y],
                np.r_[float(full["acc_std"].fillna(0.0).iloc[0]), err],
            )
        style = {RANDOM: {"ls": ":", "color": "0.2"}, ORACLE: {"ls": "--", "color": "0.6"}}.get(method, {})
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=method, **style)
    ax.set_xlabel("fraction of the training set removed")
    seeds = int(summary["n_seeds"].max())
    ax.set_ylabel("test accuracy" + (f" (mean ± std, {seeds} seeds)" if seeds > 1 else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_path(folder: RunFolder, direction: str) -> Path:
    return folder.file(f"pruning-{direction}.png")


def write_outputs(folder: RunFolder, df: pd.DataFrame, direction: str) -> tuple[Path, Path]:
    """pruning.parquet (merged with the other direction's rows) and this direction's plot."""
    table = folder.file(PRUNING_FILE)
    folder.write_parquet(PRUNING_FILE, merge_direction(folder, df))
    title = f"{folder.name}: retrained after removing the {direction}est-valued examples"
    png = plot_accuracy(summarise(df), plot_path(folder, direction), title)
    return table, png
