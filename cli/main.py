"""The ``adamshap`` typer app. One module per command; register new commands here."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from adamshap_core import __version__

from . import attribute as _attribute
from . import bench as _bench
from . import compare as _compare
from . import prune as _prune
from . import runs as _runs
from . import train as _train

# the parser's error class: typer's own copy of click's (newer typer) or click's (older)
ClickException: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


class Commands(TyperGroup):
    """The app's commands, where an option or command the parser refuses (``--top 0``, ``--bogus``, a
    missing ``--frac``) gets the one-paragraph ``error:`` line of every other bad input, exit 2,
    rather than typer's boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as e:
            if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                say_usage_error(e)
            code = getattr(e, "exit_code", 2)
        sys.exit(code if isinstance(code, int) else 0)  # a command returns None; typer.Exit its code


def say_usage_error(error) -> None:
    """``error: ...`` for a ClickException, with the command whose help lists the options."""
    from .common import error_line

    ctx = getattr(error, "ctx", None)
    hint = f" (see `{ctx.command_path} -h`)" if ctx is not None else ""
    error_line(error.format_message() + hint)


app = typer.Typer(
    cls=Commands,
    name="adamshap",
    help="Value every training example during one Adam/AdamW training run (Adam-aware In-Run Data Shapley).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(asked: bool) -> None:
    if asked:
        print(f"adamshap {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
    ),
) -> None:
    """The options before the command (the app's help text is set above)."""


app.command("train")(_train.train)
app.command("runs")(_runs.runs)
app.command("attribute")(_attribute.attribute)
app.command("prune")(_prune.prune)
app.command("bench")(_bench.bench)
app.command("compare")(_compare.compare)


if __name__ == "__main__":
    app()
