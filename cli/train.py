"""``adamshap train RECIPE``: train with attribution and write ``runs/<name>/``;
``adamshap train --resume RUN`` continues a stopped run from its last checkpoint."""

from __future__ import annotations

import math
import shlex
import shutil
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from adamshap_core.errors import UserError

from .common import (
    RUNS_DIR,
    console,
    counted,
    err_console,
    file_system_problem,
    progress_bar,
    stopped_exit_code,
    user_errors,
)


@user_errors
def train(
    recipe: Path = typer.Argument(
        None, metavar="RECIPE", help="YAML recipe, e.g. recipes/digits-mlp.yaml (omitted with --resume)"
    ),
    name: str = typer.Option(None, "--name", help="run name (default: the recipe's name)"),
    set_: list[str] = typer.Option(
        None, "--set", help="override a recipe field: --set optim.lr=3e-4 (repeatable)"
    ),
    force: bool = typer.Option(False, "--force", help="replace an existing run of the same name"),
    runs_dir: str = RUNS_DIR,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar, notes or opening line"),
    resume: str = typer.Option(
        None, "--resume", metavar="RUN", help="continue the stopped run RUN from its last checkpoint"
    ),
) -> None:
    """Train a model from RECIPE and value every training example as it trains.

    Ctrl-C stops after the current step and saves a checkpoint; `--resume RUN` continues from it.
    """
    from adamshap_core import runio
    from adamshap_core.checkpoint import remove_stale_temp_files
    from adamshap_core.locks import run_lock
    from adamshap_core.recipe import load_recipe
    from adamshap_core.train import prepare

    root = runio.runs_root(runs_dir)
    if resume is not None:
        given = [
            o for o, v in (("RECIPE", recipe), ("--set", set_), ("--name", name), ("--force", force)) if v
        ]
        if given:
            raise UserError(
                f"--resume continues run {resume!r} with the recipe it started with, so {', '.join(given)} "
                "cannot be given with it; expected only --resume RUN (and --runs-dir, --quiet)."
            )
        folder = _resumable_run(root, resume)
    else:
        if recipe is None:
            raise UserError(
                "missing RECIPE: expected a YAML recipe to train (e.g. recipes/digits-mlp.yaml), "
                "or --resume RUN to continue a stopped run."
            )
        rec = load_recipe(recipe, set_ or [])
        run_name = runio.check_run_name(rec.name if name is None else name)
        runio.refuse_taken(root, run_name, force=force)  # at once, before the data is loaded
        prep = prepare(rec)
        folder = runio.RunFolder(runio.create_run_dir(root, run_name, force=force))
    with run_lock(folder.path):
        try:
            if resume is not None:
                _resumable_run(root, resume)  # again, now that no other process can finish it meanwhile
                remove_stale_temp_files(folder.path)  # half-written files of the killed process
                rec = load_recipe(folder.file("recipe.yaml"))
                prep = prepare(rec)
                start = partial(runio.resumed_header, folder)
            else:
                start = partial(runio.start_run, folder, rec, recipe_path=str(recipe))
            if not quiet:
                _print_opening(folder, rec, prep, resume is not None)
            result, metrics = _train_into(folder, start, prep, quiet, resume is not None)
        except BaseException:
            # stopped (Ctrl-C) or failed before the run was started: nothing trained, no folder left (only
            # once this process holds the lock: a folder it could not lock is another process's)
            if resume is None and not folder.file("metrics.json").exists():
                shutil.rmtree(folder.path, ignore_errors=True)
            raise
    print_summary(result, metrics, folder.path, quiet)


def _print_opening(folder, rec, prep, resume: bool) -> None:
    """The data's notes and the opening line, on stderr."""
    for note in prep.data.notes:
        err_console.print(f"note: {escape(note)}", highlight=False)
    if prep.tracker is not None and prep.tracker.rows_blocked:
        err_console.print(
            "note: attribution.fuse_validation: the validation rows take the separate pass, "
            f"{escape(prep.tracker.rows_blocked)}",
            highlight=False,
        )
    note = validation_cost_note(prep)
    if note:
        err_console.print(f"note: {escape(note)}", highlight=False)
    verb = "resuming" if resume else "training"
    err_console.print(
        f"{verb} [bold]{escape(folder.name)}[/]: {escape(rec.data.source)}, {prep.data.n_train} "
        f"training examples, {rec.model.kind} on {prep.device}, {rec.optim.name} lr "
        f"{rec.optim.lr:g}, {prep.total_steps} steps; methods: "
        f"{', '.join(prep.methods) or 'none (attribution off)'}"
    )


