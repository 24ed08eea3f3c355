"""The ``adamshap`` typer app. One module per command; register new commands here."""

from __future__ import annotations

import typer

from adamshap_core import __version__

from . import attribute as _attribute
from . import bench as _bench
from . import compare as _compare
from . import prune as _prune
from . import runs as _runs
from . import train as _train

app = typer.Typer(
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
