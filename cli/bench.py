"""``adamshap bench``: throughput and peak memory of valuation beside plain training."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import JustifyMethod
from rich.markup import escape
from rich.progress import TextColumn
from rich.table import Table

from adamshap_core.choices import METHOD_NAMES
from adamshap_core.errors import UserError

from .common import RUNS_DIR, console, err_console, print_unbroken, progress_bar, split_list, user_errors

SUMMARY_OPTIONS = {"summary", "quiet", "recipe"}  # the options --summary reads (RECIPE: said apart)


def _given(ctx: typer.Context) -> list[str]:
    """The parameters given on the command line (not left at their defaults)."""
    # by name: typer may bring a click of its own, whose enum is another class than click's
    sources = {name: getattr(ctx.get_parameter_source(name), "name", "") for name in ctx.params}
    return [name for name, source in sources.items() if source == "COMMANDLINE"]


@user_errors
def bench(
    ctx: typer.Context,
    recipe: Path = typer.Argument(
        None, metavar="RECIPE", help="YAML recipe (default: recipes/digits-mlp.yaml)", show_default=False
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="override a recipe field: --set model.d_model=256 (repeatable)"
    ),
    steps: int = typer.Option(20, "--steps", help="timed steps per measurement"),
    warmup: int = typer.Option(3, "--warmup", help="untimed steps before them"),
    methods: list[str] = typer.Option(
        None,
        "--methods",
        help=f"{', '.join(METHOD_NAMES)} (comma-separated or repeated; default: the recipe's)",
    ),
    repeats: int = typer.Option(3, "--repeats", help="measurements of each mode; the median is reported"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    batch_size: int = typer.Option(None, "--batch-size", help="training batch (default: the recipe's)"),
    val_batch: int = typer.Option(
        None,
        "--val-batch",
        help="validation rows valued against (default: the recipe's attribution.val_batch)",
    ),
    fast: bool = typer.Option(
        False,
        "--fast",
        help="also measure the fast mode (the recipe's attribution.fast settings, else the defaults) "
        "and its per-step Pearson against the exact values",
    ),
    profile: bool = typer.Option(False, "--profile", help="also print where an attribution step spends time"),
    threads: int = typer.Option(
        None, "--threads", help="torch threads per measurement (default: torch's default, all cores)"
    ),
    out: Path = typer.Option(
        None, "--out", help="folder for bench.parquet and bench.json (default: runs/bench/NAME-TIME)"
    ),
    runs_dir: str = RUNS_DIR,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    summary: Path = typer.Option(
        None,
        "--summary",
        metavar="DIR",
        help="measure nothing: one table of every bench.json under DIR, also written to DIR/summary.parquet",
    ),
) -> None:
    """Time plain training, attribution and a per-example-gradient baseline on the same batches.

    Every repeat times all modes in one process, a block of steps of each in turn (a slower stretch
    of the machine slows them alike), then runs each mode in its own process for its peak memory
    (RSS on the CPU, allocated memory on CUDA). Writes bench.parquet and bench.json; ends with the
    throughput ratio (attribution / plain), the memory ratio and the speed-up over per-example
    gradients.
    """
    from adamshap_core import bench as bm
    from adamshap_core import runio

    if summary is not None:
        given = [
            f"--{name.rstrip('_').replace('_', '-')}" for name in _given(ctx) if name not in SUMMARY_OPTIONS
        ]
        if recipe is not None or given:
            what = ", ".join((["RECIPE"] if recipe is not None else []) + given)
            raise UserError(
                f"--summary reads finished benches and measures nothing; expected no {what} with it."
            )
        print_summary(summary)
        return
    plan = bm.plan(
        recipe or bm.DEFAULT_RECIPE,
        steps=steps,
        warmup=warmup,
        methods=None if methods is None else split_list(methods, "--methods"),
        repeats=repeats,
        device=device,
        batch_size=batch_size,
        val_batch=val_batch,
        fast=fast,
        out=out,
        runs_dir=runs_dir,
        profile=profile,
        threads=threads,
        overrides=set_ or (),
    )
    if not quiet:
        err_console.print(f"[bold]bench[/] {escape(describe(plan))}", highlight=False)
    result = _run_with_progress(plan, quiet)
    profile_text = None if result.profile is None else render_profile(result.profile)
    earlier = runio.replaced_note(plan.out / "bench.json", "bench's results")
    paths = bm.write(plan, result, profile_text)  # before any output: a reader that stops early loses nothing
    if profile_text is not None:
        console.print(profile_text, highlight=False, markup=False, soft_wrap=True)
    console.print(results_table(plan, result))
    for line in fidelity_lines(result):
        console.print(line, highlight=False, soft_wrap=True)
    for line in (
        ratio_lines(plan, result.summary) + compile_lines(plan, result.summary) + fusion_lines(result.summary)
    ):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(wrote_line(paths) + escape(earlier), highlight=False, soft_wrap=True)
    for line in closing_lines(result.summary):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def wrote_line(paths: list[Path]) -> str:
    """``wrote bench.parquet, bench.json and profile.txt into FOLDER``: every file a bench wrote."""
    names = [p.name for p in paths]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"wrote {escape(listed)} into {escape(str(paths[0].parent))}"


def describe(plan) -> str:
    from adamshap_core import bench as bm

    spec = plan.spec
    fast = ""
    if spec.fast:
        settings = bm.fast_settings(spec)
        fast = ", exact and fast (" + ", ".join(f"{k} {v}" for k, v in settings.items()) + ")"
        fast += f"; the fast mode's {settings['warmup']} warm-up steps are untimed too"
    return (
        f"{plan.recipe_name} on {plan.device}: batch {plan.batch_size}, {plan.val_rows} validation row(s), "
        f"methods {','.join(spec.methods)}{fast}; {spec.warmup} warm-up + {spec.steps} timed steps, "
        f"{plan.repeats} repeat(s) of each mode"
    )


def _run_with_progress(plan, quiet: bool):
    from adamshap_core import bench as bm

    if quiet:
        return bm.run(plan)
    progress = progress_bar(
        "bench", TextColumn("{task.completed}/{task.total} runs"), TextColumn("{task.fields[last]}")
    )
    with progress:
        task = progress.add_task("bench", total=bm.n_children(plan), last="")
        return bm.run(plan, on_child=lambda what: progress.update(task, advance=1, last=f"done: {what}"))


def results_table(plan, result) -> Table:
    """Median, range and peak memory of each mode over its repeats."""
    from adamshap_core.bench import FAST_KEY, measurement_keys

    frame = result.frame.assign(key=lambda f: measurement_keys(f))
    unit = "RSS" if plan.device == "cpu" else "alloc."
    table = Table(title=escape(describe(plan)), title_justify="left")
    for col in ("mode", "examples/s", "range", "ms/step", f"peak {unit} MB", "+MB"):
        table.add_column(col, justify="left" if col == "mode" else "right", overflow="fold")
    for key in frame["key"].unique():  # in the order measured
        rows = frame[frame["key"] == key]
        eps = rows["examples_per_s"]
        table.add_row(
            "attribution (fast)" if key == FAST_KEY else key,
            f"{eps.median():,.1f}",
            f"{eps.min():,.0f}–{eps.max():,.0f}",
            f"{rows['step_ms'].median():.2f}",
            f"{rows['peak_mb'].median():,.1f}",
            f"{rows['peak_increase_mb'].median():,.1f}",
        )
    load = frame["load_1m"]
    table.caption = (
        f"medians over {plan.repeats} repeat(s), each timing the modes in turn in one process and "
        "measuring each one's memory in its own; +MB: peak over the memory once the data and model are "
        f"built; {int(frame['threads'].iloc[0])} torch thread(s); 1-minute load average "
        f"{load.min():.1f}–{load.max():.1f}"
    )
    return table


def fidelity_lines(result) -> list[str]:
    from adamshap_core import bench as bm

    if result.fidelity is None:
        return []
    lines = []
    summary = bm.fidelity_summary(result.fidelity)
    checks = bm.checks_summary(result.fidelity)
    for m, s in summary.items():
        undefined = (
            f" ({s['undefined_steps']} step(s) with constant values left out)" if s["undefined_steps"] else ""
        )
        reused = (
            f"median {s['median_reused']:.4f} over the {s['reused_steps']} steps that reused ∇val"
            if s["reused_steps"]
            else f"no step reused ∇val ({why_no_reuse(checks)}), so these steps say nothing about it"
        )
        lines.append(
            f"fast vs exact Pearson per step, {m}: median {s['median']:.4f}, min {s['min']:.4f} "
            f"over {s['steps']} steps{undefined}; {reused}"
        )
    if checks["checks"]:
        n, lowest, median = checks["checks"], checks["min"], checks["median"]
        lines.append(
            f"the fast mode's {n} checks of reuse found a Pearson of {lowest:.4f} at the lowest "
            f"(median {median:.4f}) between the values of the recomputed ∇val and of the one it replaced"
        )
    some_reused = any(s["reused_steps"] for s in summary.values())
    lines.append(low_rank_line(bm.low_rank_summary(result.fidelity), reused=some_reused))
    gap = result.fidelity["max_parameter_gap"]
    lines.append(f"fast vs exact largest parameter difference after training: {gap:.2e}")
    return lines


def why_no_reuse(checks: dict) -> str:
    """Why a fast mode reused no ∇val: its checks (``checks_summary``) found reuse too costly, or it
    never got past its warm-up."""
    if checks["checks"]:
        return "its checks of reuse did not allow it: see attribution.fast.min_pearson"
    return "the fast mode's warm-up is longer than --warmup + --steps"


def low_rank_line(s: dict, *, reused: bool) -> str:
    """Whether the low-rank M took part in the fast values measured above; where it did not, the
    differences are the reused ∇val's, which is said only where some step ``reused`` it."""
    alone = ": the differences above are all the reused ∇val's" if reused else ""
    if s["rank"] is None:
        return f"low-rank M: off (rank null){alone}"
    line = (
        f"low-rank M (rank {s['rank']}): at most {s['most_factored']} of the {s['factorable']} weight "
        f"matrices a kernel may factorise were, on {s['steps_factored']} of {s['steps']} steps"
    )
    return line if s["most_factored"] else f"{line} (none costs less factorised at these sizes){alone}"


