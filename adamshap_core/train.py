"""The one training loop a recipe drives (``train``, pruning retrains, replays).

``prepare(recipe)`` builds everything that can fail on bad input (data, model,
optimizer, scheduler, device, the attribution tracker) before anything is
written; ``run(prepared)`` trains and returns a ``TrainResult``. ``train(recipe)``
does both.

Determinism: ``torch.manual_seed(train.seed)`` before the model is built, and a
separate ``torch.Generator`` seeded with ``train.seed`` draws the data order of
each epoch, so on the CPU the same recipe gives the same run, bit for bit.

Observer hook: ``run(..., on_step=fn)`` calls ``fn(step, batch, ctx)`` at every
step *before* its forward pass, where ``step`` counts from 1, ``batch`` holds the
positions (rows of ``data.x_train``) of the step's examples, and ``ctx`` is a
``StepContext``. At that moment the model holds w_t, the optimizer holds the
state left by step t-1 and the learning rate of step t is already set, so
ground-truth code can copy the model and optimizer and replay step t exactly.
The hook must not change that state; it may change the validation target of
the tracker (``ctx.tracker.set_validation``) to value the run against a query.

Checkpoints and faults: ``run(..., checkpointer=, resume=, stop=)`` saves the
loop's whole state every ``train.checkpoint_every`` steps and can continue from
it bit for bit (see ``checkpoint.py``); a non-finite loss, gradient or value
stops the run with ``TrainingDiverged`` naming the step, carrying the values of
the steps before it.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from torch import nn

from .checkpoint import Checkpointer, LoopState, TrainingInterrupted
from .data import Dataset, load_dataset
from .digests import data_digest, params_digest
from .engine.ghost import modes_kept, set_modes
from .errors import UserError, memory_short_as
from .fast import FastMode
from .models import build_model, loss_for, per_example_loss
from .recipe import OptimCfg, Recipe
from .run_tables import STEP_COLUMNS, TABLES, value_column

if TYPE_CHECKING:
    from .tracker import StepResult

SPLITS = ("train", "val", "test")  # the splits whose loss and accuracy a run's metrics give
SHOWN_IDS = 5  # example ids a message about non-finite values names at most


@runtime_checkable
class StepValuer(Protocol):
    """What the training loop asks of its tracker: ``InRunShapley``, or a stand-in that wraps one
    (``attribute.QueryValues``, which values each step against many queries)."""

    # read-only properties, so that any attribute of a narrower type (a tuple of methods) qualifies
    @property
    def methods(self) -> Sequence[str]: ...

    # whether the validation rows may ride in the training batch
    @property
    def fuse_validation(self) -> bool: ...

    # with fuse_validation: why the last step took the separate pass
    @property
    def fusion_blocked(self) -> str | None: ...

    # with fuse_validation: why no step can fuse (None: some may)
    @property
    def rows_blocked(self) -> str | None: ...

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepResult: ...

    def set_validation(self, val_inputs, val_targets, *, per_target: bool = False) -> None: ...

    def state_dict(self) -> dict: ...  # what a checkpoint keeps of it

    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None: ...


class TrainingDiverged(UserError):
    """The loss, a gradient or the values became NaN or infinite; ``partial`` holds the steps before."""

    def __init__(self, message: str, partial: TrainResult | None = None):
        super().__init__(message)
        self.partial = partial


@dataclass
class StepContext:
    """What ``on_step`` sees, just before step ``step`` runs."""

    step: int  # 1-based global step
    epoch: int  # 1-based
    batch: torch.Tensor  # positions into data.x_train (on the CPU)
    inputs: torch.Tensor
    targets: torch.Tensor
    lr: float  # the learning rate this step will use (first param group)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tracker: StepValuer | None  # None without attribution
    data: Dataset
    recipe: Recipe


OnStep = Callable[[int, torch.Tensor, StepContext], None]
# run's report of its progress: (steps done, steps in all, the last step's loss, examples per second);
# called once before the first step (loss NaN) and after every step, for a progress bar
OnProgress = Callable[[int, int, float, float], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("`train.device` is cuda, but no CUDA device is available here; expected auto or cpu.")
    return torch.device(name)


def build_optimizer(cfg: OptimCfg, params) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise UserError(f"`optim.name` is {cfg.name!r}; expected adam, adamw or sgd.")


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr for scheduler step ``s`` (0-based; step t of training uses s = t-1).

    Linear warm-up over ``warmup`` steps from lr/warmup to lr, then constant, or a cosine or
    linear decay that reaches zero one step after the last step (so no step has lr 0).
    """

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        p = (s - warmup) / max(1, total - warmup)
        p = min(max(p, 0.0), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        return 1.0 - p

    return f


def sample_record_steps(total: int, k: int) -> list[int]:
    """``k`` step numbers in 1..total: steps 1-5 first, then the rest spread evenly from step 6 to the
    last, both included (8 of 4,100 steps: 1-6, 2053, 4100)."""
    if k <= 0 or total <= 0:
        return []
    first = list(range(1, min(5, k, total) + 1))
    n_later = total - len(first)  # steps len(first)+1 .. total, never listed (a run can be long)
    rest = k - len(first)
    if rest >= n_later:
        return first + list(range(len(first) + 1, total + 1))
    if rest > 0:
        idx = np.unique(np.linspace(0, n_later - 1, num=rest).round().astype(np.int64))
        first += [len(first) + 1 + int(i) for i in idx]
    return first


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable = per_example_loss,
    batch: int = 1024,
) -> tuple[float, float]:
    """(mean per-example loss, accuracy) of ``model`` on ``x, y``, in chunks of ``batch`` rows.

    Accuracy is over every target that counts: one per example for a classifier, every real
    (not padded, target >= 0) token for a language model, i.e. next-token accuracy.
    """
    if len(y) == 0:
        return float("nan"), float("nan")
    loss_sum, correct, counted = 0.0, 0, 0
    for i in range(0, len(y), batch):
        out, yb = model(x[i : i + batch]), y[i : i + batch]
        loss_sum += float(loss_fn(out, yb).sum())
        real = yb >= 0
        correct += int(((out.argmax(dim=-1) == yb) & real).sum())
        counted += int(real.sum())
    return loss_sum / len(y), correct / max(counted, 1)


