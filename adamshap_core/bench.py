"""``adamshap bench``: what valuation costs, measured beside plain training.

For one recipe, the same batches from the same seed are trained three ways:

- ``plain``: ``tracker.training_step`` alone (no hooks, no validation rows);
- ``attribution``: ``InRunShapley.step`` with the chosen methods, its validation rows counted;
- ``per_example``: the values computed the direct way, from per-example gradients
  materialised with ``torch.func`` (vmap of grad), then the optimizer step.

In every repeat, one freshly spawned Python (``bench_worker``) times every mode, a block of steps
of each in turn, so that a slower stretch of a shared machine slows all of them alike; then each
mode runs in a process of its own, so that every peak-memory figure belongs to one mode alone.
Warm-up steps are excluded; the ratios are of medians over the repeats. With ``fast`` the
attribution mode is measured twice in every repeat, exact and in the tracker's fast mode (the
ratios printed last are then the fast mode's), and a further child runs the fast and the exact
tracker on identical copies of the model to give their per-step Pearson correlation.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import bench_worker
from .errors import UserError

if TYPE_CHECKING:
    import torch

    from .tracker import InRunShapley

MODES = ("plain", "attribution", "per_example")
IN_TURN = "in-turn"  # the child that times every mode of a repeat, a block of steps of each in turn
# steps of one mode before the next mode's turn: single steps in turn would let each mode evict the
# others' data from the caches, which slowed a small model's plain step by half (0.43 to 0.75 ms)
IN_TURN_BLOCK = 20
FAST_KEY = "attribution_fast"  # how the fast attribution measurement is named in medians and summaries
COLUMNS = ["recipe", "device", "mode", "methods", "batch_size", "repeat", "examples_per_s", "peak_mb"]
DEFAULT_RECIPE = "recipes/digits-mlp.yaml"
# where the shipped recipes sit in a checkout: beside the package (for a bench started in another folder)
SHIPPED_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PROFILE_ROWS = 15  # ops shown by --profile
# after the timed steps, each attribution mode times its contraction alone this many times, in one step
CONTRACT_RUNS = 20


# ---- the plan: everything checked before anything runs or is written ------------------------------


@dataclass
class BenchSpec:
    """What a child process needs to measure one mode (JSON-serialisable)."""

    recipe: dict  # the resolved recipe, batch size, validation rows and device applied
    steps: int  # timed steps
    warmup: int  # untimed steps before them
    methods: list[str]
    fast: bool  # also measure the fast mode (and its fidelity)
    threads: int | None = None  # torch threads in each child; None = torch's default

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


@dataclass
class BenchPlan:
    spec: BenchSpec
    recipe_name: str
    recipe_path: str
    device: str
    batch_size: int
    val_rows: int
    repeats: int
    out: Path
    profile: bool


def plan(
    recipe_path: str | Path = DEFAULT_RECIPE,
    *,
    steps: int = 20,
    warmup: int = 3,
    methods: Sequence[str] | None = None,
    repeats: int = 3,
    device: str = "cpu",
    batch_size: int | None = None,
    val_batch: int | None = None,
    fast: bool = False,
    out: str | Path | None = None,
    runs_dir: str | Path | None = None,
    profile: bool = False,
    threads: int | None = None,
    overrides: Sequence[str] = (),
) -> BenchPlan:
    """Validate the options and build (once, then throw away) what every child will build."""
    import torch

    from .precond import check_methods
    from .recipe import load_recipe

    checks = [("--steps", steps, 1), ("--warmup", warmup, 0), ("--repeats", repeats, 1)]
    optional = [("--threads", threads), ("--batch-size", batch_size), ("--val-batch", val_batch)]
    checks += [(name, value, 1) for name, value in optional if value is not None]
    for name, value, least in checks:
        if value < least:
            raise UserError(f"{name} is {value}; expected an integer >= {least}.")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device is {device!r}; expected cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():  # else the recipe's train.device would be blamed
        raise UserError("--device is cuda, but no CUDA device is available here; expected cpu.")
    overrides = [*overrides, f"train.device={device}"]  # the options win over --set
    if batch_size is not None:
        overrides.append(f"train.batch_size={batch_size}")
    if val_batch is not None:
        overrides.append(f"attribution.val_batch={val_batch}")
    recipe_path = _found(recipe_path)
    given = {"--batch-size": batch_size, "--val-batch": val_batch}
    try:
        recipe = load_recipe(recipe_path, overrides)
        if not recipe.attribution.enabled:  # bench times attribution against plain training
            raise UserError(
                f"{recipe_path}: `attribution.enabled` is false; bench times attribution against plain "
                "training, so expected true (drop the override, or the key from the recipe)."
            )
        methods = list(check_methods(recipe.attribution.methods if methods is None else methods))
        spec = BenchSpec(recipe.to_dict(), steps, warmup, methods, fast, threads)
        session = Session.build(spec, "attribution", fast=fast)  # bad input surfaces here, in the parent
    except UserError as e:
        raise UserError(_naming_options(str(e), given)) from None
    session.close()
    n_train = session.prep.data.n_train
    if n_train < recipe.train.batch_size:
        raise UserError(
            f"the batch size ({recipe.train.batch_size}) is larger than the training split "
            f"({n_train} examples); expected --batch-size <= {n_train}."
        )
    return BenchPlan(
        spec,
        recipe.name,
        str(recipe_path),
        device,
        recipe.train.batch_size,
        len(session.prep.val_y),
        repeats,
        _out_folder(out, runs_dir, recipe.name),
        profile,
    )


# the recipe fields bench's own options set, so that an error about one names the option too
OPTION_FIELDS = {"--batch-size": "train.batch_size", "--val-batch": "attribution.val_batch"}


def _naming_options(message: str, given: dict[str, int | None]) -> str:
    """``message``, and which of the options ``given`` set a field it names."""
    for option, name in OPTION_FIELDS.items():
        if given.get(option) is not None and f"`{name}`" in message:
            message += f" ({option} sets `{name}` here.)"
    return message


def _found(recipe_path: str | Path) -> str | Path:
    """The default recipe from the project's own recipes folder where this folder has none."""
    shipped = SHIPPED_RECIPES / Path(DEFAULT_RECIPE).name
    if str(recipe_path) == DEFAULT_RECIPE and not Path(recipe_path).is_file() and shipped.is_file():
        return shipped
    return recipe_path