def render_profile(prof: dict) -> str:
    """Where an attribution step spends its time: per phase, the top ops, the ops beyond a plain step."""
    from adamshap_core import bench as bm

    att = prof["attribution"]
    lines = [
        f"profile: {att['steps']} attribution step(s) beside as many plain steps (torch.profiler)",
        "time per step in each phase (ms, children included):",
        bm.phase_table(prof).to_string(index=False, float_format=_fmt),
        "",
        "top ops of the attribution steps by self time (key_averages):",
        att["table"],
        "ops that cost most beyond a plain step (self ms per step):",
        bm.profile_extra(prof).to_string(index=False, float_format=_fmt),
    ]
    return "\n".join(lines)


def ratio_lines(plan, summary: dict) -> list[str]:
    """Each attribution variant's ratios (exact; fast if measured), memory also over the pre-step baseline,
    and what its contraction alone would allow. The headline variant's ratios are the closing lines, so
    its own line gives only what those leave out."""
    before = "the RSS" if plan.device == "cpu" else "the memory allocated"
    headline = "fast" if "fast" in summary["variants"] else "exact"  # as the closing lines choose
    lines = []
    for variant, r in summary["variants"].items():
        increase = f"{r['memory_increase_ratio']:.3f} over {before} before the first step"
        lines.append(
            f"{variant} mode (the ratios below): memory ratio {increase}"
            if variant == headline
            else f"{variant} mode: throughput ratio {r['throughput_ratio']:.3f}, memory ratio "
            f"{r['memory_ratio']:.3f} ({increase}), speed-up over per-example "
            f"{r['speedup_over_per_example']:.1f}"
        )
        if not math.isnan(r["contraction_bound"]):  # the contraction was timed (an eager tracker)
            lines.append(
                f"  its contraction alone takes {r['contract_ms']:.3f} ms a step: were the rest of valuation "
                f"free, the throughput ratio would be {r['contraction_bound']:.3f}"
            )
    return lines


