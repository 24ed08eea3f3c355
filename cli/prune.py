"""``adamshap prune``: remove the lowest- (or highest-) valued fraction, retrain, test."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from adamshap_core.choices import METHOD_NAMES

from .common import (
    RUNS_DIR,
    console,
    err_console,
    print_unbroken,
    progress_bar,
    split_list,
    stopped_exit_code,
    user_errors,
)

if TYPE_CHECKING:
    import pandas as pd


@user_errors
def prune(
    run: str = typer.Option(None, "--run", help="run name or folder (default: the latest run)"),
    frac: list[str] = typer.Option(
        ..., "--frac", help="fraction of the training set to remove, in (0, 1); repeatable or 0.1,0.3"
    ),
    by: list[str] = typer.Option(
        None,
        "--by",
        help=f"methods to prune by: {', '.join(METHOD_NAMES)}, random, oracle (comma-separated or repeated; "
        "default: every method the run valued, random, and oracle where labels were flipped and --remove "
        "is low). oracle removes the flipped-label examples first, then random clean ones: a perfect "
        "mislabel detector",
    ),
    seeds: int = typer.Option(
        3,
        "--seeds",
        help="retrains per method and fraction, with train.seed + 0, 1, ... (seed 0: the run's own)",
    ),
    remove: str = typer.Option(
        "low",
        "--remove",
        help="low: remove the lowest-valued examples; high: remove the highest-valued ones (the sanity "
        "check that removing the most valuable data hurts most)",
    ),
    runs_dir: str = RUNS_DIR,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Prune the training set by value, retrain from scratch with the run's recipe, compare on the test split.

    Writes pruning.parquet and pruning-<low|high>.png into the run folder. The full-data
    model and random pruning are retrained with the same seeds as every value method.
    """
    from adamshap_core import prune as pr
    from adamshap_core import runio
    from adamshap_core.locks import run_lock

    fracs, methods = parse_fracs(frac), split_list(by, "--by") if by else None  # before the run is read
    with runio.reading_run(runio.runs_root(runs_dir), run) as folder:
        plan = pr.plan_for_run(folder, fracs=fracs, methods=methods, seeds=seeds, direction=remove)
        if not quiet:
            err_console.print(
                f"[bold]{escape(folder.name)}[/]: {len(plan.jobs)} retrains of {escape(plan.recipe.name)} "
                f"({plan.data.n_train} training examples, {plan.recipe.train.epochs} epochs), removing the "
                f"{plan.direction}est-valued {', '.join(f'{f:.0%}' for f in plan.fracs)} by "
                f"{', '.join(plan.methods)}; {plan.seeds} seed(s) from train.seed {plan.recipe.train.seed}"
            )
        # one prune of a run at a time: another would retrain the same jobs into the same journal, and
        # merge its rows into pruning.parquet over this one's
        with run_lock(folder.path, "prune"):
            df = _retrain(folder, plan, quiet)
            what = f"prune's results for --remove {plan.direction}"
            earlier = runio.replaced_note(pr.plot_path(folder, plan.direction), what)  # this direction's plot
            table_path, png_path = pr.write_outputs(folder, df, plan.direction)
            pr.journal_for(folder, plan.direction).remove()
        summary = pr.summarise(df)
        print_unbroken(pruning_table(summary, plan))
        console.print(table_notes(plan, summary), highlight=False)
        wrote = f"wrote [bold]{escape(str(table_path))}[/] and [bold]{escape(str(png_path))}[/]"
        console.print(wrote + escape(earlier))


def _retrain(folder, plan, quiet: bool) -> pd.DataFrame:
    """Every retrain of ``plan``, each kept in the direction's journal as it ends, so that a prune
    stopped part-way (Ctrl-C: exit 130, SIGTERM: 143) continues where it stopped when run again."""
    from adamshap_core import prune as pr

    journal = pr.journal_for(folder, plan.direction)
    resumed = journal.finished(plan.jobs)
    if resumed:  # said even with --quiet: these rows are not retrained now
        err_console.print(
            f"continuing: {resumed} of {len(plan.jobs)} retrains were finished by an earlier prune "
            "that stopped"
        )
    try:
        return run_with_progress(plan, quiet, journal)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (common.Terminated)
        err_console.print(
            f"[yellow]stopped after {journal.finished(plan.jobs)} of {len(plan.jobs)} retrains; they are "
            f"kept in {escape(str(journal.path))}, and the same command continues from there.[/]",
            soft_wrap=True,
        )
        raise typer.Exit(stopped_exit_code(e)) from None


def parse_fracs(items: list[str]) -> list[float]:
    from adamshap_core.errors import UserError

    out = []
    for part in split_list(items, "--frac"):
        try:
            out.append(float(part))
        except ValueError:
            raise UserError(
                f"--frac {part!r} is not a number; expected a fraction strictly between 0 and 1 (e.g. 0.3)."
            ) from None
    return out


def run_with_progress(plan, quiet: bool, journal) -> pd.DataFrame:
    """Run every retrain of ``plan`` under a rich progress bar (none when ``quiet``), keeping each
    finished one in ``journal``."""
    from rich.progress import MofNCompleteColumn, TextColumn

    from adamshap_core.prune import run_plan

    if quiet:
        return run_plan(plan.jobs, plan.recipe, plan.data, journal=journal, threads=plan.threads)
    columns = (MofNCompleteColumn(), TextColumn("{task.description}"))
    progress = progress_bar("retrain", *columns)
    with progress:
        jobs = plan.jobs
        task = progress.add_task(jobs[0].label, total=len(jobs))
        done = [0]

        def advance(job, row):
            done[0] += 1
            nxt = jobs[done[0]].label if done[0] < len(jobs) else "done"
            progress.update(task, advance=1, description=f"{nxt}  (last: acc {row['test_accuracy']:.3f})")

        return run_plan(jobs, plan.recipe, plan.data, on_done=advance, journal=journal, threads=plan.threads)