def _out_folder(out: str | Path | None, runs_dir: str | Path | None, recipe_name: str) -> Path:
    from .runio import bench_folder, require_creatable, runs_root

    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; expected a folder (bench.parquet is written into it).")
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = bench_folder(runs_root(runs_dir)) / f"{recipe_name}-{stamp}"
    require_creatable(out)  # now, not after the minutes of measuring
    return out


# ---- one process: build a recipe's training and time it in one mode ---------------------------


class Session:
    """One recipe's model, optimizer and batches, stepped in one mode."""

    def __init__(self, spec: BenchSpec, prep, stepper, memory: _Memory):
        self.spec = spec
        self.prep = prep
        self.stepper = stepper  # (inputs, targets) -> anything; one training step
        self.memory = memory  # its baseline: the model and data built, the mode's stepper not yet

    @classmethod
    def build(cls, spec: BenchSpec, mode: str, *, fast: bool = False) -> Session:
        from . import train
        from .recipe import recipe_from_dict

        recipe = recipe_from_dict(spec.recipe, origin="(bench)")
        prep = train.prepare(recipe, attribution=False)
        # the same baseline in every mode, so that what a tracker holds counts as valuation's memory
        memory = _Memory(prep.device)
        return cls(spec, prep, _stepper(mode, prep, spec.methods, fast), memory)

    def rechecks(self, step: int) -> bool:
        """Whether the tracker (if any) re-checks its hooks' coverage before ``step`` (from 1): a
        few steps of a run (1, 2, 10, 100, ...; ``coverage.recheck_due``), each about a step's cost."""
        tracker = getattr(self.stepper, "tracker", None)
        return tracker is not None and tracker.rechecks(step)

    def batches(self, count: int | None = None) -> list[tuple]:
        """``count`` (default ``total_steps``) full batches in the recipe's data order (a fresh
        permutation per epoch)."""
        import torch

        p = self.prep
        n, bs = p.data.n_train, p.recipe.train.batch_size
        gen = torch.Generator().manual_seed(p.recipe.train.seed)
        x, y = p.data.x_train.to(p.device), p.data.y_train.to(p.device)
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        order, pos = None, n
        while len(out) < (self.spec.total_steps if count is None else count):
            if pos + bs > n:  # only full batches, so every timed step has the same size
                order, pos = torch.randperm(n, generator=gen).to(p.device), 0
            assert order is not None  # drawn on the first pass: pos starts at n
            idx = order[pos : pos + bs]
            out.append((x[idx], y[idx]))
            pos += bs
        return out

    def step(self, inputs, targets):
        result = self.stepper(inputs, targets)
        self.prep.scheduler.step()
        return result

    def close(self) -> None:
        close = getattr(self.stepper, "close", None)
        if close is not None:
            close()


def _stepper(mode: str, prep, methods: Sequence[str], fast: bool):
    from . import train

    clip = prep.recipe.train.grad_clip
    if mode == "plain":
        return _PlainStep(prep.model, prep.optimizer, prep.loss_fn, clip)
    if mode == "attribution":
        # the exact mode is never fast; the fast one takes the recipe's settings (attribution.fast)
        # where it has them, else the tracker's defaults
        fast_mode = (prep.recipe.attribution.fast or True) if fast else False
        tracker = train.build_tracker(prep, methods=methods, fast=fast_mode)
        return _TrackerStep(tracker)
    if mode == "per_example":
        return PerExampleStep(prep.model, prep.optimizer, prep.loss_fn, prep.val_x, prep.val_y, methods, clip)
    raise ValueError(f"unknown bench mode {mode!r}; expected one of {MODES}")


@dataclass
class _PlainStep:
    model: object
    optimizer: object
    loss_fn: Callable
    max_grad_norm: float | None

    def __call__(self, inputs, targets):
        from .tracker import training_step

        return training_step(self.model, self.optimizer, self.loss_fn, inputs, targets, self.max_grad_norm)


@dataclass
class _TrackerStep:
    tracker: InRunShapley

    def __call__(self, inputs, targets):
        return self.tracker.step(inputs, targets)

    def close(self) -> None:
        self.tracker.close()