def compile_lines(plan, summary: dict) -> list[str]:
    """With attribution.compile: what compiling cost, and whether the warm-up steps absorbed it."""
    c = summary.get("compile")
    if c is None:
        return []
    if c["failed"]:
        return [f"attribution.compile: compiling failed ({c['failed']}); the values were computed eagerly"]
    timed = c["max_in_timed_steps_s"]
    where = (
        f"within the {plan.spec.warmup} warm-up step(s)"
        if timed == 0
        else f"{timed:.1f} s of it in timed steps (raise --warmup)"
    )
    return [f"attribution.compile: {c['median_s']:.1f} s compiling per attribution process (median), {where}"]


def fusion_lines(summary: dict) -> list[str]:
    """With attribution.fuse_validation where the rows could not join the batch: say so, and why."""
    why = summary.get("fusion_blocked")
    if not why:
        return []
    return [f"attribution.fuse_validation: the validation rows took the separate pass ({why})"]


def closing_lines(summary: dict) -> list[str]:
    """The three lines every bench ends with: the fast mode's ratios if measured, else the exact's."""
    return [
        f"throughput ratio: {summary['throughput_ratio']:.3f}",
        f"memory ratio: {summary['memory_ratio']:.3f}",
        f"speed-up over per-example: {summary['speedup_over_per_example']:.1f}",
    ]


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"  # NaN: not measured (in that mode, or by that bench)