@dataclass
class Prepared:
    """Everything a run needs, built (and validated) before anything is written."""

    recipe: Recipe
    data: Dataset  # on the CPU
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tracker: StepValuer | None
    methods: list[str]
    steps_per_epoch: int
    total_steps: int
    val_x: torch.Tensor  # the validation target of attribution (on device)
    val_y: torch.Tensor
    loss_fn: Callable = per_example_loss  # the model kind's per-example loss [B]


def prepare(
    recipe: Recipe,
    *,
    data: Dataset | None = None,
    keep: Sequence[int] | None = None,
    attribution: bool | None = None,
) -> Prepared:
    """Build data, model, optimizer, scheduler and tracker for ``recipe``.

    ``data``: reuse an already loaded dataset; ``keep``: train on these training
    positions only (pruning retrains); ``attribution``: override ``attribution.enabled``.
    """
    device = resolve_device(recipe.train.device)
    if data is None:
        data = load_dataset(recipe.data, image=recipe.model.kind == "cnn")
    if keep is not None:
        data = data.subset(keep)
        if data.n_train == 0:
            raise UserError("nothing left to train on: the kept subset of the training split is empty.")
    torch.manual_seed(recipe.train.seed)
    model = _build_on(device, recipe, data)
    loss_fn = loss_for(recipe.model)
    optimizer = build_optimizer(recipe.optim, model.parameters())
    steps_per_epoch = math.ceil(data.n_train / recipe.train.batch_size)
    total = steps_per_epoch * recipe.train.epochs
    if keep is None:  # (a retrain on a kept subset takes fewer steps than the run it prunes)
        check_sizes(recipe, total, len(data.y_val))
    factor = lr_factor(recipe.optim.schedule, recipe.optim.warmup_steps, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    n_val = recipe.attribution.val_batch or len(data.y_val)
    val_x = data.x_val[:n_val].to(device)
    val_y = data.y_val[:n_val].to(device)
    prep = Prepared(
        recipe=recipe,
        data=data,
        device=device,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        tracker=None,
        methods=[],
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        val_x=val_x,
        val_y=val_y,
        loss_fn=loss_fn,
    )
    if recipe.attribution.enabled if attribution is None else attribution:
        prep.methods = list(recipe.attribution.methods)
        prep.tracker = build_tracker(prep)
    return prep


def check_sizes(recipe: Recipe, total_steps: int, n_val: int) -> None:
    """The recipe's step and row counts that only the data can check: each would be cut silently."""
    warmup = recipe.optim.warmup_steps
    if warmup > total_steps:
        raise UserError(
            f"`optim.warmup_steps` ({warmup}) is more than the run's {total_steps} steps, so the learning "
            f"rate would never reach optim.lr; expected at most {total_steps}."
        )
    val_batch = recipe.attribution.val_batch
    if val_batch is not None and val_batch > n_val:
        raise UserError(
            f"`attribution.val_batch` ({val_batch}) is more than the {n_val} validation examples; expected "
            f"at most {n_val}, or null for all of them."
        )


def build_tracker(prep: Prepared, methods: Sequence[str] | None = None, fast: bool | FastMode | None = None):
    """The ``InRunShapley`` of ``prep``'s model, optimizer and validation rows, as its recipe asks;
    ``methods`` and ``fast`` override the recipe's (``adamshap bench`` times each mode)."""
    from .tracker import InRunShapley

    a = prep.recipe.attribution
    try:
        return InRunShapley(
            prep.model,
            prep.optimizer,
            prep.loss_fn,
            prep.val_x,
            prep.val_y,
            methods=tuple(a.methods if methods is None else methods),
            max_grad_norm=prep.recipe.train.grad_clip,
            fast=(a.fast or False) if fast is None else fast,
            fuse_validation=a.fuse_validation,
            compile=a.compile,
        )
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UserError(f"attribution cannot run on this model/optimizer: {e}") from None


def _build_on(device: torch.device, recipe: Recipe, data: Dataset) -> nn.Module:
    """The recipe's model on ``device``; a model too large for this machine is bad input."""
    too_large = (
        f"`model` ({recipe.model.model_dump(exclude_defaults=True)}) does not fit in memory on {device}: "
        "expected smaller layers (model.hidden, model.d_model, ...)."
    )
    with memory_short_as(functools.partial(UserError, too_large)):
        return build_model(recipe.model, data).to(device)


class EvaluationOutOfMemory(UserError):
    """Out of memory in the evaluation after the last step: the run can be resumed from its last
    checkpoint, written after that step, once memory is freed."""


@dataclass
class TrainResult:
    recipe: Recipe
    data: Dataset
    model: nn.Module
    methods: list[str]
    values: dict[str, np.ndarray]  # method -> float64 [n_train], summed over steps
    n_steps: np.ndarray  # int64 [n_train]: steps each example was in the batch
    steps: pd.DataFrame  # step, epoch, lr, train_loss, val_loss, clip_factor, seconds, reuse_pearson
    steps_values: pd.DataFrame  # step, example_id, value_<method> at the recorded steps
    metrics: dict = field(default_factory=dict)  # final losses and accuracies
    wall_seconds: float = 0.0
    steps_done: int = 0
    total_steps: int = 0

    def values_frame(self) -> pd.DataFrame:
        """One row per training example: the values.parquet columns (plus clean_label and source_row)."""
        d = self.data
        cols: dict[str, object] = {"example_id": d.example_id.numpy().astype(np.int64)}
        for m in self.methods:
            cols[value_column(m)] = self.values[m]
        cols["n_steps"] = self.n_steps
        cols.update(d.example_columns())  # label, is_noisy, ... (a text corpus gives its texts)
        return pd.DataFrame(cols)


def run(
    prep: Prepared,
    *,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
    max_steps: int | None = None,
    checkpointer: Checkpointer | None = None,
    resume: bool = False,
    stop: Callable[[], bool] | None = None,
    record: Sequence[int] | None = None,
    splits: Sequence[str] = SPLITS,
    measure_val_loss: bool = True,
) -> TrainResult:
    """Train ``prep`` for its recipe's epochs (or ``max_steps`` steps); see the module doc.

    ``record``: the steps whose per-step values go to ``steps_values`` (default: the recipe's
    ``attribution.record_steps`` sample); a replay passes the steps it compares. ``splits``: those
    whose loss and accuracy the metrics give after the last step (a replay reads none of them, a
    retrain the test split's alone; the training split of a large text source takes a minute).
    ``measure_val_loss``: an unvalued run measures the validation loss at every step for
    ``steps.parquet`` (a retrain, which reads none, leaves it NaN and saves a forward pass a step).
    ``on_progress`` (``OnProgress``) hears of the steps done; the loop prints nothing itself.

    ``checkpointer`` saves a checkpoint every ``train.checkpoint_every`` steps; with ``resume``
    the run continues from its checkpoint. ``stop()`` is polled after every step: once it is
    true the run saves a checkpoint and raises ``TrainingInterrupted``. A non-finite loss,
    gradient or value raises ``TrainingDiverged`` carrying the result of the steps before.
    """
    r, d, dev = prep.recipe, prep.data, prep.device
    model, opt, sched, tracker = prep.model, prep.optimizer, prep.scheduler, prep.tracker
    n = d.n_train
    x_train, y_train = d.x_train.to(dev), d.y_train.to(dev)
    ids = d.example_id.numpy()
    if record is None:
        record = sample_record_steps(prep.total_steps, r.attribution.record_steps)
    recorded_steps = set(record) if tracker else set()
    limit = prep.total_steps if max_steps is None else min(max_steps, prep.total_steps)

    gen = torch.Generator().manual_seed(r.train.seed)  # the data order of each epoch
    state = checkpointer.load(gen) if resume and checkpointer else LoopState.fresh(n, prep.methods)
    bs = r.train.batch_size
    model.train()
    t_start = time.perf_counter()

    def wall() -> float:
        return state.wall_before + time.perf_counter() - t_start

    if on_progress is not None:
        on_progress(state.step, limit, float("nan"), 0.0)
    while state.step < limit:
        batch = _next_batch(state, gen, n, bs)
        step, epoch = state.step + 1, state.epoch
        inputs, targets = x_train[batch.to(dev)], y_train[batch.to(dev)]
        lr = float(opt.param_groups[0]["lr"])
        if on_step is not None:
            on_step(
                step,
                batch,
                StepContext(step, epoch, batch, inputs, targets, lr, model, opt, sched, tracker, d, r),
            )
        t0 = time.perf_counter()
        with memory_short_as(functools.partial(_step_memory_short, prep, step, inputs)):
            res, step_values = _take_step(prep, inputs, targets, measure_val_loss)
        sched.step()
        loss = res.loss
        pos = batch.numpy()
        batch_ids = ids[pos]
        problem = non_finite_problem(loss, model, step_values, float(res.val_loss), batch_ids)
        if problem:
            raise _diverged(prep, state, f"step {step} (epoch {epoch}): {problem}", wall())
        _add_values(state, step, batch_ids, pos, step_values, recorded=step in recorded_steps)
        secs = time.perf_counter() - t0
        row = (float(res.val_loss), float(res.clip_factor), secs, float(res.reuse_pearson))
        state.step_rows.append((step, epoch, lr, loss, *row))
        state.step, state.pos, state.seen = step, state.pos + len(pos), state.seen + len(pos)
        if on_progress is not None:
            on_progress(step, limit, loss, state.seen / max(time.perf_counter() - t_start, 1e-9))
        stopping = stop is not None and stop() and step < limit
        if checkpointer is not None and _checkpoint_due(checkpointer, step, limit, stopping):
            checkpointer.save(state, gen, wall())
        if stopping:
            raise TrainingInterrupted(step, limit, checkpointer.path if checkpointer else None)
    wall_seconds = wall()
    return _result(prep, state, _final_metrics(prep, state, x_train, y_train, splits), wall_seconds)


def _step_memory_short(prep: Prepared, step: int, inputs: torch.Tensor) -> UserError:
    return UserError(
        f"out of memory at step {step} on {prep.device} (a batch of {len(inputs)} examples of shape "
        f"{tuple(inputs.shape[1:])}): expected a smaller train.batch_size, shorter inputs "
        f"(a text's words set a gpt's context) or smaller layers.{_checks_memory(prep)}"
    )


def _checks_memory(prep: Prepared) -> str:
    """The fast mode's own part of an out-of-memory message: its checks of reuse hold M twice."""
    fast = prep.recipe.attribution.fast
    if prep.tracker is None or fast is None or fast.min_pearson is None:
        return ""
    return (
        " The fast mode's checks of reuse hold twice the memory for the preconditioned validation "
        "gradient; attribution.fast.min_pearson: null turns them off."
    )


def _take_step(
    prep: Prepared, inputs, targets, measure_val_loss: bool = True
) -> tuple[StepResult, dict[str, np.ndarray]]:
    """One training step, valued where the run values: what it returns (without values where the
    run does not value) and each method's values of the batch, as arrays. ``measure_val_loss``: an
    unvalued step also measures the validation loss (else NaN)."""
    if prep.tracker is not None:
        res = prep.tracker.step(inputs, targets)
        values = {m: res.values[m].detach().to("cpu", torch.float64).numpy() for m in prep.methods}
        return res, values
    from .tracker import StepResult, training_step

    model, loss_fn = prep.model, prep.loss_fn
    val_loss = validation_loss(model, loss_fn, prep.val_x, prep.val_y) if measure_val_loss else math.nan
    losses, clip = training_step(model, prep.optimizer, loss_fn, inputs, targets, prep.recipe.train.grad_clip)
    return StepResult(float(losses.mean()), val_loss, clip), {}


def validation_loss(model: nn.Module, loss_fn: Callable, val_x, val_y) -> float:
    """The mean validation loss at the current weights, measured as a tracker measures it: in eval
    mode, so that it draws no random numbers (dropout) and a plain run's training draws those of a
    valued one, and no dropout noise enters the figure."""
    modules = list(model.modules())
    with torch.no_grad(), modes_kept(modules):
        set_modes(modules, training=False)
        return float(loss_fn(model(val_x), val_y).mean())


def _add_values(
    state: LoopState,
    step: int,
    ids: np.ndarray,
    pos: np.ndarray,
    values: dict[str, np.ndarray],
    recorded: bool,
) -> None:
    """A step's values added to each example's sum (rows ``pos``), and to the recorded rows where the
    step is one of them (``ids``: the examples' ids)."""
    state.n_steps[pos] += 1
    for m, v in values.items():
        state.values[m][pos] += v
        if recorded:
            state.rec_rows[value_column(m)].extend(v.tolist())
    if recorded:
        state.rec_rows["step"].extend([step] * len(pos))
        state.rec_rows["example_id"].extend(ids.tolist())


def _final_metrics(
    prep: Prepared, state: LoopState, x_train: torch.Tensor, y_train: torch.Tensor, splits: Sequence[str]
) -> dict:
    """metrics.json's figures after the last step: loss and accuracy on each of ``splits``, counts,
    provenance."""
    d, dev, model, loss_fn, tracker = prep.data, prep.device, prep.model, prep.loss_fn, prep.tracker
    # in chunks of the training batch, which the steps have shown to fit (a language model's logits
    # for 1024 rows can take gigabytes)
    bs = prep.recipe.train.batch_size
    model.eval()
    split_metrics = {}
    for split, x, y in (
        ("train", x_train, y_train),  # already on the device, for the loop
        ("val", d.x_val, d.y_val),
        ("test", d.x_test, d.y_test),
    ):
        if split not in splits:
            continue
        short = (
            f"out of memory on {dev} evaluating the {split} split after the last step, in chunks of "
            f"train.batch_size ({bs}) rows, once every step was done."
        )
        with memory_short_as(functools.partial(EvaluationOutOfMemory, short)):
            loss, accuracy = evaluate(model, x.to(dev), y.to(dev), loss_fn, batch=bs)
        split_metrics[f"{split}_loss"], split_metrics[f"{split}_accuracy"] = loss, accuracy
    model.train()
    return {
        **split_metrics,
        "n_train": d.n_train,
        "n_val": len(d.y_val),
        "n_test": len(d.y_test),
        "n_noisy": int(d.is_noisy.sum()),
        # the source's labels in the order of values.parquet's label codes (0, 1, ...); None for text
        "classes": d.class_names or None,
        "steps": state.step,
        "total_steps": prep.total_steps,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),  # a replay takes it: see threads.py
        "params_sha256": params_digest(model),
        "data_sha256": data_digest(d),  # the training split it valued (prune retrains on the same)
        "resumed_at_steps": state.resumed_at,
        # with attribution.fuse_validation: why the last step that computed ∇val took the separate pass
        "fusion_blocked": tracker.fusion_blocked if tracker is not None and tracker.fuse_validation else None,
    }