# a validation target of more positions than this many training batches is worth a note: on a language
# model its forward and backward are most of a valued step (200 texts against a batch of 64 took 658
# of a step's 954 ms); where its forward is small (positions times parameters, about half its
# multiply-adds), the whole step is, and the note would only be noise on a short run
VALIDATION_BATCHES_NOTED, VALIDATION_SIZE_NOTED = 2, 10**8


def validation_cost_note(prep) -> str | None:
    """A note where a language model's validation target outweighs its training batch and is large
    itself (None: it does not, nothing is valued, or ``attribution.val_batch`` or fast mode is set:
    the note's advice is taken)."""
    from adamshap_core.choices import LANGUAGE_MODELS

    a = prep.recipe.attribution
    if prep.tracker is None or prep.recipe.model.kind not in LANGUAGE_MODELS or a.val_batch or a.fast:
        return None
    rows, batch = len(prep.val_x), prep.recipe.train.batch_size
    times = prep.val_x.numel() / (batch * prep.data.x_train.shape[1])  # token positions, padding included
    size = prep.val_x.numel() * sum(p.numel() for p in prep.model.parameters())
    if times <= VALIDATION_BATCHES_NOTED or size < VALIDATION_SIZE_NOTED:
        return None
    return (
        f"the validation target ({counted(rows, 'text', 'texts')}) holds {times:.1f} times the positions of "
        f"a training batch ({counted(batch, 'text', 'texts')}), so computing its gradient takes most of each "
        "valued step; "
        "attribution.val_batch: N values against its first N texts, and attribution.fast reuses the "
        "gradient while it stays close (README: Fast mode)."
    )


def _resumable_run(root: Path, name: str):
    """The run ``name``, if it stopped before completing and has a checkpoint to resume from."""
    from adamshap_core import runio

    folder = runio.open_run(root, name)
    try:
        return folder.require_resumable()
    except UserError as e:
        raise UserError(f"--resume {name}: {e}") from None


def _train_into(folder, start, prep, quiet: bool, resume: bool):
    """Start the run (``start()`` writes or reads its metrics header), then run the training loop into
    ``folder``; on a stop or failure from there on, leave it incomplete and say why."""
    from adamshap_core import runio
    from adamshap_core.checkpoint import Checkpointer
    from adamshap_core.interrupts import stop_on_interrupt
    from adamshap_core.runio import CHECKPOINT_FILE
    from adamshap_core.threads import intra_op_threads, recorded_threads
    from adamshap_core.train import run

    ckpt = Checkpointer(folder.file(CHECKPOINT_FILE), prep)
    stop = None
    metrics = None
    header = start()  # nothing between it and the handlers below where Ctrl-C could land
    try:
        # the run's thread count, whatever the shell of a resume sets: another would round its sums
        # apart from an uninterrupted run's (a run started before it was recorded: as set)
        threads = intra_op_threads(recorded_threads(header))
        with stop_on_interrupt() as stop, _training_bar(quiet) as on_progress, threads:
            result = run(prep, on_progress=on_progress, checkpointer=ckpt, resume=resume, stop=stop)
            # inside the handler: a first Ctrl-C after the last step lets these few writes finish, where
            # it would leave a finished run incomplete (failing, no space left say, it stays resumable)
            metrics = runio.finish_run(folder, header, result)
    except BaseException as e:
        if resume and not ckpt.loaded:  # refused (a damaged checkpoint, changed data) or stopped before it
            raise  # resumed anything: the run's record of why it stopped stays as it was
        if metrics is None:
            _stopped(folder, header, ckpt, getattr(stop, "signum", None), e)
        else:  # complete (a second Ctrl-C came as the handler left): it stays so, without a checkpoint
            ckpt.remove()
        raise
    finally:
        if prep.tracker is not None:
            prep.tracker.close()
    ckpt.remove()  # a complete run is never resumed; metrics.json keeps params_sha256
    return result, metrics