class PerExampleStep:
    """The direct way: materialise every example's gradient, dot it with M, then step.

    Computes what ``InRunShapley.step`` computes, φ[i, m, q] = ⟨M_m,q, g_i⟩ / B with
    M_m = scale_m ⊙ ∇val in the engine's flat parameter layout (the scales from
    ``precond.scales``, ∇val from the engine), and makes the same update; the batch gradient
    is the mean of the per-example gradients, as a per-example-gradient trainer has it.
    """

    def __init__(self, model, optimizer, loss_fn, val_x, val_y, methods, max_grad_norm=None):
        from torch.func import functional_call, grad, vmap

        from .engine import GhostEngine
        from .precond import OptimizerView

        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.val_x, self.val_y = val_x, val_y
        self.methods = list(methods)
        self.max_grad_norm = max_grad_norm
        self.view = OptimizerView(optimizer)
        # the layout InRunShapley uses: the optimizer's parameter order
        self.engine = GhostEngine(model, order=[p for g in optimizer.param_groups for p in g["params"]])
        self.engine.remove()  # only its validation gradient and layout are used: no hooks here
        names = {id(p): n for n, p in model.named_parameters()}
        self.named = [(names[id(p)], p) for p in self.engine.parameters]
        buffers = dict(model.named_buffers())

        def example_loss(params, x, y):
            out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0)).sum()

        self._per_example = vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="different")

    def __call__(self, inputs, targets):
        values = self.values(inputs, targets)
        self.optimizer.step()
        return values

    def values(self, inputs, targets):
        """φ [B, n_methods, Q], leaving the batch gradient in ``.grad`` for the optimizer."""
        import torch

        from .precond import scales

        val_grads, _ = self.engine.validation_gradients(self.loss_fn, self.val_x, self.val_y, False)
        G = self._per_example({n: p.detach() for n, p in self.named}, inputs, targets)
        B = inputs.shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        for n, p in self.named:
            p.grad = G[n].mean(0)
        clip = self._clip()
        per_example = self.engine.flatten([G[n] for n, _ in self.named], rows=B)  # [B, N]
        val = val_grads.to(torch.promote_types(val_grads.dtype, torch.float32))  # [Q, N]
        M = val.new_zeros(len(self.methods), *val.shape)  # [n_methods, Q, N]; zero where not updated
        segments = self.view.segments(self.engine.parameters)
        for k, m in enumerate(self.methods):
            for where, scale in scales(m, segments, clip):
                M[k, :, where] = val[:, where] * scale
        return torch.einsum("bn,mqn->bmq", per_example.to(M.dtype), M) / B

    def _clip(self) -> float:
        """The clip factor, by ``training_step``'s rule (torch's clip_grad_norm_)."""
        from .tracker import clip_gradients

        if self.max_grad_norm is None:
            return 1.0
        return clip_gradients((p for _, p in self.named), self.max_grad_norm)


# ---- the measurements (each runs in a child process) ------------------------------------------


def measure(spec: BenchSpec, mode: str, fast: bool = False) -> dict:
    """Time ``spec.steps`` steps of ``mode`` after ``spec.warmup`` untimed ones; peak memory.

    The fast mode's own warm-up steps (``attribution.fast.warmup``, which compute ∇val every step)
    are untimed as well, so that its timed steps show the steady state a long run sees. So are the
    steps where the tracker re-checks its hooks' coverage (``Session.rechecks``): a run of T steps
    has about log10(T) of them, a bench of 20 steps would count step 10 as a twentieth of the run."""
    if fast:
        spec = replace(spec, warmup=spec.warmup + fast_settings(spec)["warmup"])
    load_before = os.getloadavg()[0]
    session = Session.build(spec, mode, fast=fast)
    (timing,), _ = timed_steps([session])
    peak = session.memory.report()
    session.close()
    return {
        **timing,
        **peak,
        "fusion_blocked": fusion_blocked(session),
        "threads": _threads(),
        "load_1m": (load_before + os.getloadavg()[0]) / 2,
    }


def measure_in_turn(spec: BenchSpec) -> dict[str, dict]:
    """The throughput of every measurement of a repeat (``measurements``), timed in this one process,
    ``IN_TURN_BLOCK`` steps of each in turn: a slower stretch of a shared machine (another process, a
    busier host, another core) then slows every mode alike, which separate processes do not see.
    Every mode warms up as long as the fast mode does. After the timed steps, one more step of each
    attribution mode times its contraction alone (``contraction_ms``), beside the plain step timed here.
    Keyed by ``task_name``; the timing fields of ``measure``, and ``contract_ms``."""
    keys = measurements(spec.fast)
    if spec.fast:
        spec = replace(spec, warmup=spec.warmup + fast_settings(spec)["warmup"])
    sessions = [Session.build(spec, mode, fast=fast) for mode, fast in keys]
    try:
        timings, last_batch = timed_steps(sessions, IN_TURN_BLOCK)
        for session, timing in zip(sessions, timings, strict=True):
            timing["contract_ms"] = contraction_ms(session, last_batch, session.memory)
    finally:
        for session in sessions:
            session.close()
    return {task_name(mode, fast): timing for (mode, fast), timing in zip(keys, timings, strict=True)}