def non_finite_problem(
    loss: float,
    model: nn.Module,
    values: dict[str, np.ndarray],
    val_loss: float,
    example_ids: np.ndarray | None = None,
) -> str:
    """What is non-finite after a step (loss, a gradient, the values), or '' when all is finite;
    ``example_ids``: the batch's, to name the examples whose values are."""
    if not math.isfinite(loss):
        return f"the training loss is {loss}; expected a finite loss"
    grads = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if grads:
        # max |g| per parameter: NaN and inf survive a max (and it cannot overflow); one device sync
        peaks = torch.stack([torch.linalg.vector_norm(g.detach(), ord=math.inf) for _, g in grads])
        finite = torch.isfinite(peaks).tolist()
        if not all(finite):
            name = grads[finite.index(False)][0]
            return f"the gradient of parameter `{name}` has non-finite entries; expected finite gradients"
    for m, v in values.items():
        bad = ~np.isfinite(v)
        n_bad = int(bad.sum())
        if n_bad:
            which = ""
            if example_ids is not None:
                ids = [str(i) for i in example_ids[bad][:SHOWN_IDS]]
                which = f" (example_id {', '.join(ids)}{', ...' if n_bad > SHOWN_IDS else ''})"
            why = f" (the validation loss is {val_loss})" if not math.isfinite(val_loss) else ""
            return f"the `{m}` values of {n_bad} of the {len(v)} examples{which} are non-finite{why}"
    return ""