def _stopped(folder, header: dict, ckpt, signum: int | None, error: BaseException) -> None:
    """Mark the run incomplete with why it stopped; where the user stopped it or can mend the cause,
    say how to go on, and raise the exit it ends with."""
    from adamshap_core import runio
    from adamshap_core.checkpoint import TrainingInterrupted
    from adamshap_core.train import TrainingDiverged

    if isinstance(error, TrainingDiverged):
        runio.fail_run(folder, header, error, partial=error.partial)
    elif isinstance(error, (TrainingInterrupted, KeyboardInterrupt)):
        runio.fail_run(folder, header, error)
        where = f" after step {error.step} of {error.total}" if isinstance(error, TrainingInterrupted) else ""
        err_console.print(f"[yellow]stopped{where}; run {folder.name!r} is marked incomplete.[/]")
        err_console.print(escape(_how_to_continue(folder, ckpt)), soft_wrap=True)
        # 130 (Ctrl-C) or 143 (SIGTERM), as the shell reports them
        raise typer.Exit(128 + signum if signum else stopped_exit_code(error)) from None
    else:
        _record_failure(folder, header, ckpt, error)


def _record_failure(folder, header: dict, ckpt, error: BaseException) -> None:
    """Mark the run incomplete with ``error``. Where the user can mend the cause (a full disk, a
    permission, memory short after the last step), raise it as their error, saying how to continue
    once they have."""
    from adamshap_core import runio
    from adamshap_core.train import EvaluationOutOfMemory

    runio.fail_run(folder, header, error)
    problem = str(error) if isinstance(error, EvaluationOutOfMemory) else file_system_problem(error)
    if problem is not None:
        raise UserError(f"{problem} Once mended, {_how_to_continue(folder, ckpt)}") from None


def _how_to_continue(folder, ckpt) -> str:
    """How to go on with a run that stopped: resume it, or train it again where it cannot be."""
    from adamshap_core import runio

    if ckpt.exists():
        return f"resume from the last checkpoint with: {runio.resume_command(folder.path)}"
    return f"train it again (no checkpoint was written yet) with: {runio.restart_command(folder.path)}"


@contextmanager
def _training_bar(quiet: bool):
    """``run``'s ``on_progress`` drawing the training bar on stderr (None where ``quiet``)."""
    if quiet:
        yield None
        return
    from rich.progress import TextColumn

    bar = progress_bar(
        None,  # each task's description: "train", then what follows the last step
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[eps]} ex/s"),
    )
    task = None

    def on_progress(done: int, total: int, loss: float, examples_per_s: float) -> None:
        nonlocal task
        # before this process's first step (run reports a NaN loss and no speed) a dash, not "nan"
        fields = {
            "loss": f"{loss:.4f}" if math.isfinite(loss) else "–",
            "eps": f"{examples_per_s:,.0f}" if examples_per_s > 0 else "–",
        }
        # after the last step the run evaluates every split (a large text source's takes a minute)
        description = "train: evaluating" if done == total else "train"
        if task is None:  # shown from run's first report on, so never without its total
            task = bar.add_task(description, total=total, completed=done, **fields)
            bar.start()
        else:
            bar.update(task, completed=done, description=description, **fields)

    try:
        yield on_progress
    finally:
        if task is not None:  # done: the bar left on screen shows the training alone, as stop prints it
            bar.update(task, description="train", log=False)
        bar.stop()


