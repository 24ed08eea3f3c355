"""``adamshap attribute``: which training texts taught a language-model run what a query says."""

from __future__ import annotations

import typer
from rich.console import JustifyMethod
from rich.markup import escape
from rich.progress import TextColumn
from rich.table import Table

from adamshap_core.choices import METHOD_NAMES

from .common import RUNS_DIR, console, counted, err_console, progress_bar, split_list, user_errors

SHOW_ALL_UP_TO = 10  # by default, print every query's top texts when there are at most this many
SHOW_OTHERWISE = 4  # ... else the first four (for builtin:facts: one fact at every level)


@user_errors
def attribute(
    run: str = typer.Option(None, "--run", help="run name or folder (default: the latest run)"),
    query: list[str] = typer.Option(None, "--query", help="a query text (repeatable)"),
    queries: str = typer.Option(
        None,
        "--queries",
        help="FILE.jsonl (fields: text, optional id, level, source_id, answer) or 'builtin' (the built-in "
        "queries of a builtin:facts run, the default for such runs)",
    ),
    top: int = typer.Option(10, "--top", min=1, help="training texts to print per query"),
    methods: list[str] = typer.Option(
        None,
        "--methods",
        help=f"{', '.join(METHOD_NAMES)}, bm25, random (comma-separated or repeated; default: all)",
    ),
    show: int = typer.Option(
        None,
        "--show",
        min=0,
        help=f"queries to print (default: all up to {SHOW_ALL_UP_TO}, else {SHOW_OTHERWISE})",
    ),
    score: str = typer.Option(
        "answer",
        "--score",
        help="answer: a query's utility is the loss of its answer words where it names an answer (the "
        "built-in ones do), else of its whole text; text: always the whole text",
    ),
    chunk: int = typer.Option(
        None,
        "--chunk",
        min=1,
        help="queries valued per replay of the run (default: 256, fewer where their matrices M would "
        "pass 1 GiB)",
    ),
    runs_dir: str = RUNS_DIR,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Replay a language-model run with the queries as validation targets and rank its training texts.

    Writes attribution.parquet (query_id, example_id, `value_<method>`, `rank_<method>`;
    rank 1 = most helpful), attribution_queries.parquet, attribution.json and, for queries with a
    source_id, attribution_benchmark.parquet (mean rank of the true source, recall@1, @10).
    """
    from adamshap_core import attribute as at
    from adamshap_core import runio

    with runio.reading_run(runio.runs_root(runs_dir), run) as folder:
        plan = at.plan(
            folder,
            texts=query or None,
            queries_file=queries,
            methods=None if methods is None else split_list(methods, "--methods"),
            chunk=chunk,
            score=score,
        )
        if not quiet:
            err_console.print(
                f"[bold]{escape(folder.name)}[/]: {counted(len(plan.queries), 'query', 'queries')} against "
                f"{plan.data.n_train} training texts; replaying {plan.total_steps} steps for "
                f"{', '.join(plan.valued) or 'no value method'}"
            )
        result = _run_with_progress(plan, quiet)
        earlier = runio.replaced_note(plan.folder.file("attribution.json"), "attribution's results")
        paths = at.write_outputs(plan, result)
        _print_unknown_words(result)
        n_show = (
            show
            if show is not None
            else (len(result.queries) if len(result.queries) <= SHOW_ALL_UP_TO else SHOW_OTHERWISE)
        )
        for q in range(min(n_show, len(result.queries))):
            console.print(query_table(result, q, top))
        if result.queries.has_sources:
            console.print(benchmark_table(result.benchmark()))
        _print_replay(result)
        console.print(
            f"wrote [bold]{escape(str(paths['values']))}[/] and {len(paths) - 1} more file(s) beside it"
            + escape(earlier)
        )


def _run_with_progress(plan, quiet: bool):
    from adamshap_core import attribute as at

    if quiet or not plan.total_steps:
        return at.attribute(plan)
    progress = progress_bar("replay", TextColumn("step {task.completed}/{task.total}"))
    with progress:
        task = progress.add_task("replay", total=plan.total_steps)
        return at.attribute(plan, on_step=lambda: progress.advance(task))


def query_table(result, q: int, top: int) -> Table:
    """The ``top`` training texts of query ``q`` under each method, the true source marked."""
    qs = result.queries
    level = f" [{qs.levels[q]}]" if qs.levels[q] else ""
    source = qs.source_ids[q]
    src_note = f", true source #{source}" if source is not None else ""
    if result.scored[q] == "answer":
        src_note += f", scoring {qs.answers[q]!r}"
    table = Table(
        title=f"{escape(qs.where(q))}{escape(level)}: {escape(qs.texts[q])!r}{src_note}",
        title_justify="left",
        show_lines=False,
    )
    table.add_column("#", justify="right")
    for m in result.methods:
        table.add_column(m)
    order = {m: (-s[:, q]).argsort(kind="stable")[:top] for m, s in result.scores.items()}
    for r in range(min(top, len(result.example_ids))):
        cells = [str(r + 1)]
        for m in result.methods:
            i = order[m][r]
            eid = int(result.example_ids[i])
            text = escape(result.texts[i])
            cell = f"{text}\n[dim]#{eid}  {result.scores[m][i, q]:+.2e}[/]"
            cells.append(f"[bold green]✓ {cell}[/]" if eid == source else cell)
        table.add_row(*cells)
    return table


def benchmark_table(bench) -> Table:
    n_train = int(bench["n_train"].iloc[0])
    table = Table(
        title=f"rank of the true source among {n_train} training texts (1 = top)",
        title_justify="left",
    )
    columns: list[tuple[str, JustifyMethod]] = [
        ("level", "left"),
        ("method", "left"),
        ("queries", "right"),
        ("mean rank", "right"),
        ("recall@1", "right"),
        ("recall@10", "right"),
    ]
    for col, just in columns:
        table.add_column(col, justify=just, overflow="fold")  # a number too wide wraps, never loses its end
    best = bench[bench["method"] != "random"].groupby("level")["mean_rank"].min()
    previous = None
    for _, row in bench.iterrows():
        if previous is not None and row["level"] != previous:
            table.add_section()
        previous = row["level"]
        mean = f"{row['mean_rank']:.1f}"
        if row["method"] != "random" and row["mean_rank"] == best[row["level"]]:
            mean = f"[bold]{mean}[/]"
        table.add_row(
            escape(row["level"]),
            row["method"],
            str(row["n_queries"]),
            mean,
            f"{row['recall_at_1']:.2f}",
            f"{row['recall_at_10']:.2f}",
        )
    return table


def _print_unknown_words(result) -> None:
    unknown = [(i, u) for i, u in enumerate(result.unknown_words) if u]
    if not unknown:
        return
    words = sorted({w for _, u in unknown for w in u})
    shown = ", ".join(words[:12]) + (" ..." if len(words) > 12 else "")
    err_console.print(
        f"note: words the training corpus never had, read as <unk>, in {len(unknown)} of "
        f"{counted(len(result.unknown_words), 'query', 'queries')}: {escape(shown)}",
        highlight=False,
    )


def _print_replay(result) -> None:
    r = result.replay
    if r is None:
        return
    if r.matches_run is False:
        err_console.print(
            "[yellow]warning: the replay ended with other parameters than the run (params_sha256 differs), "
            "so these values describe a neighbouring trajectory; on the CPU this means the data, the code or "
            "the torch build changed since the run, or the run fused its validation rows into the batch "
            "(attribution.fuse_validation), which rounds its updates otherwise than plain training.[/]"
        )
    recall = (
        f"; the model recalls {result.fact_recall:.0%} of the facts" if result.fact_recall is not None else ""
    )
    check = {
        True: "replay matched the run bit for bit",
        False: "replay did NOT match the run",
        None: "run recorded no digest",
    }
    console.print(f"{r.replays} replay(s) in {result.wall_seconds:.1f}s; {check[r.matches_run]}{recall}")