def _next_batch(state: LoopState, gen: torch.Generator, n: int, batch_size: int) -> torch.Tensor:
    """The rows of the next batch, in the epoch's order; past the epoch's end, a new epoch's order."""
    if state.order is None or state.pos >= n:
        state.epoch += 1
        state.order, state.pos = torch.randperm(n, generator=gen), 0
    return state.order[state.pos : state.pos + batch_size]


def _checkpoint_due(checkpointer: Checkpointer, step: int, limit: int, stopping: bool) -> bool:
    """Whether to save after ``step``: on a stop, every ``checkpoint_every`` steps, and after the last
    step where checkpoints are on (a failure in the evaluation after it, out of memory say, then
    costs a resume that only evaluates, not the run's last steps again)."""
    last = step == limit and checkpointer.every > 0
    return stopping or last or (step < limit and checkpointer.due(step))


def _diverged(prep: Prepared, state: LoopState, where: str, wall_seconds: float) -> TrainingDiverged:
    """The error of a step whose loss, gradient or values are not finite, ``where`` saying which and
    why; it carries the result of the steps before it."""
    return TrainingDiverged(
        f"training diverged at {where}. {_kept(state.step, prep.tracker is not None)} "
        "Try a smaller optim.lr or set train.grad_clip.",
        partial=_result(prep, state, {"steps": state.step, "total_steps": prep.total_steps}, wall_seconds),
    )


