"""Checkpoints, so that a killed or interrupted training run resumes exactly where it stopped.

A checkpoint is one file, ``runs/<name>/checkpoint.pt``, replaced atomically every
``train.checkpoint_every`` steps (and when a run is interrupted with Ctrl-C). It holds
everything the training loop of ``train.run`` needs to continue bit for bit: the model,
optimizer and scheduler state, the RNG states (torch CPU and CUDA, the data-order
generator, Python's and NumPy's global ones), the loop position (step, epoch, the
epoch's data order and how far into it the run is), the values accumulated so far, the
per-example step counts, the step rows and the recorded per-step values. On the CPU a
resumed run therefore ends with the same values and parameters, bit for bit, as the run
would have without the interruption.

A checkpoint is tied to its recipe and its training data: resuming against a changed
``recipe.yaml`` or changed training data is refused. The checkpoint is deleted once the
run completes (a complete run is never resumed, and a model's checkpoint can be large);
``metrics.json`` then records ``params_sha256``, a digest of the final parameters.

``LoopState`` is the part of the state the loop itself owns; ``Checkpointer`` saves and
restores it together with the model, optimizer, scheduler and RNGs. (``interrupts.stop_on_interrupt``
turns Ctrl-C into a clean stop, ``digests`` ties a run to its data, and ``locks.run_lock`` keeps two
processes from writing one run.)
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .digests import data_digest, held_out_digest
from .errors import UserError
from .run_tables import STEP_COLUMNS, value_column
from .runio import atomic_write, restart_command

if TYPE_CHECKING:
    from .train import Prepared

FORMAT = 3  # bump when the checkpoint layout changes (3: the step rows as one tensor)
READS = (2, FORMAT)  # formats a checkpoint may have to be resumed (2: the step rows as a list)


class TrainingInterrupted(Exception):
    """The run stopped cleanly after ``step`` because it was asked to (Ctrl-C)."""

    def __init__(self, step: int, total: int, checkpoint: Path | None):
        super().__init__(f"training interrupted after step {step} of {total}")
        self.step, self.total, self.checkpoint = step, total, checkpoint


# --------------------------------------------------------------------------- the loop's own state


@dataclass
class LoopState:
    """Where the training loop is and what it has accumulated (everything but model/optimizer)."""

    values: dict[str, np.ndarray]  # method -> float64 [n_train]
    n_steps: np.ndarray  # int64 [n_train]
    rec_rows: dict[str, list]  # step, example_id, value_<method> at the recorded steps
    step_rows: list[tuple] = field(default_factory=list)  # one tuple per finished step
    step: int = 0  # steps finished
    epoch: int = 0  # epochs started
    order: torch.Tensor | None = None  # the current epoch's data order
    pos: int = 0  # how many examples of ``order`` the finished steps used
    seen: int = 0  # examples trained on in this process (for the ex/s readout)
    wall_before: float = 0.0  # training seconds spent before this process resumed
    resumed_at: list[int] = field(default_factory=list)  # steps the run was resumed after
    # ``step_rows`` as float64 [steps, 8], up to the rows packed at the last save: each save packs
    # only the steps since, where pickling every tuple each time grew quadratically over a long run
    packed_steps: torch.Tensor = field(default_factory=lambda: _packed([]))

    @classmethod
    def fresh(cls, n_train: int, methods: list[str]) -> LoopState:
        return cls(
            values={m: np.zeros(n_train, dtype=np.float64) for m in methods},
            n_steps=np.zeros(n_train, dtype=np.int64),
            rec_rows={"step": [], "example_id": []} | {value_column(m): [] for m in methods},
        )

    def to_blob(self, wall_seconds: float) -> dict:
        """Plain types and tensors only, so the file loads with ``torch.load(weights_only=True)``."""
        return {
            "values": {m: torch.from_numpy(v.copy()) for m, v in self.values.items()},
            "n_steps": torch.from_numpy(self.n_steps.copy()),
            "rec_rows": {k: list(v) for k, v in self.rec_rows.items()},
            "step_rows": self.pack_steps(),
            "step": self.step,
            "epoch": self.epoch,
            "order": None if self.order is None else self.order.clone(),
            "pos": self.pos,
            "wall_seconds": wall_seconds,
            "resumed_at": list(self.resumed_at),
        }

    @classmethod
    def from_blob(cls, b: dict) -> LoopState:
        return cls(
            values={m: v.numpy().astype(np.float64) for m, v in b["values"].items()},
            n_steps=b["n_steps"].numpy().astype(np.int64),
            rec_rows={k: list(v) for k, v in b["rec_rows"].items()},
            step_rows=unpack_steps(b["step_rows"]),
            step=int(b["step"]),
            epoch=int(b["epoch"]),
            order=b["order"],
            pos=int(b["pos"]),
            wall_before=float(b["wall_seconds"]),
            resumed_at=[*b["resumed_at"], int(b["step"])],
            packed_steps=b["step_rows"] if torch.is_tensor(b["step_rows"]) else _packed([]),
        )

    def pack_steps(self) -> torch.Tensor:
        """``step_rows`` as one float64 tensor, packing only the rows added since the last call."""
        done = len(self.packed_steps)
        if done < len(self.step_rows):
            self.packed_steps = torch.cat([self.packed_steps, _packed(self.step_rows[done:])])
        return self.packed_steps


def _packed(rows: list[tuple]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(STEP_COLUMNS))


def unpack_steps(rows: torch.Tensor | list) -> list[tuple]:
    """A checkpoint's step rows as ``LoopState.step_rows`` holds them (step and epoch as ints)."""
    if not torch.is_tensor(rows):  # format 2
        return [tuple(r) for r in rows]
    return [(int(r[0]), int(r[1]), *r[2:]) for r in rows.tolist()]


