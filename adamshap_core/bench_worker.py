"""The child process of ``adamshap bench``: one measurement in a fresh Python.

``python -m adamshap_core.bench_worker SPEC.json TASK RESULT.json`` where TASK is a mode
(plain, attribution, attribution-fast, per_example), ``in-turn`` (every mode's throughput, a block of
steps of each in turn), ``fidelity`` or ``profile``. The result is written as
JSON; bad input is written as ``{"user_error": message}`` with exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from . import bench, runio
    from .errors import UserError

    spec_path, task, result_path = argv
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
