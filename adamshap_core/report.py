"""Shared report helpers: rich tables and PNG plots (matplotlib, Agg backend, rendered in memory).

Plots are returned as PNG bytes so that a command can compute all of its outputs before it
writes any of them (``runio.atomic_write_bytes`` writes one).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from rich.table import Table

from .run_tables import value_column

if TYPE_CHECKING:
    from .compare import CompareResult


# ---- generic helpers ----------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 3, spec: str | None = None) -> str:
    """``x`` to ``digits`` decimals (or to the format ``spec``); "–" where it is missing or NaN."""
    missing = x is None or (isinstance(x, float) and math.isnan(x))
    return "–" if missing else format(x, spec or f".{digits}f")


def fmt_ratio(x: float | None) -> str:
    """A small ratio (a noise level, say) to two significant digits: 4.5e-05 rather than 0.0000."""
    return fmt(x, spec=".2g")


def fmt_pair(pearson: float, spearman: float) -> str:
    """A correlation cell: Pearson, with Spearman in grey."""
    if math.isnan(pearson) and math.isnan(spearman):
        return "–"
    return f"{fmt(pearson)} [dim]/ {fmt(spearman)}[/]"


def new_table(title: str, first: str, columns: Sequence[str], caption: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    table.add_column(first, justify="left")
    for c in columns:
        table.add_column(c, justify="right", overflow="fold")
    return table


def figure(nrows: int, ncols: int, size: tuple[float, float], dpi: float = 110):
    """A figure on an Agg canvas of its own, and its axes [nrows, ncols]. pyplot is not involved, so
    a caller's backend and open figures (a notebook's, say) stay as they were."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def scatter_marked(ax, x, y, marked=None, label_marked: str = "noisy") -> None:
    """One dot per example; examples with ``marked`` true drawn as red crosses."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if marked is None:
        ax.scatter(x, y, s=8, alpha=0.6, color="tab:blue", linewidths=0)
        return
    marked = np.asarray(marked, dtype=bool)
    ax.scatter(x[~marked], y[~marked], s=8, alpha=0.5, color="tab:blue", linewidths=0, label="clean")
    ax.scatter(x[marked], y[marked], s=14, alpha=0.8, color="tab:red", marker="x", label=label_marked)
    ax.legend(loc="best", fontsize=8)


# ---- compare ------------------------------------------------------------------------------------


def _corr(table: pd.DataFrame, method: str, ground_truth: str, scope: str) -> tuple[float, float]:
    row = table[
        (table["method"] == method) & (table["ground_truth"] == ground_truth) & (table["scope"] == scope)
    ]
    return (
        (float(row["pearson"].iloc[0]), float(row["spearman"].iloc[0])) if len(row) else (math.nan, math.nan)
    )


def _median_over(table: pd.DataFrame, method: str, ground_truth: str, steps: Sequence[int]):
    rows = table[
        (table["method"] == method)
        & (table["ground_truth"] == ground_truth)
        & (table["scope"].isin([str(s) for s in steps]))
    ]
    if rows.empty:
        return math.nan, math.nan
    return float(rows["pearson"].median()), float(rows["spearman"].median())


def _step_count(table: pd.DataFrame, ground_truth: str, steps: Sequence[int], methods: Sequence[str]) -> str:
    """How many of ``steps`` the medians are over: those where a method has a correlation (a step of
    fewer than three examples, or of equal values, has none, and the median leaves it out)."""
    rows = table[(table["ground_truth"] == ground_truth) & (table["scope"].isin([str(s) for s in steps]))]
    counted = rows[rows["pearson"].notna()].groupby("method")["scope"].nunique()
    counts = {m: int(counted.get(m, 0)) for m in methods}
    if len(set(counts.values())) == 1:
        n = next(iter(counts.values()))
        return str(n) if n == len(steps) else f"{n} of {len(steps)} with a correlation"
    fewer = ", ".join(f"{m} {n}" for m, n in counts.items() if n < len(steps))
    return f"{len(steps)}; with a correlation: {fewer}"


def compare_summary_table(result: CompareResult) -> Table:
    """Methods as columns; early steps, steps 2–5, later steps, cumulative and AUROC as rows."""
    t, methods, ev = result.table, result.methods, result.evaluated
    groups = [
        ("early steps, t ≤ 5", [s for s in ev if s <= 5]),
        ("steps 2–5", [s for s in ev if 2 <= s <= 5]),
        ("later steps, t > 5", [s for s in ev if s > 5]),
        ("all evaluated steps", list(ev)),
    ]
    table = new_table(
        f"compare: Pearson [dim]/ Spearman[/] of each method's values against the ground truth "
        f"(run {result.summary['run']})",
        "",
        methods,
        caption="per-step rows: median over the steps (count in brackets); cumulative: every example's "
        "value summed over the run",
    )
    has_cumulative = (t["scope"] == "cumulative").any() and result.summary.get("cumulative")
    for gt_name, label in (("shapley", "MC Shapley"), ("loo", "exact LOO")):
        table.add_row(f"[bold]vs {label}[/]", *[""] * len(methods))
        for name, steps in groups if gt_name == "shapley" else groups[3:]:
            if steps:
                cells = [fmt_pair(*_median_over(t, m, gt_name, steps)) for m in methods]
                table.add_row(f"  {name} ({_step_count(t, gt_name, steps, methods)})", *cells)
        if has_cumulative:
            table.add_row("  cumulative", *[fmt_pair(*_corr(t, m, gt_name, "cumulative")) for m in methods])
        without_first = result.summary.get("cumulative_from_step_2")
        if gt_name == "shapley" and without_first:
            cells = [fmt_pair(without_first[m]["pearson"], without_first[m]["spearman"]) for m in methods]
            table.add_row("  cumulative, steps ≥ 2", *cells)
        table.add_section()
    base = result.baseline
    table.add_row(
        f"vs {base} (run's values)",
        *["" if m == base else fmt_pair(*_corr(t, m, base, "cumulative")) for m in methods],
    )
    auc = t[t["ground_truth"] == "is_noisy"].set_index("method")["auroc"]
    if len(auc):
        table.add_row("mislabel AUROC (low ⇒ noisy)", *[fmt(float(auc.get(m, math.nan))) for m in methods])
    return table


def compare_steps_table(result: CompareResult) -> Table:
    """One row per evaluated step: each method's Pearson against MC Shapley, and the MC noise."""
    t = result.table
    table = new_table(
        "per step: Pearson against MC Shapley",
        "step",
        [*result.methods, "MC se/sd"],
        caption="MC se/sd: median standard error of the Shapley estimates over their spread",
    )
    noise = {s["step"]: s["se_over_sd"] for s in result.summary["per_step"]}
    for step in result.evaluated:
        cells = [fmt(_corr(t, m, "shapley", str(step))[0]) for m in result.methods]
        table.add_row(str(step), *cells, fmt_ratio(noise.get(step, math.nan)))
    return table