# --------------------------------------------------------------------------- RNG states


def _rng_states(device: torch.device, gen: torch.Generator) -> dict:
    np_state = np.random.get_state(legacy=True)  # the default, given so that numpy's stub types the result
    assert isinstance(np_state, tuple)  # the legacy form: numpy's global generator is an MT19937
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        "data_order": gen.get_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def _set_rng_states(s: dict, device: torch.device, gen: torch.Generator) -> None:
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and s["cuda"] is not None:
        torch.cuda.set_rng_state_all(s["cuda"])
    gen.set_state(s["data_order"])
    random.setstate(_tuples(s["python"]))
    kind, keys, *rest = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def _tuples(x):
    """Lists back to tuples (``random.setstate`` insists on tuples)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x


# --------------------------------------------------------------------------- save / load


class _RecordingFile(io.BufferedWriter):
    """A file opened for writing that keeps the file system's error where a write fails."""

    error: OSError | None = None

    def write(self, data: Any, /) -> int:
        return self._recording(super().write, data)

    def flush(self) -> None:
        self._recording(super().flush)

    def _recording(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as e:
            self.error = e
            raise


def save_tensors(obj, path: str | Path) -> None:
    """``torch.save(obj, path)``, raising the file system's own error where a write fails: torch
    reports one (no space left, say) as a RuntimeError that names neither the cause nor the file."""
    with _RecordingFile(io.FileIO(path, "wb")) as f:
        try:
            torch.save(obj, f)
        except RuntimeError:
            if f.error is None:
                raise
            raise f.error from None


def _with_defaults(recipe: Any) -> dict | None:
    """A checkpoint's recipe as this adamshap fills it in (a key added since it was written takes its
    default); None where it no longer validates."""
    from .recipe import recipe_from_dict

    try:
        return recipe_from_dict(recipe).to_dict()
    except UserError:
        return None


class Checkpointer:
    """Saves and restores one run's checkpoint file; ``every`` steps (0 = only when stopping), once
    ``seconds`` have passed since it was made or last saved."""

    def __init__(self, path: str | Path, prep: Prepared, every: int | None = None):
        self.path = Path(path)
        self.prep = prep
        self.every = prep.recipe.train.checkpoint_every if every is None else every
        self.seconds = prep.recipe.train.checkpoint_seconds
        self.last_saved = time.monotonic()
        self.loaded = False  # whether ``load`` restored the run: before that, a resume changed nothing

    # hashing a large split takes a moment: once per run
    @functools.cached_property
    def data_sha256(self) -> str:
        return data_digest(self.prep.data)

    @functools.cached_property
    def held_out_sha256(self) -> str:
        return held_out_digest(self.prep.data)

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint is due after ``step``."""
        if self.every <= 0 or step % self.every:
            return False
        return time.monotonic() - self.last_saved >= self.seconds

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, state: LoopState, gen: torch.Generator, wall_seconds: float) -> None:
        p = self.prep
        blob = {
            "format": FORMAT,
            "recipe": p.recipe.to_dict(),
            "data_sha256": self.data_sha256,
            "held_out_sha256": self.held_out_sha256,
            "model": p.model.state_dict(),
            "optimizer": p.optimizer.state_dict(),
            "scheduler": p.scheduler.state_dict(),
            "rng": _rng_states(p.device, gen),
            "loop": state.to_blob(wall_seconds),
            "tracker": p.tracker.state_dict() if p.tracker is not None else None,
        }
        atomic_write(self.path, lambda tmp: save_tensors(blob, tmp))
        self.last_saved = time.monotonic()

    def load(self, gen: torch.Generator) -> LoopState:
        """Restore model, optimizer, scheduler and RNGs from the file; return the loop state."""
        blob = self._read()
        p = self.prep
        if blob.get("format") not in READS:
            raise UserError(
                f"checkpoint {self.path} has format {blob.get('format')!r}; this adamshap reads formats "
                f"{' and '.join(map(str, READS))}; {self._start_over()}"
            )
        if _with_defaults(blob["recipe"]) != p.recipe.to_dict():
            raise UserError(
                f"checkpoint {self.path} was written for a different recipe than the run's recipe.yaml "
                "(was recipe.yaml edited?); expected the recipe the run started with. To use the edited "
                f"recipe, {self._start_over()}"
            )
        if blob["data_sha256"] != self.data_sha256:
            raise UserError(
                f"checkpoint {self.path} was written for different training data than `data.source` "
                f"({p.recipe.data.source}) holds now; expected the data the run started with."
            )
        held_out = blob.get("held_out_sha256")  # None in a checkpoint written before it was recorded
        if held_out is not None and held_out != self.held_out_sha256:
            raise UserError(
                f"checkpoint {self.path} was written for different validation or test data than "
                f"`data.source` ({p.recipe.data.source}) holds now; expected the data the run started with."
            )
        p.model.load_state_dict(blob["model"])
        p.optimizer.load_state_dict(blob["optimizer"])
        p.scheduler.load_state_dict(blob["scheduler"])
        _set_rng_states(blob["rng"], p.device, gen)
        if p.tracker is not None and blob.get("tracker") is not None:
            p.tracker.load_state_dict(blob["tracker"])
        state = LoopState.from_blob(blob["loop"])
        self.loaded = True
        return state

    def _read(self) -> dict:
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"no checkpoint at {self.path}.") from None
        except Exception as e:  # noqa: BLE001 -- any unreadable file is the same problem for the user
            raise UserError(
                f"checkpoint {self.path} cannot be read: it is damaged or not a checkpoint "
                f"({type(e).__name__}); {self._start_over()}"
            ) from None
        if not isinstance(blob, dict) or "loop" not in blob:
            raise UserError(f"{self.path} is not an adamshap checkpoint; {self._start_over()}")
        return blob

    def _start_over(self) -> str:
        """How to go on where the checkpoint cannot be resumed (it lies in the run's folder)."""
        return f"start the run over with: {restart_command(self.path.parent)}"

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# --------------------------------------------------------------------------- what a killed run leaves


def remove_stale_temp_files(run_dir: str | Path) -> list[str]:
    """Delete the temp files of atomic writes a killed process left (``.<file>.<random>.tmp``).

    Call it only while holding ``run_lock``: then no other process is writing the folder.
    """
    removed = []
    for p in Path(run_dir).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p.name)
    return removed
