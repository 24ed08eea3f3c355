"""``adamshap`` and ``python -m adamshap_cli``: the app, where Ctrl-C while it is still loading
(its imports, typer's parsing: the first few tenths of a second) ends as a command's own does."""

import signal
import sys

from adamshap_cli import STOPPED


def _stop_while_loading(signum, frame):
    # Nothing is written before a command starts, so stop at once: a KeyboardInterrupt here would
    # surface as a traceback in an import, or as typer's silent exit 130.
    print(STOPPED, file=sys.stderr)
    sys.exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _stop_while_loading)  # each command puts Python's own back (common.py)
    from adamshap_cli.main import app

    app(prog_name="adamshap")


if __name__ == "__main__":
    main()