def divergence_table(result: CompareResult) -> Table | None:
    """Per layer: how the baseline's value splits over the layers vs adam's, and how well they agree there."""
    div = result.summary["divergence"]
    if not div["layers"] or div["baseline"] == "adam":  # a run valued by adam alone: nothing to set against
        return None
    base = div["baseline"]
    table = new_table(
        f"where {base} departs from adam, by parameter tensor (median over the steps of each phase)",
        "layer",
        [f"{base} share", "adam share", f"r {base}~adam", "Adam IQR"],
        caption="share: the tensor's part of Σ|contribution| over the batch's examples and the tensors; "
        "r: Pearson of the two methods' "
        "contributions through this tensor; Adam IQR: interquartile range of log10 of Adam's "
        "per-coordinate scale P (decades)",
    )
    phase = None
    for row in div["layers"]:
        if row["phase"] != phase:
            if phase is not None:
                table.add_section()
            phase = row["phase"]
            table.add_row(f"[bold]{phase}[/]", "", "", "", "")
        table.add_row(
            f"  {row['layer']}",
            fmt(row["share_baseline"]),
            fmt(row["share_adam"]),
            fmt(row["pearson_baseline_vs_adam"]),
            fmt(row["adam_scale_log10_iqr"], 2),
        )
    return table


