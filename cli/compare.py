"""``adamshap compare``: each method's values against the ground truth of the real optimizer step."""

from __future__ import annotations

import math

import typer
from rich.markup import escape

from adamshap_core.compare_options import DEFAULT_CUMULATIVE_PERMUTATIONS, DEFAULT_PERMUTATIONS

from .common import RUNS_DIR, console, counted, err_console, progress_bar, user_errors


@user_errors
def compare(
    run: str = typer.Option(None, "--run", help="run name or folder (default: the latest run)"),
    baseline: str | None = typer.Option(
        None,
        "--baseline",
        help="the method the others are set against (default: sgd, or the run's first method after adam "
        "where it did not value sgd)",
    ),
    steps: str = typer.Option(
        "auto", "--steps", help="steps to evaluate: auto (the run's recorded steps) or a list such as 1-5,50"
    ),
    permutations: int = typer.Option(
        DEFAULT_PERMUTATIONS,
        "--permutations",
        help="Monte-Carlo permutations (an even number: antithetic pairs) at each evaluated step",
    ),
    cumulative: bool = typer.Option(
        True,
        "--cumulative/--no-cumulative",
        help="also compute the ground truth at every step and compare the values summed over the run",
    ),
    cumulative_permutations: int = typer.Option(
        DEFAULT_CUMULATIVE_PERMUTATIONS,
        "--cumulative-permutations",
        help="Monte-Carlo permutations at each of the other steps, for the cumulative ground truth",
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the permutations"),
    runs_dir: str = RUNS_DIR,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Compare every method with ground truth: exact LOO and Monte-Carlo Shapley of the real step.

    Replays the run and evaluates the real optimizer step per coalition, per step and summed over
    the run; writes compare.parquet and plots next to the run."""
    from adamshap_core import runio
    from adamshap_core.compare import CompareOptions, compare_run, write_outputs

    with runio.reading_run(runio.runs_root(runs_dir), run) as folder:
        options = CompareOptions(baseline, steps, permutations, cumulative, cumulative_permutations, seed)
        progress = None if quiet else _progress()
        task = None

        def on_start(inputs, evaluated):
            nonlocal task
            n = inputs.last_step if cumulative else len(evaluated)
            if progress is not None:
                err_console.print(
                    f"[bold]compare[/] {escape(folder.name)}: replaying "
                    f"{counted(inputs.last_step, 'step', 'steps')}; ground truth at "
                    f"{counted(n, 'step', 'steps')}: {options.permutations} permutations at the evaluated "
                    "steps "
                    f"{_steps_text(evaluated)}"
                    # the others are most of the work on a long run; say how to leave them out
                    + (
                        f", {options.cumulative_permutations} at the others (--no-cumulative: the "
                        "evaluated steps only)"
                        if cumulative
                        else ""
                    )
                )
                task = progress.add_task("ground truth", total=None, steps=f"0/{n}")
                progress.start()

        def on_progress(done, total):  # the bar and its time left follow the work, the text the steps
            if progress is not None:
                progress.update(
                    task, completed=done.work, total=total.work, steps=f"{done.steps}/{total.steps}"
                )

        replay_task = None

        # the run's steps, of which the ground truth's are a part
        def on_replay(done: int, total: int) -> None:
            nonlocal replay_task
            if progress is None:
                return
            steps = f"{done}/{total}"
            if replay_task is None:  # with its fields from the start: the bar may draw it at once
                replay_task = progress.add_task("replay", total=total, completed=done, steps=steps)
            else:
                progress.update(replay_task, completed=done, steps=steps)

        try:
            result = compare_run(folder, options, on_progress, on_start, on_replay)
        finally:
            # stopping a bar that never started prints an empty line
            if progress is not None and task is not None:
                progress.stop()
        earlier = runio.replaced_note(folder.file("compare.json"), "compare's results")  # written last
        written = write_outputs(folder, result)
        print_report(result)
        console.print(f"wrote {', '.join(written)} to [bold]{escape(str(folder.path))}[/]{escape(earlier)}")


def print_report(result) -> None:
    from adamshap_core import report

    console.print(report.compare_summary_table(result))
    console.print(report.compare_steps_table(result))
    layers = report.divergence_table(result)
    if layers is not None:
        console.print(layers)
    s = result.summary
    div = s["divergence"]
    worst = ", ".join(f"step {w['step']} ({report.fmt(w['pearson_vs_shapley'])})" for w in div["worst_steps"])
    if worst:
        console.print(f"{div['baseline']} is furthest from MC Shapley at {worst}.", highlight=False)
    cum = s.get("cumulative")
    noise = ""
    if cum:
        ratio = cum["se_over_sd"]
        known = ratio is not None and math.isfinite(ratio)
        noise = (
            f"; cumulative se/sd {report.fmt_ratio(ratio)}"
            if known
            else "; cumulative se unknown (one pair a step has no spread)"
        )
        noise += f" over {cum['steps']} steps"
    check = s["replay_check"]
    engine = s["engine_vs_bruteforce_max_relative_difference"]
    engine_text = (
        f"{engine:.1e}"
        if engine is not None and math.isfinite(engine)
        else "not checked (each evaluated step reused an earlier step's ∇val: the fast mode)"
    )
    console.print(
        f"replay reproduced the run (recorded steps {_steps_text(check['checked_steps'])}: largest relative "
        f"difference {check['max_relative_difference']:.1e}); engine vs materialised gradients "
        f"{engine_text}{noise}; {s['seconds']['total']:.0f}s",
        highlight=False,
    )


def _steps_text(steps) -> str:
    steps = list(steps)
    return ", ".join(map(str, steps)) if len(steps) <= 12 else f"{steps[0]}..{steps[-1]} ({len(steps)})"


def _progress():
    from rich.progress import TextColumn

    return progress_bar(None, TextColumn("step {task.fields[steps]}"))