def timed_steps(sessions: list[Session], block: int = 1) -> tuple[list[dict], tuple]:
    """Step every session through the same batches, ``block`` steps each in turn (who goes first
    rotates from turn to turn), timing each one's ``_timed_steps``; each stops after its last timed
    step. Returns each session's timing and the last batch."""
    timed = [_timed_steps(session) for session in sessions]
    last = [max(steps) for steps in timed]
    batches = sessions[0].batches(max(last))
    compiling = [_CompileTime(session) for session in sessions]
    seconds: list[list[float]] = [[] for _ in sessions]
    warmup = sessions[0].spec.warmup
    for round_, start in enumerate(range(1, max(last) + 1, block)):
        for turn in range(len(sessions)):
            i = (turn + round_) % len(sessions)
            for step in range(start, min(start + block, last[i] + 1)):
                if step == warmup + 1:
                    compiling[i].warmed_up()
                t0 = time.perf_counter()
                sessions[i].step(*batches[step - 1])
                sessions[i].memory.sync()
                elapsed = time.perf_counter() - t0
                if step in timed[i]:
                    seconds[i].append(elapsed)
    timings = []
    for session, took, end, clock in zip(sessions, seconds, last, compiling, strict=True):
        bs = session.prep.recipe.train.batch_size
        timings.append(
            {
                "examples_per_s": bs * len(took) / sum(took),
                "step_ms": 1000 * float(np.median(took)),
                "seconds": float(sum(took)),
                "warmup_steps": warmup,  # untimed, before the timed ones
                "untimed_rechecks": end - warmup - len(took),  # untimed among the timed ones
                **clock.report(),
            }
        )
    return timings, batches[-1]


def _timed_steps(session: Session) -> set[int]:
    """The ``steps`` steps (from 1) that are timed: those after the warm-up, but for the tracker's
    coverage re-checks among them, which run untimed."""
    spec, step = session.spec, session.spec.warmup
    timed: set[int] = set()
    while len(timed) < spec.steps:
        step += 1
        if not session.rechecks(step):
            timed.add(step)
    return timed


def contraction_ms(session: Session, batch: tuple, memory: _Memory) -> float:
    """The median time (ms) of an eager tracker's contraction alone (``GhostEngine.contract``: every
    example's a and b with M), run ``CONTRACT_RUNS`` times over inside one more step, on that step's
    M, a and b: the part of a valued step that no exact method can leave out (NaN without one)."""
    tracker = getattr(session.stepper, "tracker", None)
    if tracker is None or tracker.compiles:  # a compiled contraction runs inside its graph
        return math.nan
    engine, contract, runs = tracker.engine, tracker.engine.contract, []

    def contract_timed(*args, **kwargs):
        result = contract(*args, **kwargs)
        for _ in range(CONTRACT_RUNS):
            start = time.perf_counter()
            contract(*args, **kwargs)
            memory.sync()
            runs.append(time.perf_counter() - start)
        return result

    engine.contract = contract_timed
    try:
        session.step(*batch)
    finally:
        del engine.contract  # the class's method again
    return 1000 * float(np.median(runs)) if runs else math.nan


def fusion_blocked(session: Session) -> str:
    """Why ``attribution.fuse_validation`` took the separate pass after all ("" where it fused, or was
    not asked for): such timings are those of the separate pass."""
    tracker = getattr(session.stepper, "tracker", None)
    if tracker is None or not tracker.fuse_validation:
        return ""
    return tracker.fusion_blocked or ""


class _CompileTime:
    """Seconds the tracker spent compiling (``attribution.compile``): in all, and in the timed steps
    (which the warm-up steps should have spared: a compiling timed step would skew the throughput)."""

    def __init__(self, session: Session):
        self.tracker = getattr(session.stepper, "tracker", None)
        self.at_warmup = 0.0

    def seconds(self) -> float:
        return float(getattr(self.tracker, "compile_seconds", 0.0))

    def warmed_up(self) -> None:
        self.at_warmup = self.seconds()

    def report(self) -> dict:
        failed = getattr(self.tracker, "compile_failed", None)
        total = self.seconds()
        return {"compile_s": total, "compile_timed_s": total - self.at_warmup, "compile_failed": failed or ""}


class _Memory:
    """Peak memory of this process: RSS on the CPU, allocated memory on CUDA.

    The baseline is taken at construction (``Session.build``: the data and model built, the mode's
    stepper not yet), so that the increase over it shows what the stepper and the steps need beside
    the torch import, data and model. The peak is reset there too where the system allows (Linux,
    CUDA): a large file's loading peaks above any step, and would give every mode the same peak.
    """

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.before = torch.cuda.memory_allocated(device) / 2**20
        else:
            _reset_peak_rss()
            self.before = _current_rss_mb()
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def report(self) -> dict:
        if self.cuda:
            peak = self.torch.cuda.max_memory_allocated(self.device) / 2**20
        else:  # the kernel's RSS counters are read lazily: never report a peak below the current RSS
            peak = max(_peak_rss_mb(), _current_rss_mb())
        return {"peak_mb": peak, "before_mb": self.before, "peak_increase_mb": peak - self.before}