def _kept(steps_done: int, valued: bool) -> str:
    what = "values" if valued else "step rows"  # without attribution there are no values to keep
    if steps_done == 0:
        return f"No step finished, so no {what} are kept."
    which = "step 1" if steps_done == 1 else f"steps 1-{steps_done}"
    return f"The {what} of {which} are kept (the run is marked incomplete)."


def _result(prep: Prepared, state: LoopState, metrics: dict, wall_seconds: float) -> TrainResult:
    """The ``TrainResult`` of the steps ``state`` has finished."""
    steps = pd.DataFrame(state.step_rows, columns=list(STEP_COLUMNS))
    # explicit types, so the tables keep their schema even with no rows (a run that stopped at step 1)
    kinds = {c.name: c.kind for c in TABLES["steps.parquet"]}
    steps = steps.astype({c: "int64" if kinds[c] == "int" else "float64" for c in steps.columns})
    steps_values = pd.DataFrame(state.rec_rows)
    steps_values = steps_values.astype(
        {c: "int64" if c in ("step", "example_id") else "float64" for c in steps_values.columns}
    )
    return TrainResult(
        prep.recipe,
        prep.data,
        prep.model,
        list(prep.methods),
        {m: v.copy() for m, v in state.values.items()},
        state.n_steps.copy(),
        steps,
        steps_values,
        metrics,
        wall_seconds,
        state.step,
        prep.total_steps,
    )


def train(
    recipe: Recipe,
    *,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
    max_steps: int | None = None,
    splits: Sequence[str] = SPLITS,
    measure_val_loss: bool = True,
    **prepare_kw,
) -> TrainResult:
    """``run(prepare(recipe, **prepare_kw), ...)``; closes the tracker afterwards."""
    prep = prepare(recipe, **prepare_kw)
    try:
        return run(
            prep,
            on_step=on_step,
            on_progress=on_progress,
            max_steps=max_steps,
            splits=splits,
            measure_val_loss=measure_val_loss,
        )
    finally:
        if prep.tracker is not None:
            prep.tracker.close()
