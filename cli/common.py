"""Shared CLI pieces: consoles and the wrapper that turns bad input into exit code 2."""

from __future__ import annotations

import errno
import functools
import os
import signal
import threading

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from adamshap_core.errors import UserError

from . import STOPPED, TERMINATED

# the file system's refusals that are the user's to fix (not a bug of the program): exit 2, not a
# traceback; each with what it asks of the user (a command that only reads meets the first two too)
FILE_SYSTEM_ERRORS = {
    errno.EACCES: "files and folders this user may read and write",
    errno.EPERM: "files and folders this user may read and write",
    errno.EROFS: "a file system that can be written to",
    errno.ENOSPC: "space left on the disk",
    errno.EDQUOT: "space left in this user's disk quota",
}

# every command's --runs-dir; text, not a Path, since typer reads "" as Path(".") and so as this folder
RUNS_DIR = typer.Option(None, "--runs-dir", help="runs folder (default: $ADAMSHAP_RUNS or ./runs)")

# where output goes to a file or a pipe (a log of `make bench`, say), rich would lay it out for 80
# columns; tables are read there later, at any width, so give them room unless COLUMNS says otherwise
LOG_WIDTH = 200


def _console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH
    return console


console = _console()  # results, on stdout
err_console = _console(stderr=True)  # progress and errors


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler's stop), raised where the command is, as Ctrl-C raises
    KeyboardInterrupt: the command's ``finally`` blocks run (locks released, half-written files
    removed) instead of the process ending in the middle of them."""


def _terminate(signum, frame):
    raise Terminated


def stopped_exit_code(stop: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM, as the shell reports a process those signals ended."""
    return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)