def _reset_peak_rss() -> None:
    """Linux's peak RSS of this process (VmHWM, which ``ru_maxrss`` reads) set to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then includes loading
        pass


def _peak_rss_mb() -> float:
    try:  # this process's own peak: ru_maxrss may also hold the parent's at the fork
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux (bytes on macOS)
    return kb / 2**20 if sys.platform == "darwin" else kb / 2**10


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux: the peak so far is the best bound there
        return _peak_rss_mb()


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def fidelity(spec: BenchSpec) -> dict:
    """Per-step Pearson of the fast values against the exact ones, on identical copies of the model.

    Both take the separate validation pass: with fused rows the exact tracker would fuse every
    step and the fast one only the steps that refresh ∇val, so their updates would differ by
    rounding and the two copies drift apart, which is not what the fast mode costs."""
    spec = _without_fused_rows(spec)
    exact = Session.build(spec, "attribution", fast=False)
    fast = Session.build(spec, "attribution", fast=True)
    # each copy on a random stream of its own, as it left it after its build (both were seeded alike):
    # stepped in turn on torch's one stream, a model with dropout drew other masks in each copy
    streams = [_Stream(exact.memory.cuda), _Stream(fast.memory.cuda)]
    per_step: dict[str, list[float]] = {m: [] for m in spec.methods}
    reused: list[bool] = []  # per step: whether the fast mode reused an earlier ∇val (no validation loss)
    checks: list[float] = []  # per step: what the fast mode's check of reuse found (NaN: no check)
    tracker = fast.stepper.tracker
    factored: list[int] = []  # per step: weight matrices the fast mode contracted through low-rank factors
    for x, y in exact.batches():
        with streams[0].active():
            want = exact.step(x, y)
        with streams[1].active():
            got = fast.step(x, y)
        reused.append(math.isnan(got.val_loss))
        checks.append(got.reuse_pearson)
        factored.append(tracker.engine.last_factored)
        for m in spec.methods:
            per_step[m].append(pearson(got.values[m], want.values[m]))
    drift = _max_parameter_gap(exact.prep.model, fast.prep.model)
    exact.close()
    fast.close()
    low_rank = {"rank": tracker.fast.rank, "factorable": tracker.engine.factorable, "factored": factored}
    out = {"pearson": per_step, "reused": reused, "checks": checks, "max_parameter_gap": drift}
    return {**out, "low_rank": low_rank}


class _Stream:
    """A random stream of one session's own: torch's state (CPU, and CUDA where the model is), taken
    now, put in place for each of the session's steps and kept after them."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.state = self._read()

    def _read(self) -> tuple:
        import torch

        return torch.get_rng_state(), torch.cuda.get_rng_state() if self.cuda else None

    @contextmanager
    def active(self):
        import torch

        torch.set_rng_state(self.state[0])
        if self.cuda:
            torch.cuda.set_rng_state(self.state[1])
        try:
            yield
        finally:
            self.state = self._read()


def _without_fused_rows(spec: BenchSpec) -> BenchSpec:
    recipe = {**spec.recipe, "attribution": {**spec.recipe.get("attribution", {}), "fuse_validation": False}}
    return replace(spec, recipe=recipe)


def pearson(a, b) -> float:
    """Pearson correlation of two value tensors (flattened, float64); NaN when either is constant."""
    a = a.detach().to("cpu").double().flatten().numpy()
    b = b.detach().to("cpu").double().flatten().numpy()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _max_parameter_gap(m1, m2) -> float:
    """max |w1 − w2| after training both copies: the fast mode must make the same updates."""
    pairs = zip(m1.parameters(), m2.parameters(), strict=True)
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in pairs)


# The phases of an attribution step that --profile times by name (when the tracker has them):
# GhostEngine methods; inside "matrices", AdamRead.state (reading Adam's state) and precond.scale (P).
ENGINE_PHASES = ("validation_gradients", "extra_gradients", "matrices", "contract")
# phases timed inside another (M is built a block at a time, each block's state read and scored first)
INNER_PHASES = {"matrices: state": "matrices", "matrices: rules": "matrices"}
PHASE = "phase::"  # prefix of the profiler ranges that time one phase


def profile(spec: BenchSpec, n_steps: int = 5) -> dict:
    """Self time per op, and time per phase, of ``n_steps`` attribution steps beside as many plain
    steps (torch.profiler); the attribution mode is the fast one when ``spec.fast``."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    out = {}
    for mode in ("plain", "attribution"):
        fast = spec.fast and mode == "attribution"
        # past the fast mode's own warm-up too (every step of which computes ∇val), as ``measure``
        warmup = spec.warmup + (fast_settings(spec)["warmup"] if fast else 0)
        session = Session.build(spec, mode, fast=fast)
        batches = session.batches(warmup + min(n_steps, spec.steps))
        for x, y in batches[:warmup]:
            session.step(x, y)
        timed = batches[warmup:]
        memory = session.memory
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if memory.cuda else [])
        with _phases_labelled(session), torch_profile(activities=activities) as prof:
            for x, y in timed:
                with record_function(PHASE + "step"):
                    session.step(x, y)
                    memory.sync()
        session.close()
        averages = prof.key_averages()
        sort_key = "self_cuda_time_total" if memory.cuda else "self_cpu_time_total"
        ops = [e for e in averages if not e.key.startswith(PHASE)]
        out[mode] = {
            "steps": len(timed),
            "table": averages.table(sort_by=sort_key, row_limit=PROFILE_ROWS),
            "self_us": {e.key: _self_us(e, memory.cuda) for e in ops},
            "calls": {e.key: int(e.count) for e in ops},
            # wall-clock (CPU-side) time inside each phase, children included
            "phase_us": {
                e.key.removeprefix(PHASE): float(e.cpu_time_total)
                for e in averages
                if e.key.startswith(PHASE)
            },
        }
    return out


@contextmanager
def _phases_labelled(session: Session):
    """Wrap the tracker's phases in profiler ranges for the duration of the block (then restore)."""
    from . import precond

    tracker = getattr(session.stepper, "tracker", None)
    if tracker is None or tracker.compiles:  # compiled phases run inside graphs: nothing to wrap
        yield
        return
    targets = [(tracker.engine, name, name) for name in ENGINE_PHASES]
    targets += [(precond.AdamRead, "state", "matrices: state"), (precond, "scale", "matrices: rules")]
    patched = []
    try:
        for owner, name, label in targets:
            if hasattr(owner, name):
                original = getattr(owner, name)
                patched.append((owner, name, original, name in vars(owner)))
                setattr(owner, name, _labelled(PHASE + label, original))
        yield
    finally:
        for owner, name, original, own in reversed(patched):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # an instance attribute over the class's method


