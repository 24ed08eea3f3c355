"""``adamshap train RECIPE``: train with attribution and write ``runs/<name>/``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .common import console, err_console, user_errors


@user_errors
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/digits-mlp.yaml"),
    name: str = typer.Option(None, "--name", help="run name (default: the recipe's name)"),
    set_: list[str] = typer.Option(
        None, "--set", help="override a recipe field: --set optim.lr=3e-4 (repeatable)"
    ),
    force: bool = typer.Option(False, "--force", help="replace an existing run of the same name"),
    runs_dir: Path = typer.Option(None, "--runs-dir", help="runs folder (default: $ADAMSHAP_RUNS or ./runs)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train a model from RECIPE and value every training example as it trains."""
    from adamshap_core import runio
    from adamshap_core.recipe import load_recipe
    from adamshap_core.train import prepare, run

    rec = load_recipe(recipe, set_ or [])
    run_name = runio.check_run_name(name or rec.name)
    prep = prepare(rec)  # everything that can fail on bad input, before any folder exists
    root = runio.runs_root(runs_dir)
    folder = runio.RunFolder(runio.create_run_dir(root, run_name, force=force))
    header = runio.start_run(folder, rec, recipe_path=str(recipe))
    if not quiet:
        err_console.print(
            f"[bold]{escape(rec.name)}[/]: {escape(rec.data.source)}, {prep.data.n_train} training examples, "
            f"{rec.model.kind} on {prep.device}, {rec.optim.name} lr {rec.optim.lr:g}, "
            f"{prep.total_steps} steps; methods: {', '.join(prep.methods) or 'none (attribution off)'}"
        )
    try:
        result = run(prep, quiet=quiet)
    except BaseException as e:
        runio.fail_run(folder, header, e)
        if isinstance(e, KeyboardInterrupt):
            err_console.print(f"[yellow]interrupted; run {run_name!r} is marked incomplete.[/]")
            raise typer.Exit(130) from None
        raise
    finally:
        if prep.tracker is not None:
            prep.tracker.close()
    metrics = runio.finish_run(folder, header, result)
    print_summary(result, metrics, folder.path)


def print_summary(result, metrics: dict, path: Path) -> None:
    acc = metrics.get("test_accuracy")
    console.print(
        f"\n[bold green]done[/] in {metrics['wall_seconds']:.1f}s: test accuracy [bold]{acc:.3f}[/], "
        f"test loss {metrics['test_loss']:.4f}, val accuracy {metrics['val_accuracy']:.3f} "
        f"({result.steps_done} steps, {metrics['n_train']} training examples)"
    )
    df = result.values_frame()
    noisy = bool(df["is_noisy"].any())
    for m in result.methods:
        col = f"value_{m}"
        ranked = df.sort_values(col, ascending=False, kind="stable")
        table = Table(title=f"{m}: 5 highest and 5 lowest valued examples", title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("example_id", justify="right")
        table.add_column("value", justify="right")
        table.add_column("label", justify="right")
        if noisy:
            table.add_column("noisy")
        top, bottom = ranked.head(5), ranked.tail(5)
        for rank, (_, row) in enumerate(top.iterrows(), start=1):
            _row(table, rank, row, col, noisy)
        table.add_section()
        for rank, (_, row) in enumerate(bottom.iterrows(), start=len(ranked) - len(bottom) + 1):
            _row(table, rank, row, col, noisy)
        console.print(table)
    if noisy and result.methods:
        n_low = max(1, int(round(0.2 * len(df))))
        base = df["is_noisy"].mean()
        lines = []
        for m in result.methods:
            low = df.nsmallest(n_low, f"value_{m}", keep="first")
            share = low["is_noisy"].mean()
            lines.append(
                f"  {m:<11} {share:6.1%} noisy among the {n_low} lowest-valued (base rate {base:.1%})"
            )
        console.print("[bold]mislabel detection[/] (share of noisy examples in the lowest-valued 20%):")
        console.print("\n".join(lines), highlight=False)
    console.print(f"run folder: [bold]{escape(str(path))}[/]")


def _row(table: Table, rank: int, row, col: str, noisy: bool) -> None:
    cells = [str(rank), str(int(row["example_id"])), f"{row[col]:.3e}", str(int(row["label"]))]
    if noisy:
        cells.append("yes" if bool(row["is_noisy"]) else "")
    table.add_row(*cells)
