"""Time building M (reading Adam's state, the rules, M = scale ⊙ ∇val) on a model of many parameters.

The part of a valued step that grows with the parameter count rather than with the tokens: on a
wide model with short sequences it is the largest piece valuation adds besides the contraction.
A stack of square linear layers stands in for the model (only the parameter count and the block
layout matter here); AdamW takes three steps first, so that its moments are not zero.

    OMP_NUM_THREADS=1 python tools/time_rules.py                       # 3.15 M parameters, adam
    OMP_NUM_THREADS=1 python tools/time_rules.py --methods adam,adam_fixed,sgd --width 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from adamshap_core.engine import GhostEngine
from adamshap_core.precond import OptimizerView, check_methods, method_scales, reads_state


def build_m(engine: GhostEngine, view: OptimizerView, val_grads: torch.Tensor, methods: tuple[str, ...]):
    """One step's M, as the tracker builds it (``tracker.step_values`` before the contraction)."""
    with torch.inference_mode():
        blocks = view.blocks(engine.parameters, flatten=reads_state(methods))
        return engine.matrices(val_grads, method_scales(methods, blocks, 1.0), len(methods))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512, help="width of each square linear layer")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--methods", default="adam", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    methods = check_methods(args.methods.split(","))

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(4):  # three steps taken, then the gradient of the step being valued
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        if step < 3:
            optimizer.step()
    engine = GhostEngine(model, order=[p for g in optimizer.param_groups for p in g["params"]])
    view = OptimizerView(optimizer)
    val_grads = torch.randn(1, engine.numel)

    for _ in range(5):
        build_m(engine, view, val_grads, methods)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        build_m(engine, view, val_grads, methods)
        times.append(time.perf_counter() - start)
    print(
        f"{engine.numel / 1e6:.2f} M parameters, methods {','.join(methods)}, "
        f"{torch.get_num_threads()} thread(s): building M took {statistics.median(times) * 1e3:.2f} ms "
        f"(median of {args.repeats}; fastest {min(times) * 1e3:.2f} ms)"
    )


if __name__ == "__main__":
    main()