def _labelled(label: str, fn: Callable) -> Callable:
    from torch.profiler import record_function

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return run


def phase_table(prof: dict) -> pd.DataFrame:
    """ms per step in each phase of the attribution step (and the plain step), and what is left."""
    att, plain = prof["attribution"], prof["plain"]

    def per_step(part: dict, key: str) -> float:
        return part["phase_us"].get(key, 0.0) / 1000 / part["steps"]

    named = [k for k in att["phase_us"] if k != "step"]
    rows = [("step", per_step(att, "step"), per_step(plain, "step"))]
    rows += [(k, per_step(att, k), float("nan")) for k in named]
    rest = per_step(att, "step") - sum(per_step(att, k) for k in named if k not in INNER_PHASES)
    rows.append(("rest: forward, backward (with hooks), optimizer", rest, float("nan")))
    return pd.DataFrame(rows, columns=["phase", "attribution_ms", "plain_ms"])


def _self_us(event, cuda: bool) -> float:
    if cuda:
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
    return float(event.self_cpu_time_total)


def profile_extra(prof: dict, rows: int = PROFILE_ROWS) -> pd.DataFrame:
    """Per op: self ms per step in attribution and plain steps, and the difference (the cost of values)."""
    att, plain = prof["attribution"], prof["plain"]
    ops = set(att["self_us"]) | set(plain["self_us"])
    frame = pd.DataFrame(
        {
            "op": sorted(ops),
            "attribution_ms": [att["self_us"].get(o, 0.0) / 1000 / att["steps"] for o in sorted(ops)],
            "plain_ms": [plain["self_us"].get(o, 0.0) / 1000 / plain["steps"] for o in sorted(ops)],
            "attribution_calls": [att["calls"].get(o, 0) / att["steps"] for o in sorted(ops)],
        }
    )
    frame["extra_ms"] = frame["attribution_ms"] - frame["plain_ms"]
    return frame.sort_values("extra_ms", ascending=False).head(rows).reset_index(drop=True)


# ---- the parent: run the children, summarise, write ------------------------------------------


@dataclass
class BenchResult:
    frame: pd.DataFrame  # one row per mode × repeat (the bench.parquet table)
    summary: dict  # the ratios and medians
    fidelity: dict | None = None
    profile: dict | None = None
    notes: list[str] = field(default_factory=list)


def run_child(spec: BenchSpec, task: str) -> dict:
    """Run ``task`` (see ``task_name``, or 'fidelity', 'profile') in a freshly spawned Python; its result."""
    with tempfile.TemporaryDirectory(prefix="adamshap-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
            bench_worker.PARENT: str(os.getpid()),  # the child stops if this process dies
        }
        if spec.threads is not None:  # set before torch starts its thread pools
            env.update(OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads))
        cmd = [sys.executable, "-m", "adamshap_core.bench_worker", str(spec_path), task, str(result_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if result is not None and "user_error" in result:
        raise UserError(result["user_error"])
    if proc.returncode != 0 or result is None:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-20:])
        raise RuntimeError(f"the bench child for {task!r} failed (exit {proc.returncode}):\n{tail}")
    return result


def measurements(fast: bool) -> list[tuple[str, bool]]:
    """(mode, fast) of the measurements in every repeat, in the order they run."""
    attribution = [("attribution", False)] + ([("attribution", True)] if fast else [])
    return [("plain", False), *attribution, ("per_example", False)]


def task_name(mode: str, fast: bool) -> str:
    """The worker's task for one measurement: the mode, with ``-fast`` for the fast attribution."""
    return f"{mode}-fast" if fast else mode


def task_measurement(task: str) -> tuple[str, bool]:
    """(mode, fast) of a measurement's task: ``task_name`` read back."""
    return task.removesuffix("-fast"), task.endswith("-fast")


# what a repeat's row takes from the child that times every mode in turn (the rest: the mode's own child)
TIMING_FIELDS = ("examples_per_s", "step_ms", "seconds", "warmup_steps", "untimed_rechecks", "contract_ms")


def schedule(repeats: int, fast: bool = False) -> list[tuple[int, str]]:
    """(repeat, task) of the children in the order they run: in every repeat, the one that times the
    modes in turn (``IN_TURN``), then each mode's own (its memory)."""
    tasks = [IN_TURN, *(task_name(mode, f) for mode, f in measurements(fast))]
    return [(r, task) for r in range(1, repeats + 1) for task in tasks]


