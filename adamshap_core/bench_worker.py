"""The child process of ``adamshap bench``: one measurement in a fresh Python.

``python -m adamshap_core.bench_worker SPEC.json TASK RESULT.json`` where TASK is a mode
(plain, attribution, attribution-fast, per_example), ``in-turn`` (every mode's throughput, a block of
steps of each in turn), ``fidelity`` or ``profile``. The result is written as
JSON; bad input is written as ``{"user_error": message}`` with exit code 2. On Linux it stops when
the bench process dies (``stop_with_parent``).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import sys
from pathlib import Path

PARENT = "ADAMSHAP_BENCH_PARENT"  # the environment variable that names the bench process's pid
PR_SET_PDEATHSIG = 1  # prctl(2): the signal the kernel sends when the parent dies


def main(argv: list[str]) -> int:
    from . import bench, runio
    from .errors import UserError

    spec_path, task, result_path = argv
    stop_with_parent(Path(spec_path).parent)
    spec = bench.BenchSpec(**json.loads(Path(spec_path).read_text()))
    try:
        if task == "fidelity":
            result = bench.fidelity(spec)
        elif task == "profile":
            result = bench.profile(spec)
        elif task == bench.IN_TURN:
            result = bench.measure_in_turn(spec)
        else:  # a measurement: plain, attribution, attribution-fast or per_example
            mode, fast = bench.task_measurement(task)
            result = bench.measure(spec, mode, fast=fast)
    except UserError as e:
        runio.atomic_write_json(result_path, {"user_error": str(e)})
        return 2
    runio.atomic_write_json(result_path, result)
    return 0


def stop_with_parent(folder: Path) -> None:
    """On Linux, stop when the bench process dies, removing ``folder`` (its temporary folder, which a
    killed bench cannot remove): a SIGKILLed bench would otherwise leave this child measuring for
    minutes, and its folder in /tmp. Elsewhere (no prctl) nothing changes."""
    parent = os.environ.get(PARENT)
    if not sys.platform.startswith("linux") or parent is None:
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return

    def parent_gone(signum, frame) -> None:
        # the parent is gone; a SIGTERM sent to this child alone leaves the folder to its parent
        if os.getppid() != int(parent):
            shutil.rmtree(folder, ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, parent_gone)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # died before the request took effect
        parent_gone(signal.SIGTERM, None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