def cell(mean: float, std: float, seeds: int) -> str:
    if seeds > 1 and not math.isnan(std):
        return f"{mean:.3f} ± {std:.3f}"
    return f"{mean:.3f}"


def pruning_table(summary: pd.DataFrame, plan) -> Table:
    """Methods as rows (full data on top), per fraction the test accuracy and, below it, the noisy share
    removed. In bold green, per fraction, the accuracy that shows the values right: removing the
    lowest-valued, the highest accuracy (full-data model included); removing the highest-valued, the
    lowest (the removal that hurt most). The oracle is a reference, shown dim and never highlighted."""
    from adamshap_core.prune import FULL, ORACLE, n_to_remove

    n = plan.data.n_train
    noisy_known = bool(plan.data.is_noisy.any())
    table = Table(title=f"test accuracy, {plan.direction}est-valued removed", title_justify="left")
    table.add_column("method")
    for f in plan.fracs:
        # a cell is never broken inside "mean ± std"; the noisy share has a line of its own below it (a
        # column of its own per fraction would not leave three fractions room on an 80-column terminal)
        table.add_column(f"{f:.0%} removed\n({n - n_to_remove(n, f)} kept)", justify="right", no_wrap=True)
    full = summary[summary["method"] == FULL].iloc[0]
    low = plan.direction == "low"
    shown = {FULL, *plan.methods} - {ORACLE} - (set() if low else {FULL})  # the ones highlighted
    ranked = summary[summary["method"].isin(shown)]
    in_column = {f: ranked[ranked["frac"].isin([f, 0.0])]["acc_mean"] for f in plan.fracs}
    best = {f: acc.max() if low else acc.min() for f, acc in in_column.items()}
    rows = [(FULL, {f: full for f in plan.fracs})]
    for m in plan.methods:
        part = summary[summary["method"] == m].set_index("frac")
        rows.append((m, {f: part.loc[f] for f in plan.fracs}))
    for i, (m, by_frac) in enumerate(rows):
        reference = m in (FULL, ORACLE)
        cells = [f"[dim]{m} (n={n})[/]" if m == FULL else f"[dim]{m}[/]" if reference else m]
        for f, r in by_frac.items():
            text = cell(r["acc_mean"], r["acc_std"], plan.seeds)
            if r["acc_mean"] == best[f] and m in shown:
                text = f"[bold green]{text}[/]"
            elif reference:
                text = f"[dim]{text}[/]"
            if noisy_known and m != FULL:
                text += f"\n[dim]{r['noisy_share']:.0%} noisy[/]"
            cells.append(text)
        table.add_row(*cells, end_section=i == 0)
    return table


def table_notes(plan, summary: pd.DataFrame) -> str:
    """What the table's numbers are, printed under it."""
    from adamshap_core.prune import FULL, ORACLE

    seeds = f"mean ± sample std (n − 1) over {plan.seeds} seeds" if plan.seeds > 1 else "1 seed"
    y_test = plan.data.y_test
    text = y_test.dim() > 1  # a language model's targets: its accuracy is over the tokens it predicts
    n_scored = int((y_test >= 0).sum())  # padding (-100) scores nothing
    what = (
        f"next-token accuracy on the held-out test split ({len(y_test)} texts, {n_scored} scored tokens"
        if text
        else f"test accuracy on the held-out test split ({len(y_test)} examples"
    )
    notes = (
        f"Each cell: {what}, never "
        f"used for valuation) after retraining from scratch, {seeds} (train.seed {plan.recipe.train.seed}"
        f"{f'..{plan.recipe.train.seed + plan.seeds - 1}' if plan.seeds > 1 else ''}, the same for every "
        "row). "
        + (
            "Best per column in bold green."
            if plan.direction == "low"
            else "Lowest per column in bold green: the removal that hurt most took the most useful examples."
        )
    )
    if ORACLE in plan.methods:
        notes += (
            " oracle (a reference, not a method): removes the flipped-label examples first, then random "
            "clean ones, as a perfect mislabel detector would."
        )
    if plan.data.is_noisy.any():
        base = float(plan.data.is_noisy.float().mean())
        notes += f" noisy: share of the removed examples whose label was flipped (base rate {base:.0%})."
    # the test sample's own error, which no number of training seeds shrinks: at the default 300 test
    # examples it is as large as many of the differences between rows
    p = float(summary.loc[summary["method"] == FULL, "acc_mean"].iloc[0])
    sample = f"{n_scored} test tokens" if text else f"{n_scored} test examples"
    # a text's tokens are not independent draws, so over tokens the binomial error is a lower bound
    kind = "binomial"
    if text:
        kind += " over the tokens: a lower bound, as a text's tokens are not independent"
    se = math.sqrt(p * (1 - p) / max(n_scored, 1))
    notes += (
        f" At the full data's accuracy ({p:.3f}), the {sample} alone give each cell a standard "
        f"error of about ±{se:.3f} ({kind}), not included in ± over seeds; a larger data.test_size "
        "narrows it."
    )
    return notes