def print_summary(result, metrics: dict, path: Path, quiet: bool) -> None:
    """The run's results on stdout: a line of metrics, each method's highest and lowest valued examples,
    the mislabel detection, where the run is and what to run next."""
    from adamshap_core.run_tables import value_column

    df = result.values_frame()
    noisy = bool(df["is_noisy"].any())
    about = "text" if "text" in df.columns else "label"  # a text corpus has texts, not labels
    if about == "label" and metrics.get("classes"):  # the source's labels, not their codes
        df = df.assign(label=[metrics["classes"][code] for code in df["label"]])
    acc_name = "next-token accuracy" if about == "text" else "accuracy"
    acc = metrics.get("test_accuracy")
    if not quiet:  # a blank line apart from the progress bar and notes above it (--quiet prints none), on
        err_console.print()  # their stream: the results' first line on stdout is their first line
    console.print(
        f"[bold green]done[/]: trained in {metrics['wall_seconds']:.1f}s; "
        f"test {acc_name} [bold]{acc:.3f}[/], test loss {metrics['test_loss']:.4f}, "
        f"val {acc_name} {metrics['val_accuracy']:.3f}, train {acc_name} {metrics['train_accuracy']:.3f}, "
        f"train loss {metrics['train_loss']:.4f} "
        f"({result.steps_done} steps, {metrics['n_train']} training examples)"
    )
    if result.methods and result.recipe.attribution.fast is not None:
        console.print(fast_mode_line(result.steps), highlight=False)
    for m in result.methods:
        col = value_column(m)
        ranked = df.sort_values(col, ascending=False, kind="stable")
        k = min(5, len(ranked) // 2)  # the two lists never share a row, however small the set
        title = f"{m}: {k} highest and {k} lowest valued examples" if k else f"{m}: the valued example"
        table = Table(title=title, title_justify="left")
        table.add_column("rank", justify="right", overflow="fold")
        table.add_column("example_id", justify="right", overflow="fold")
        table.add_column("value", justify="right", overflow="fold")
        table.add_column(about, justify="right" if about == "label" else "left")
        if noisy:
            table.add_column("noisy")
        top, bottom = (ranked.head(k), ranked.tail(k)) if k else (ranked, ranked.head(0))
        for rank, (_, row) in enumerate(top.iterrows(), start=1):
            _row(table, rank, row, col, noisy, about)
        table.add_section()
        for rank, (_, row) in enumerate(bottom.iterrows(), start=len(ranked) - len(bottom) + 1):
            _row(table, rank, row, col, noisy, about)
        console.print(table)
    if noisy and result.methods:
        n_low = max(1, int(round(0.2 * len(df))))
        base = df["is_noisy"].mean()
        lines = []
        for m in result.methods:
            low = df.nsmallest(n_low, value_column(m), keep="first")
            share = low["is_noisy"].mean()
            lines.append(
                f"  {m:<11} {share:6.1%} noisy among the {n_low} lowest-valued (base rate {base:.1%})"
            )
        console.print("[bold]mislabel detection[/] (share of noisy examples in the lowest-valued 20%):")
        console.print("\n".join(lines), highlight=False)
    console.print(f"run folder: [bold]{escape(str(path))}[/]")
    if result.methods:
        hint = next_commands(path, text=about == "text")
        console.print(f"next: {escape(hint)}", highlight=False, soft_wrap=True)


def fast_mode_line(steps) -> str:
    """How often a fast-mode run reused ∇val, and what its checks of that reuse found (``steps.parquet``)."""
    from adamshap_core.run_tables import reused_val_grads

    reused = int(reused_val_grads(steps).sum())
    line = f"fast mode: ∇val reused on {reused} of {len(steps)} steps"
    checks = steps["reuse_pearson"].dropna()
    if len(checks):
        line += (
            f"; {len(checks)} checks of reuse found a Pearson of {checks.min():.3f} at the lowest "
            f"(median {checks.median():.3f}) against the recomputed ∇val"
        )
    return line


def next_commands(path: Path, text: bool) -> str:
    """What to run on a finished run: source attribution for a language model, else compare and prune."""
    from adamshap_core import runio

    where = f"--run {shlex.quote(path.name)}{runio.runs_dir_option(path)}"
    if text:
        return f"adamshap attribute {where}"
    return f"adamshap compare {where}   |   adamshap prune {where} --frac 0.3"


def _row(table: Table, rank: int, row, col: str, noisy: bool, about: str) -> None:
    shown = escape(str(row[about]))
    cells = [str(rank), str(int(row["example_id"])), f"{row[col]:.3e}", shown]
    if noisy:
        cells.append("yes" if bool(row["is_noisy"]) else "")
    table.add_row(*cells)