COMPARE_PLOTS = ("compare_values.png", "compare_steps.png", "compare_pearson.png")  # all compare_plots draws


def compare_plots(result: CompareResult) -> dict[str, bytes]:
    """``compare_values.png`` (baseline vs adam, one dot per example), ``compare_steps.png`` (each
    method against MC Shapley at an early and a late step, and cumulative), ``compare_pearson.png``."""
    plots = {}
    others = [m for m in result.methods if m != result.baseline]
    if others:
        plots["compare_values.png"] = _baseline_plot(result, "adam" if "adam" in others else others[0])
    plots["compare_steps.png"] = _truth_grid(result)
    if len(result.evaluated) > 1:
        plots["compare_pearson.png"] = _pearson_by_step(result)
    return plots


def _baseline_plot(result: CompareResult, method: str) -> bytes:
    """``method`` against the baseline, each example's values summed over the run (values.parquet:
    also with --no-cumulative, whose ground truth has no summed rows)."""
    values = result.values
    fig, axes = figure(1, 1, (5.5, 5))
    ax = axes[0, 0]
    x, y = values[value_column(result.baseline)], values[value_column(method)]
    scatter_marked(
        ax, x, y, values["is_noisy"] if "is_noisy" in values and values["is_noisy"].any() else None
    )
    p, s = _corr(result.table, method, result.baseline, "cumulative")
    ax.set_xlabel(value_column(result.baseline))
    ax.set_ylabel(value_column(method))
    ax.set_title(f"{method} vs {result.baseline}, summed over the run\nPearson {fmt(p)}, Spearman {fmt(s)}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    return _png(fig)


def _truth_grid(result: CompareResult) -> bytes:
    ev = result.evaluated
    early = 2 if 2 in ev else ev[0]
    scopes = [str(early)] + ([str(ev[-1])] if ev[-1] != early else [])
    if (result.truth["scope"] == "cumulative").any():
        scopes.append("cumulative")
    methods = result.methods
    fig, axes = figure(len(scopes), len(methods), (3.6 * len(methods), 3.3 * len(scopes)))
    for i, scope in enumerate(scopes):
        df = result.truth[result.truth["scope"] == scope]
        for j, m in enumerate(methods):
            ax = axes[i, j]
            ax.errorbar(
                df["shapley"],
                df[value_column(m)],
                # None where no se is known: matplotlib before 3.7.2 raises on an all-NaN xerr
                xerr=df["shapley_se"] if df["shapley_se"].notna().any() else None,
                fmt="o",
                ms=3,
                alpha=0.6,
                elinewidth=0.6,
            )
            p, _ = _corr(result.table, m, "shapley", scope)
            where = "summed over the run" if scope == "cumulative" else f"step {scope}"
            ax.set_title(f"{m}, {where}: r = {fmt(p)}", fontsize=9)
            ax.set_xlabel("MC Shapley (± se)", fontsize=8)
            ax.set_ylabel(value_column(m), fontsize=8)
            ax.tick_params(labelsize=7)
    return _png(fig)


def _pearson_by_step(result: CompareResult) -> bytes:
    fig, axes = figure(1, 1, (6, 4))
    ax = axes[0, 0]
    for m in result.methods:
        ys = [_corr(result.table, m, "shapley", str(s))[0] for s in result.evaluated]
        ax.plot(result.evaluated, ys, marker="o", label=m)
    if result.evaluated[-1] / max(result.evaluated[0], 1) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("Pearson vs MC Shapley")
    ax.set_title("per-step fidelity to the real optimizer step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)