def run(plan: BenchPlan, on_child: Callable[[str], None] | None = None) -> BenchResult:
    """Every repeat's children (``schedule``), then fidelity (with fast) and the profile (if asked).

    A row's throughput comes from the repeat's child that timed the modes in turn; its peak memory, and
    its throughput in a process of its own (``own_examples_per_s``), from the mode's own child."""
    spec = plan.spec
    rows, in_turn = [], {}
    for repeat, task in schedule(plan.repeats, spec.fast):
        measured = run_child(spec, task)
        if task == IN_TURN:
            in_turn = measured
        else:
            mode, fast = task_measurement(task)
            timing = {k: in_turn[task][k] for k in TIMING_FIELDS}
            own = {"own_examples_per_s": measured["examples_per_s"]}
            rows.append({**_row_keys(plan, mode, fast, repeat), **measured, **own, **timing})
        if on_child:
            on_child(f"{task} {repeat}/{plan.repeats}")
    frame = pd.DataFrame(rows)
    frame = frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]  # the contract's columns first
    result = BenchResult(frame, summarize(frame))
    if spec.fast:
        result.fidelity = run_child(spec, "fidelity")
        if on_child:
            on_child("fidelity")
    if plan.profile:
        result.profile = run_child(spec, "profile")
        if on_child:
            on_child("profile")
    return result


def n_children(plan: BenchPlan) -> int:
    return len(schedule(plan.repeats, plan.spec.fast)) + int(plan.spec.fast) + int(plan.profile)


def _row_keys(plan: BenchPlan, mode: str, fast: bool, repeat: int) -> dict:
    spec = plan.spec
    return {
        "recipe": plan.recipe_name,
        "device": plan.device,
        "mode": mode,
        "methods": ",".join(spec.methods),
        "batch_size": plan.batch_size,
        "repeat": repeat,
        "fast": fast,
        "val_rows": plan.val_rows,
        "steps": spec.steps,
        "warmup": spec.warmup,
    }


def measurement_keys(frame: pd.DataFrame) -> pd.Series:
    """Each row's measurement: its mode, or ``FAST_KEY`` for the fast attribution."""
    return frame["mode"].where(~frame["fast"].astype(bool), FAST_KEY)


def summarize(frame: pd.DataFrame) -> dict:
    """Medians per measurement and, per attribution variant (exact, fast), the three ratios.

    The top-level ratios are the headline: the fast mode's when it was measured, else the exact's.
    """
    cols = ["examples_per_s", "peak_mb", "peak_increase_mb", "step_ms", "contract_ms"]
    frame = frame.assign(key=measurement_keys(frame))
    if "contract_ms" not in frame:  # parquet files written before the contraction was timed
        frame = frame.assign(contract_ms=math.nan)
    med = frame.groupby("key")[cols].median()

    def ratio(col: str, num: str, den: str) -> float:
        return float(med.loc[num, col] / med.loc[den, col]) if med.loc[den, col] > 0 else float("nan")

    def ratios(key: str) -> dict:
        plain_ms = med.loc["plain", "step_ms"]
        return {
            "throughput_ratio": ratio("examples_per_s", key, "plain"),
            "memory_ratio": ratio("peak_mb", key, "plain"),
            "memory_increase_ratio": ratio("peak_increase_mb", key, "plain"),
            "speedup_over_per_example": ratio("examples_per_s", key, "per_example"),
            "contract_ms": float(med.loc[key, "contract_ms"]),
            # the throughput ratio a valued step would have if all but its contraction cost nothing
            "contraction_bound": float(plain_ms / (plain_ms + med.loc[key, "contract_ms"])),
        }

    variants = {"exact": ratios("attribution")}
    if FAST_KEY in med.index:
        variants["fast"] = ratios(FAST_KEY)
    headline = variants.get("fast", variants["exact"])
    medians = {k: med.loc[k].to_dict() for k in med.index}
    blocked = [b for b in frame.get("fusion_blocked", pd.Series(dtype=str)) if b]
    return {
        **headline,
        "variants": variants,
        "median": medians,
        "compile": compile_summary(frame),
        "fusion_blocked": blocked[0] if blocked else None,
    }


def compile_summary(frame: pd.DataFrame) -> dict | None:
    """With ``attribution.compile``: the median compile time of an attribution process, the most of it
    that fell into timed steps, and why compiling failed, if it did (None: nothing was compiled)."""
    rows = frame[frame["mode"] == "attribution"]
    if "compile_s" not in rows or not ((rows["compile_s"] > 0) | (rows["compile_failed"] != "")).any():
        return None
    failed = [f for f in rows["compile_failed"] if f]
    return {
        "median_s": float(rows["compile_s"].median()),
        "max_in_timed_steps_s": float(rows["compile_timed_s"].max()),
        "failed": failed[0] if failed else None,
    }


def fidelity_summary(fid: dict) -> dict[str, dict]:
    """Per method: median and minimum of the per-step Pearson, and the number of steps; and the median
    over the steps that reused ∇val alone (the others use the exact ∇val, so that their Pearson, 1
    without a factorised matrix, would flatter a median over all steps)."""
    out = {}
    for m, values in fid["pearson"].items():
        v = np.asarray(values, dtype=float)
        reused = np.asarray(fid.get("reused", [False] * v.size), dtype=bool)
        finite = np.isfinite(v)
        out[m] = {
            "median": _median(v[finite]),
            "min": float(v[finite].min()) if finite.any() else float("nan"),
            "steps": int(v.size),
            "undefined_steps": int(v.size - finite.sum()),
            "median_reused": _median(v[finite & reused]),
            "reused_steps": int(reused.sum()),
        }
    return out