SUMMARY_COLUMNS: list[tuple[str, JustifyMethod]] = [
    ("bench", "left"),
    ("mode", "left"),
    ("device", "left"),
    ("B", "right"),
    ("val", "right"),
    ("plain ex/s", "right"),
    ("valued ex/s", "right"),
    ("throughput", "right"),
    ("memory", "right"),
    ("+MB", "right"),
    ("vs per-ex.", "right"),
    ("bound", "right"),
    ("fast Pearson", "right"),
]
UNBROKEN = ("bench", "fast Pearson")  # a bench's folder name, and the pair of Pearsons: never broken


def print_summary(folder: Path) -> None:
    """The benches under ``folder`` side by side; also written to ``folder/summary.parquet``."""
    from adamshap_core import bench as bm
    from adamshap_core import runio

    frame = bm.collect(folder)
    rows = [_summary_cells(r) for _, r in frame.iterrows()]
    caption = (
        "throughput and memory: attribution / plain (medians); +MB: the same ratio of the peak over the "
        "memory once the data and model are built; vs per-ex.: attribution / per-example examples per "
        "second; bound: the throughput ratio if all of valuation but the contraction were free (- where "
        "not timed); fast Pearson: per-step minimum / median over the steps that reused ∇val, of the "
        f"worst method. 1-minute load average up to {frame['load_1m'].max():.1f}."
    )
    title = f"benches under {escape(str(folder))}"
    by_row, by_column = _summary_by_row(rows, title, caption), _summary_by_column(rows, title, caption)
    path = runio.atomic_write_parquet(Path(folder) / "summary.parquet", frame)
    # a row per bench reads (and pastes) best; where the terminal is too narrow for its thirteen columns,
    # a column per bench; where too narrow for either, the rows at their natural width
    print_unbroken(by_row, by_column)
    console.print(f"wrote {escape(str(path))}", highlight=False, soft_wrap=True)


def _summary_cells(r) -> list[str]:
    """One bench's cells, in the order of ``SUMMARY_COLUMNS``."""
    fast = r["variant"] == "fast"
    return [
        escape(r["name"]),
        r["variant"],
        r["device"],
        str(r["batch_size"]),
        str(r["val_rows"]),
        f"{r['plain_examples_per_s']:,.0f}",
        f"{r['attribution_examples_per_s']:,.0f}",
        f"{r['throughput_ratio']:.3f}",
        f"{r['memory_ratio']:.3f}",
        f"{r['memory_increase_ratio']:.2f}",
        f"{r['speedup_over_per_example']:.1f}",
        _fmt(r.get("contraction_bound", math.nan)),
        f"{_fmt(r['fast_pearson_min'])} / {_fmt(r['fast_pearson_median_reused'])}" if fast else "-",
    ]


def _summary_by_row(rows: list[list[str]], title: str, caption: str) -> Table:
    table = Table(title=title, title_justify="left", caption=caption)
    for col, just in SUMMARY_COLUMNS:
        table.add_column(col, justify=just, no_wrap=col in UNBROKEN)
    for cells in rows:
        table.add_row(*cells)
    return table


def _summary_by_column(rows: list[list[str]], title: str, caption: str) -> Table:
    """The same cells transposed: a column per bench, headed by its name (folded where room is short)."""
    table = Table(title=title, title_justify="left", caption=caption)
    table.add_column("")
    for cells in rows:
        table.add_column(cells[0], justify="right", overflow="fold")
    for i, (col, _) in enumerate(SUMMARY_COLUMNS[1:], start=1):
        table.add_row(col, *(cells[i] for cells in rows))
    return table