def user_errors(fn):
    """Print ``UserError`` (and YAML/validation errors) as one red paragraph on stderr; exit 2.
    Ctrl-C or SIGTERM (where a command does not handle it itself) says so in one line; exit 130
    or 143."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        main = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGTERM) if main else None
        try:
            if main:
                signal.signal(signal.SIGINT, signal.default_int_handler)  # from __main__'s stop-while-loading
                signal.signal(signal.SIGTERM, _terminate)
            return _reporting_user_errors(fn, *args, **kwargs)
        except KeyboardInterrupt as e:  # also while the imports below load (pydantic: ~0.1 s)
            err_console.print(f"[yellow]{TERMINATED if isinstance(e, Terminated) else STOPPED}[/]")
            raise typer.Exit(code=stopped_exit_code(e)) from None
        finally:
            if before is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signal.SIGTERM, before)

    return wrapper


def _reporting_user_errors(fn, *args, **kwargs):
    import yaml
    from pydantic import ValidationError

    try:
        return fn(*args, **kwargs)
    except UserError as e:
        _fail(str(e))
    except ValidationError as e:
        _fail(" ".join(str(e).split()))
    except yaml.YAMLError as e:
        _fail("invalid YAML: " + " ".join(str(e).split()))
    except OSError as e:
        problem = file_system_problem(e)
        if problem is None:
            raise
        _fail(problem)


def file_system_problem(error: BaseException) -> str | None:
    """What the user is told of a file system refusal that is theirs to mend (no space left, no
    permission), naming the file; None for any other error."""
    if not isinstance(error, OSError) or error.errno not in FILE_SYSTEM_ERRORS:
        return None
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror or error}{where}: expected {FILE_SYSTEM_ERRORS[error.errno]}."


def _fail(message: str):
    error_line(message)
    raise typer.Exit(code=2)


def error_line(message: str) -> None:
    """``error: message`` on stderr, as one paragraph."""
    message = " ".join(message.split())
    err_console.print(
        f"[bold red]error:[/] [red]{escape(message)}[/]", markup=True, highlight=False, soft_wrap=True
    )


def progress_bar(label: str | None, *columns):
    """A progress bar on stderr: the label (None: each task's description), the bar, ``columns``, the
    time taken and the time left. Where stderr is a file or a pipe, its lines every ``LOG_SECONDS``."""
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    ends = (TimeElapsedColumn(), TimeRemainingColumn())
    first = TextColumn("[bold]{task.description}[/]" if label is None else f"[bold]{label}[/]")
    return _logged_progress()(first, BarColumn(), *columns, *ends, console=err_console)


LOG_SECONDS = 30.0  # between the progress lines written to a file or a pipe


@functools.cache
def _logged_progress() -> type:
    """rich's ``Progress`` that, on a console that is not a terminal (a log file, a pipe, a job
    scheduler's output), prints its lines every ``LOG_SECONDS`` from its first update on, and when a
    task's description changes: rich redraws a bar on a terminal only, so such a log would show
    nothing until the command ended."""
    from rich.progress import Progress, TaskID

    class LoggedProgress(Progress):
        _logged_at: float | None = None
        _descriptions: tuple[str, ...] = ()

        def update(self, task_id: TaskID, *, log: bool = True, **kwargs) -> None:
            """rich's update; ``log=False``: no line for it (one ``stop`` prints anyway, say)."""
            super().update(task_id, **kwargs)
            if log:
                self._log()

        def advance(self, task_id: TaskID, advance: float = 1) -> None:
            super().advance(task_id, advance)
            self._log()

        def _log(self) -> None:
            """The lines, where it is time or a task's description changed (a phase begins)."""
            if self.console.is_terminal:
                return
            now = self.get_time()
            descriptions = tuple(task.description for task in self.tasks)
            due = self._logged_at is None or now - self._logged_at >= LOG_SECONDS
            if due or descriptions != self._descriptions:
                self._logged_at, self._descriptions = now, descriptions
                self.console.print(self.make_tasks_table(self.tasks))

    return LoggedProgress


def counted(n: int, one: str, many: str) -> str:
    """``n`` with the noun that agrees with it: ``counted(1, "query", "queries")`` -> "1 query"."""
    return f"{n} {one if n == 1 else many}"


def split_list(items: list[str] | None, option: str) -> list[str]:
    """Repeated and comma-separated option values: ``["adam,sgd", "random"]`` -> three names. An empty
    one (``0.3,,0.2``, a trailing comma) is refused rather than dropped: it is likely a value left out."""
    parts = [part.strip() for item in items or () for part in item.split(",")]
    if "" in parts and any(parts):  # all empty: nothing given, which the option's own check names
        given = " ".join(f"{option} {item}" for item in items or ())
        raise UserError(f"{given!r} has an empty item; expected values separated by single commas.")
    return [part for part in parts if part]


def fit_columns(table: Table, width: int) -> Table | None:
    """``table`` with its column widths set to fit ``width`` without breaking a word, or None where
    that cannot be done: rich alone narrows the widest columns first, cutting a word short
    ("breast-can…") while a column beside it had room to spare. Each column is given its longest word
    (its longest line where it is ``no_wrap``), then the columns that need least to fit on one line are
    given it first. Where even the longest words do not fit, the columns with ``overflow="fold"`` give
    up room, widest first, folding their words. Assumes the default padding, as every table here has."""
    columns = table.columns
    _, right, _, left = table.padding
    borders = (len(columns) - 1 + 2 * table.show_edge) if table.box else 0
    room = width - borders - len(columns) * (left + right)
    lows, highs = zip(*(_column_range(c, width) for c in columns), strict=True)
    if sum(highs) <= room:
        return table  # fits as it is
    widths = list(lows)
    spare = room - sum(widths)
    for i in sorted(range(len(columns)), key=lambda i: highs[i] - lows[i]):
        more = max(0, min(highs[i] - widths[i], spare))
        widths[i] += more
        spare -= more
    foldable = [i for i, c in enumerate(columns) if c.overflow == "fold" and not c.no_wrap]
    while spare < 0 and foldable and max(widths[i] for i in foldable) > 1:
        widths[max(foldable, key=lambda i: widths[i])] -= 1
        spare += 1
    if spare < 0:
        return None
    for column, w in zip(columns, widths, strict=True):
        column.width = w
    return table


def print_unbroken(table: Table, *other_layouts: Table) -> None:
    """Print the first of ``table`` and ``other_layouts`` (the same cells laid out otherwise) that fits
    the terminal without cutting a cell (``fit_columns``); where none does, ``table`` at its natural
    width (the terminal then wraps its lines; no cell loses its end)."""
    for layout in (table, *other_layouts):
        fitted = fit_columns(layout, console.width)
        if fitted is not None:
            console.print(fitted)
            return
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(width=natural, force_terminal=console.is_terminal, no_color=console.no_color).print(table)


def _column_range(column, width: int) -> tuple[int, int]:
    """The narrowest width a column's cells (header included) take without breaking a word, and the
    width that puts each on one line; the same for a ``no_wrap`` column, whose cells never wrap."""
    options = console.options.update_width(width)
    sizes = [Measurement.get(console, options, cell) for cell in (column.header, *column.cells)]
    high = max(m.maximum for m in sizes)
    return (high if column.no_wrap else max(m.minimum for m in sizes)), high