def checks_summary(fid: dict) -> dict:
    """What the fast mode's checks of reuse found (``ReuseSchedule``): how many steps checked, and the
    lowest and median Pearson between the values of the recomputed ∇val and of the one it replaced."""
    checks = np.asarray([c for c in fid.get("checks", []) if c is not None], dtype=float)  # None: JSON's NaN
    checks = checks[~np.isnan(checks)]
    if not checks.size:
        return {"checks": 0, "min": math.nan, "median": math.nan}
    return {"checks": int(checks.size), "min": float(checks.min()), "median": _median(checks)}


def low_rank_summary(fid: dict) -> dict:
    """How much of the fast mode's error the low-rank M can account for: its rank, the weight matrices a
    kernel may factorise, the most factorised on one step and the steps with any (a matrix is factorised
    only where that costs less than its exact contraction, so a small model may have none)."""
    low_rank = fid["low_rank"]
    factored = low_rank["factored"]
    return {
        "rank": low_rank["rank"],
        "factorable": low_rank["factorable"],
        "most_factored": max(factored, default=0),
        "steps_factored": sum(1 for n in factored if n),
        "steps": len(factored),
    }


def _median(v: np.ndarray) -> float:
    return float(np.median(v)) if v.size else float("nan")


def write(plan: BenchPlan, result: BenchResult, profile_text: str | None = None) -> list[Path]:
    """bench.parquet, bench.json with the summary (and profile.txt) into the plan's folder, atomically;
    returns the paths written."""
    import torch

    from . import runio

    try:
        plan.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the bench folder {plan.out}: {e.strerror or e}.") from None
    paths = [runio.atomic_write_parquet(plan.out / "bench.parquet", result.frame)]
    summary = {
        "recipe": plan.recipe_name,
        "recipe_path": plan.recipe_path,
        "device": plan.device,
        "batch_size": plan.batch_size,
        "val_rows": plan.val_rows,
        "methods": plan.spec.methods,
        "fast": plan.spec.fast,
        "fast_settings": fast_settings(plan.spec) if plan.spec.fast else None,
        "steps": plan.spec.steps,
        "warmup": plan.spec.warmup,
        "repeats": plan.repeats,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "created": runio.now_iso(),
        "load_1m_min": float(result.frame["load_1m"].min()),
        "load_1m_max": float(result.frame["load_1m"].max()),
        **result.summary,
    }
    if result.fidelity is not None:
        summary["fast_pearson"] = fidelity_summary(result.fidelity)
        summary["fast_max_parameter_gap"] = result.fidelity["max_parameter_gap"]
        summary["fast_low_rank"] = low_rank_summary(result.fidelity)
        summary["fast_reuse_checks"] = checks_summary(result.fidelity)
    paths.append(runio.atomic_write_json(plan.out / "bench.json", summary))
    if profile_text is not None:
        paths.append(runio.atomic_write_text(plan.out / "profile.txt", profile_text))
    return paths


def fast_settings(spec: BenchSpec) -> dict:
    """The fast mode's settings as measured: the recipe's attribution.fast, else the defaults."""
    from .fast import FastMode

    given = spec.recipe.get("attribution", {}).get("fast")
    return FastMode(**(given or {})).model_dump()


# ---- several benches side by side (make bench) ---------------------------------------------------


def collect(folder: str | Path) -> pd.DataFrame:
    """One row per bench.json under ``folder`` and attribution variant (exact, fast), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--summary {folder} is not a folder; expected a folder holding bench results.")
    rows = []
    for path in sorted(folder.rglob("bench.json")):
        try:
            s = json.loads(path.read_text())
            rows += _collected_rows(path.parent.relative_to(folder), s)
        except (OSError, ValueError, KeyError) as e:
            why = f"{path} is not a readable bench summary ({e}); remove it or rerun that bench."
            raise UserError(why) from None
    if not rows:
        raise UserError(f"no bench.json under {folder}; run `adamshap bench --out {folder}/NAME` first.")
    return pd.DataFrame(rows).sort_values("created", kind="stable").reset_index(drop=True)


def _worst(values) -> float | None:
    """The lowest of the methods' figures (NaN where any is undefined: NaN, null in bench.json; None
    without a fast mode)."""
    values = [math.nan if v is None else v for v in values]
    if not values:
        return None
    return math.nan if any(math.isnan(v) for v in values) else min(values)


def _collected_rows(name: Path, s: dict) -> list[dict]:
    med = s["median"]
    # the fast mode's worst method: its per-step minimum and its median Pearson against exact
    pearson = list((s.get("fast_pearson") or {}).values())
    worst = {
        "fast_pearson_min": _worst(p["min"] for p in pearson),
        "fast_pearson_median": _worst(p["median"] for p in pearson),
        # summaries written before the reused steps were counted have only the median over all steps
        "fast_pearson_median_reused": _worst(p.get("median_reused", math.nan) for p in pearson),
    }
    rows = []
    for variant, ratios in s["variants"].items():
        fast = variant == "fast"
        rows.append(
            {
                "name": str(name),
                "variant": variant,
                "recipe": s["recipe"],
                "device": s["device"],
                "batch_size": s["batch_size"],
                "val_rows": s["val_rows"],
                "methods": ",".join(s["methods"]),
                "plain_examples_per_s": med["plain"]["examples_per_s"],
                "attribution_examples_per_s": med[FAST_KEY if fast else "attribution"]["examples_per_s"],
                "per_example_examples_per_s": med["per_example"]["examples_per_s"],
                **ratios,
                **{k: v if fast else None for k, v in worst.items()},
                "load_1m": s.get("load_1m_max", float("nan")),
                "created": s.get("created", ""),
            }
        )
    return rows
