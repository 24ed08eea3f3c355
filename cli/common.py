"""Shared CLI pieces: consoles and the wrapper that turns bad input into exit code 2."""

from __future__ import annotations

import errno
import functools
import signal
import threading

import typer
from rich.console import Console
from rich.markup import escape

from adamshap_core.errors import UserError

from . import STOPPED

# the file system's refusals that are the user's to fix (not a bug of the program): exit 2, not a traceback
FILE_SYSTEM_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}

console = Console()  # results, on stdout
err_console = Console(stderr=True)  # progress and errors


def user_errors(fn):
    """Print ``UserError`` (and YAML/validation errors) as one red paragraph on stderr; exit 2.
    Ctrl-C (where a command does not handle it itself) says so in one line; exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.default_int_handler)  # from __main__'s stop-while-loading
            return _reporting_user_errors(fn, *args, **kwargs)
        except KeyboardInterrupt:  # also while the imports below load (pydantic: ~0.1 s)
            err_console.print(f"[yellow]{STOPPED}[/]")
            raise typer.Exit(code=130) from None

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
    return f"{error.strerror or error}{where}: expected a folder this user can write to, with space left."


def _fail(message: str):
    message = " ".join(message.split())
    err_console.print(
        f"[bold red]error:[/] [red]{escape(message)}[/]", markup=True, highlight=False, soft_wrap=True
    )
    raise typer.Exit(code=2)


def progress_bar(label: str, *columns, remaining: bool = True):
    """A progress bar on stderr: the label, the bar, ``columns``, the time taken and (``remaining``) left."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    ends = [TimeElapsedColumn(), *([TimeRemainingColumn()] if remaining else [])]
    return Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), *columns, *ends, console=err_console)


def split_list(items: list[str] | None) -> list[str]:
    """Repeated and comma-separated option values: ``["adam,sgd", "random"]`` -> three names."""
    return [part.strip() for item in items or () for part in item.split(",") if part.strip()]
