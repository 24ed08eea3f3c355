"""``adamshap runs``: list the runs in the runs folder."""

from __future__ import annotations

from rich.console import JustifyMethod
from rich.markup import escape
from rich.table import Table

from .common import RUNS_DIR, console, fit_columns, user_errors


@user_errors
def runs(
    runs_dir: str = RUNS_DIR,
) -> None:
    """List runs: name, recipe, date, test accuracy, methods, status."""
    from adamshap_core import runio
    from adamshap_core.locks import holder, is_locked

    root = runio.runs_root(runs_dir)
    folders = runio.list_runs(root)
    if not folders:
        console.print(
            f"no runs under {escape(str(root))}; start one with `adamshap train recipes/digits-mlp.yaml`"
        )
        return
    table = Table(title=f"runs in {root}", title_justify="left")
    columns: list[tuple[str, JustifyMethod]] = [
        ("name", "left"),
        ("recipe", "left"),
        ("date", "left"),
        ("test acc", "right"),
        ("methods", "left"),
        ("status", "left"),
    ]
    for col, just in columns:
        # a run name is typed back into --run: never broken; where room is short the other cells fold
        # (the widest first, a recipe's name before all else), so that no character is hidden
        table.add_column(col, justify=just, no_wrap=col == "name", overflow="fold")
    for f in folders:
        m = f.metrics()  # read once per run
        acc = m.get("test_accuracy")
        status = runio.text_field(m, "status") or "unknown"
        style = {"complete": "green", "incomplete": "yellow"}.get(status, "red")
        if is_locked(f.path):  # an incomplete run still training is not one that stopped
            status = f"{status}, written by {holder(f.path)}"
        table.add_row(
            escape(f.name),
            escape(runio.text_field(m, "recipe") or "?"),
            (runio.text_field(m, "created") or "")[:19].replace("T", " "),
            f"{acc:.3f}" if isinstance(acc, int | float) else "-",
            ", ".join(runio.recorded_methods(m)) or "-",
            f"[{style}]{escape(status)}[/]",
        )
    console.print(fit_columns(table, console.width) or table)  # too narrow: rich's own fitting
