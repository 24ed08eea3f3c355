"""The run folder contract and atomic writes.

``runs/<name>/`` holds ``recipe.yaml`` (the resolved recipe), ``values.parquet``
(one row per training example), ``steps.parquet`` (one row per step),
``steps_values.parquet`` (per-step values at the recorded steps) and
``metrics.json`` (``schema_version``, ``status``, final metrics, wall time).
``metrics.json`` is written first with ``status: incomplete`` and rewritten with
``status: complete`` once every other file is in place. Every file is written to
a temporary file in the same folder and renamed over its target.

The runs root is ``--runs-dir``, else ``$ADAMSHAP_RUNS``, else ``./runs``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .choices import METHOD_NAMES
from .errors import UserError
from .locks import LOCK_FILE, holder, is_locked, reading, replacing
from .recipe import RUN_NAME, RUN_NAME_RULE
from .run_tables import (
    KNOWN_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    TABLES,
    check_frame,
    table_problems,
    value_column,
)

CHECKPOINT_FILE = "checkpoint.pt"  # while a run is being trained (see checkpoint.py)
RUN_FILES = ("recipe.yaml", "values.parquet", "steps.parquet", "steps_values.parquet", "metrics.json")


# --------------------------------------------------------------------------- atomic writes


def _process_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: read once, at import, and put back
    os.umask(mask)
    return mask


# the permissions a file written here gets: those of a file opened for writing (mkstemp's are 0o600)
FILE_MODE = 0o666 & ~_process_umask()


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename it onto ``path``.

    A file system error (no space left, say) that names no file is given ``path``, so the message
    the user reads says which file could not be written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        name_the_file(e, path, stand_in=tmp)  # not the temp file's name either
        raise
    return path


def name_the_file(error: BaseException, path: str | Path, stand_in: str | None = None) -> None:
    """Give a file system error that names no file (a full disk's), or only ``stand_in`` (a temp file
    of ours), the name of ``path``, so that the message the user reads says which file could not be
    written. (Only an error made with an errno prints its file name.)"""
    if not isinstance(error, OSError) or error.errno is None:
        return
    if not error.filename or str(error.filename) == stand_in:
        error.filename = str(path)


def replaced_note(path: str | Path, what: str) -> str:
    """Said after writing ``path``, so that results are not replaced silently: "" where there was
    no such file, else " (replacing the earlier {what} of 2026-11-30 04:20:07)". Call it before
    writing."""
    try:
        written = datetime.fromtimestamp(Path(path).stat().st_mtime)
    except OSError:
        return ""
    return f" (replacing the earlier {what} of {written:%Y-%m-%d %H:%M:%S})"


@contextlib.contextmanager
def writing_results(summary: Path) -> Iterator[None]:
    """Around the writes of one command's set of result files, its JSON ``summary`` written last:
    the earlier summary is removed first, so that a set cut short (no space left, say) has none
    beside it, and a first Ctrl-C or SIGTERM lets these few writes finish where it would leave the
    set half old and half new."""
    from .interrupts import stop_on_interrupt

    summary.unlink(missing_ok=True)
    with stop_on_interrupt():
        yield


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def atomic_write_parquet(path: str | Path, df: pd.DataFrame) -> Path:
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def _jsonable(obj):
    """NaN/inf -> None so metrics.json stays valid JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item"):  # numpy scalars
        return _jsonable(obj.item())
    return obj


# --------------------------------------------------------------------------- runs root and folders


def runs_root(runs_dir: str | Path | None = None) -> Path:
    """The runs folder: ``runs_dir``, else $ADAMSHAP_RUNS, else ./runs (it need not exist yet)."""
    root, source = _root_and_source(runs_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"the runs folder {root} ({source}) is a file; expected a folder.")
    return root


def _root_and_source(runs_dir: str | Path | None) -> tuple[Path, str]:
    """The runs folder and what named it, in the order of precedence."""
    if runs_dir is not None and not str(runs_dir).strip():
        raise UserError(
            "--runs-dir is empty; expected a folder (or leave it out: $ADAMSHAP_RUNS, else ./runs)."
        )
    if runs_dir:
        return Path(runs_dir), "--runs-dir"
    env = os.environ.get("ADAMSHAP_RUNS")
    return (Path(env), "$ADAMSHAP_RUNS") if env else (Path.cwd() / "runs", "./runs")


def runs_dir_option(run_path: Path) -> str:
    """`` --runs-dir DIR`` where a command would not find the run by default, else nothing."""
    if run_path.parent.resolve() == _root_and_source(None)[0].resolve():
        return ""
    return f" --runs-dir {shlex.quote(str(run_path.parent))}"


def resume_command(run_path: Path) -> str:
    """The command that finishes an interrupted run from its checkpoint."""
    return f"adamshap train --resume {shlex.quote(run_path.name)}{runs_dir_option(run_path)}"


def restart_command(run_path: Path) -> str:
    """The command that trains a run again from its first step, where ``--resume`` cannot continue it
    (which refuses --force): ``train`` on the recipe.yaml the run keeps, read before --force replaces
    the folder, under the run's own name."""
    recipe = shlex.quote(str(run_path / "recipe.yaml"))
    return f"adamshap train {recipe} --name {shlex.quote(run_path.name)} --force{runs_dir_option(run_path)}"


# the folder under the runs folder where ``adamshap bench`` keeps its results: no run may take its name
BENCH_FOLDER = "bench"


def check_run_name(name: str) -> str:
    if not RUN_NAME.match(name or ""):
        raise UserError(f"run name {name!r} is not allowed; expected {RUN_NAME_RULE}.")
    if name == BENCH_FOLDER:
        raise UserError(
            f"run name {name!r} is taken by `adamshap bench`, which keeps its results in the runs folder's "
            f"{BENCH_FOLDER}/; expected another name (--name)."
        )
    return name


def bench_folder(root: Path) -> Path:
    """``root/bench``, refused where a run has the folder (one named so before the name was taken):
    its results would go inside the run, and replacing the run would delete them."""
    folder = root / BENCH_FOLDER
    if folder.is_dir() and _is_run(folder):
        raise UserError(
            f"{folder} is a run's folder, where bench keeps its results; expected --out FOLDER, or move the "
            "run away."
        )
    return folder


def refuse_taken(root: str | Path, name: str, *, force: bool) -> None:
    """Raise a ``UserError`` where ``root/name`` exists and a new run may not take its place: not a
    run's folder, a run without ``force``, or a run another process is writing. Asked before a run's
    data is loaded, so that the refusal comes at once; ``create_run_dir`` asks again."""
    path = Path(root) / name
    if not os.path.lexists(path):
        return
    if not (path.is_dir() and (_is_run(path) or _is_starting(path))):
        # --force replaces runs only: never a folder of other files (a bench's results, say)
        raise UserError(
            f"{path} exists and is not a run folder; pick another --name, or move it away yourself."
        )
    if is_locked(path):
        so = ", so --force cannot replace it" if force else ""
        raise UserError(
            f"run {name!r} is being written by {holder(path)} right now{so}; wait for it to finish, or "
            "stop it, or pick another --name."
        )
    if not force:
        # unlocked and empty: a start before it locks, or one killed before its first file
        if _is_starting(path):
            raise UserError(
                f"run {name!r} already exists at {path} but holds none of a run's files yet: another start "
                "of it is creating it right now, or one was stopped (killed) before it wrote any; pass "
                "--force to replace it or --name to pick another name."
            )
        # a stopped run with a checkpoint is more likely meant to go on than to start over
        go_on = f"resume it with: {resume_command(path)}; or " if (path / CHECKPOINT_FILE).is_file() else ""
        raise UserError(
            f"run {name!r} already exists at {path}; {go_on}pass --force to replace it or --name to pick "
            "another name."
        )


def create_run_dir(root: str | Path, name: str, *, force: bool = False) -> Path:
    """Create ``root/name`` exclusively. An existing run is a ``UserError`` unless ``force``,
    in which case the old folder is moved aside and removed once the new one exists."""
    check_run_name(name)
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the runs folder {root}: {e.strerror or e}.") from None
    path = root / name
    try:
        os.mkdir(path)
        return path
    except FileExistsError:
        refuse_taken(root, name, force=force)
    except OSError as e:  # a parent one cannot create folders in (a file system such as /proc)
        raise UserError(f"cannot create the run folder {path}: {e.strerror or e}.") from None
    with replacing(path):  # no command is reading the old run, and none starts to
        _check_removable(path)
        aside = root / f".{name}.old-{os.getpid()}"
        os.replace(path, aside)
        try:
            os.mkdir(path)
        except FileExistsError:
            raise UserError(f"run {name!r} was created by another process meanwhile; try again.") from None
        finally:
            _remove(aside)
    return path


def _remove(old_run: Path) -> None:
    """Delete a run moved aside; where the run was a symbolic link, the link alone (the folder it
    points to is not inside the runs folder, so not this command's to delete)."""
    if old_run.is_symlink():
        old_run.unlink(missing_ok=True)
    else:
        shutil.rmtree(old_run, ignore_errors=True)


def _check_removable(run: Path) -> None:
    """Refuse to replace a run this user cannot delete whole, before touching it: the deletion would
    stop halfway and leave the rest hidden beside the runs (``.<name>.old-<pid>``)."""
    folders = [run, *(p for p in run.rglob("*") if p.is_dir() and not p.is_symlink())]
    for folder in folders:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(
                f"--force cannot replace run {run.name!r}: this user may not delete the files in "
                f"{folder}; expected a run folder this user can write to (or pick another --name)."
            )


@dataclass
class RunFolder:
    """Reads and writes the files of one run folder."""

    path: Path
    latest: bool = False  # picked as the latest run (no --run given): refusals say how to pick another

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    # writes
    def write_recipe(self, recipe) -> None:
        atomic_write_text(self.file("recipe.yaml"), recipe.to_yaml())

    def write_parquet(self, name: str, df: pd.DataFrame) -> None:
        check_frame(name, df)  # a table that breaks its schema (a NaN value, say) is never written
        atomic_write_parquet(self.file(name), df)

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.file("metrics.json"), {"schema_version": SCHEMA_VERSION, **metrics})

    # reads
    def metrics(self) -> dict:
        """metrics.json, or {} where it is missing or unreadable: for listing runs. A command that needs
        the run intact calls ``require_complete`` (or ``require_resumable``) first, which says why not."""
        try:
            return self.read_metrics()
        except UserError:
            return {}

    def methods(self) -> list[str]:
        """The methods the run valued, as its metrics.json records them (``require_complete`` checks
        that its tables hold their value columns)."""
        return recorded_methods(self.metrics())

    def text_field(self, key: str) -> str | None:
        """A text field of metrics.json: see ``text_field``."""
        return text_field(self.metrics(), key)

    def read_metrics(self) -> dict:
        """metrics.json, or a ``UserError`` saying why it cannot be read."""
        p = self.file("metrics.json")
        try:
            metrics = json.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path} has no metrics.json; expected an adamshap run folder.") from None
        except (OSError, ValueError) as e:
            raise UserError(
                f"run {self.name!r}: metrics.json cannot be read ({e}); {self._again()}"
            ) from None
        if not isinstance(metrics, dict):
            raise UserError(f"run {self.name!r}: metrics.json is not a JSON object; {self._again()}")
        return metrics

    def recipe(self):
        from .recipe import load_recipe

        return load_recipe(self.file("recipe.yaml"), run=self.name)

    def values(self) -> pd.DataFrame:
        return self._parquet("values.parquet")

    def steps(self) -> pd.DataFrame:
        return self._parquet("steps.parquet")

    def steps_values(self) -> pd.DataFrame:
        return self._parquet("steps_values.parquet")

    def require_complete(self) -> RunFolder:
        """This run, if it is complete and readable by this version (else a ``UserError`` saying why):
        metrics.json of a known schema version saying ``complete``, and every table there and matching
        its schema. Commands that read a finished run call this (or ``open_complete_run``) first."""
        metrics = self._known_metrics()
        status = metrics.get("status")
        if status != "complete":
            which = (
                " (the latest run; --run NAME picks another, `adamshap runs` lists them)"
                if self.latest
                else ""
            )
            state = status or "of unknown status"
            raise UserError(f"run {self.name!r}{which} is {state}: {self._incomplete_hint(metrics)}")
        missing = [f for f in RUN_FILES if not self.file(f).is_file()]
        if missing:
            raise UserError(
                f"run {self.name!r} says it is complete but lacks {', '.join(missing)} (in {self.path}); "
                f"{self._again()}"
            )
        methods = list(metrics.get("methods") or [])
        for name in TABLES:
            problems = table_problems(name, self._empty_frame(name), methods)
            if problems:
                why = "; ".join(problems)
                raise UserError(
                    f"run {self.name!r}: {name} does not match the run-folder schema ({why}); {self._again()}"
                )
        self._check_finite_values(methods)
        return self

    def _check_finite_values(self, methods: list[str]) -> None:
        """Training refuses a step with a non-finite value, so a complete run holding one in
        values.parquet was changed since (read: only its value columns, one float per example each)."""
        columns = [value_column(m) for m in methods]
        values = pd.read_parquet(self.file("values.parquet"), columns=columns)
        for col in columns:
            bad = int((~np.isfinite(values[col].to_numpy(dtype=np.float64))).sum())
            if bad:
                raise UserError(
                    f"run {self.name!r}: {col} of values.parquet holds {bad} non-finite value(s), which "
                    "training never writes (was the file changed?); expected a finite value for every "
                    "training example. Train the run again."
                )

    def require_resumable(self) -> RunFolder:
        """This run, if it stopped before completing and has a checkpoint to resume from (else a
        ``UserError`` saying why)."""
        if self._known_metrics().get("status") == "complete":
            raise UserError(f"run {self.name!r} is already complete; there is nothing to resume.")
        if not self.file(CHECKPOINT_FILE).is_file():
            raise UserError(
                f"run {self.name!r} has no checkpoint (it stopped before its first one, which is written "
                "after `train.checkpoint_every` steps or on Ctrl-C, or the file was removed); train it "
                "again with: " + restart_command(self.path)
            )
        return self

    def _known_metrics(self) -> dict:
        metrics = self.read_metrics()
        version = metrics.get("schema_version")
        if version not in KNOWN_SCHEMA_VERSIONS:
            raise UserError(
                f"run {self.name!r} was written with run-folder schema version {version!r}; this adamshap "
                f"reads version {', '.join(map(str, KNOWN_SCHEMA_VERSIONS))}. Train the run again with this "
                "adamshap, or use the adamshap version that wrote it."
            )
        return metrics

    def _again(self) -> str:
        return f"train it again with: {restart_command(self.path)}"

    def _incomplete_hint(self, metrics: dict) -> str:
        if is_locked(self.path):
            return "it is being trained by another process right now; wait for it to finish."
        error = str(metrics["error"]).rstrip(".") if metrics.get("error") else ""
        why = f"it stopped with: {error}. " if error else ""
        if self.file(CHECKPOINT_FILE).is_file():
            return (
                f"{why}{'Finish' if why else 'finish'} it with `{resume_command(self.path)}` first; "
                "commands that read a run need a complete one."
            )
        return (
            f"{why}{'It' if why else 'it'} has no checkpoint to resume from, and commands that read a run "
            f"need a complete one; {self._again()}"
        )

    def _empty_frame(self, name: str) -> pd.DataFrame:
        """The table's columns and types without reading its rows (cheap for any size of run)."""
        import pyarrow.parquet as pq

        try:
            return pq.read_schema(self.file(name)).empty_table().to_pandas()
        except Exception as e:  # noqa: BLE001 -- an unreadable file is one problem for the user
            raise UserError(f"run {self.name!r}: {name} cannot be read ({e}); {self._again()}") from None

    def _parquet(self, name: str) -> pd.DataFrame:
        p = self.file(name)
        if not p.is_file():
            raise UserError(f"run {self.name!r} has no {name} (looked at {p}); is the run complete?")
        return pd.read_parquet(p)


def require_writable(folder: str | Path) -> None:
    """A ``UserError`` now, where files could not be written into ``folder`` later (after minutes of
    work): a temporary file is created there and removed."""
    _try_writing(folder, folder)
    shadowing = next((e for e in sorted(Path(folder).iterdir()) if _shadows_a_result(e)), None)
    if shadowing is not None:
        raise UserError(
            f"{shadowing} is a folder where adamshap writes a file of results; expected a file or "
            "nothing there (move the folder away)."
        )


def require_creatable(folder: str | Path) -> None:
    """A ``UserError`` now, where ``folder`` (which may not exist yet) could not be made and written
    into later, after minutes of work: tried in the nearest part of its path that exists."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"cannot create the folder {folder}: {existing} is a file; expected a folder there.")
    _try_writing(existing, folder)


def _try_writing(where: str | Path, folder: str | Path) -> None:
    """Create a temporary file in ``where`` and remove it; a ``UserError`` about ``folder`` if that fails."""
    try:
        fd, tmp = tempfile.mkstemp(dir=where, prefix=".writable.", suffix=".tmp")
    except OSError as e:
        raise UserError(
            f"cannot write into {folder}: {e.strerror or e}; expected a folder this user can write to."
        ) from None
    os.close(fd)
    os.unlink(tmp)


RESULT_SUFFIXES = (".parquet", ".json", ".png")  # what the commands write into a run folder


def _shadows_a_result(entry: Path) -> bool:
    """A folder under a results file's name, which the command would fail to replace at the end."""
    return entry.suffix in RESULT_SUFFIXES and entry.is_dir()


def now_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def list_runs(root: str | Path) -> list[RunFolder]:
    """Run folders under ``root``, oldest first (by the creation time in metrics.json).

    A run folder holds a ``metrics.json`` or a ``recipe.yaml`` (both written when it starts);
    other folders, such as ``runs/bench/`` of ``adamshap bench``, are not runs."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [RunFolder(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_run(p)]

    def key(r: RunFolder):
        # created is to the second; within one, the recipe written when the run started tells (the
        # folder's own time would not: compare or prune writing into an older run moves it)
        recipe = r.path / "recipe.yaml"
        started = (recipe if recipe.is_file() else r.path).stat().st_mtime_ns
        return (r.text_field("created") or "", started)

    return sorted(runs, key=key)


def recorded_methods(metrics: dict) -> list[str]:
    """The valued methods a run's metrics.json lists (none where the field is not a list of them)."""
    methods = metrics.get("methods")
    return [m for m in methods if m in METHOD_NAMES] if isinstance(methods, list) else []


def text_field(metrics: dict, key: str) -> str | None:
    """A text field of a run's metrics.json (``created``, ``status``, ``recipe``): None where it is
    missing or not text (a hand-edited or foreign file)."""
    value = metrics.get(key)
    return value if isinstance(value, str) else None


def _is_run(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / "recipe.yaml").is_file()


def _is_starting(path: Path) -> bool:
    """Whether ``path`` holds no more than a run another process is creating (or was, when it died)
    holds before its first file: nothing, its lock, the temporary file of its first atomic write."""
    names = [p.name for p in path.iterdir()]
    return all(n == LOCK_FILE or (n.startswith(".") and n.endswith(".tmp")) for n in names)


def latest_run(root: str | Path) -> RunFolder:
    runs = list_runs(root)
    if not runs:
        raise UserError(f"no runs under {root}; run `adamshap train RECIPE` first.")
    return RunFolder(runs[-1].path, latest=True)


def open_run(root: str | Path, name: str | None = None) -> RunFolder:
    """The run called ``name`` under ``root``, or the run folder at ``name`` where it is a path (has a
    separator: ``./demo``, ``old/demo``), or the latest run when ``name`` is None. A bare name is
    never looked up in the current folder: a run of that name there would shadow the one under
    ``root`` that ``--runs-dir`` names."""
    if name is None:
        return latest_run(root)
    bare = Path(name).name == name
    p = Path(root) / name if bare else Path(name)
    if not p.is_dir():
        here = bare and (Path(name) / "metrics.json").exists()
        hint = (
            f" (a run folder {name!r} is in the current folder: pass --run ./{name} for it)" if here else ""
        )
        where = f"under {root}" if bare else "at that path"
        raise UserError(f"no run {name!r} {where}{hint}; `adamshap runs` lists the runs under {root}.")
    return RunFolder(p)


@contextlib.contextmanager
def reading_run(root: str | Path, name: str | None = None) -> Iterator[RunFolder]:
    """``open_run`` for a command that reads a run and writes its results into it (``compare``,
    ``prune``, ``attribute``, each of which then checks it with ``require_complete``): holds the
    run's reader lock until the command ends, so ``train --force`` cannot replace it meanwhile, and
    checks first that the folder can be written."""
    folder = open_run(root, name)
    with reading(folder.path):
        require_writable(folder.path)  # before the work, not after it
        yield folder


def open_complete_run(root: str | Path, name: str | None = None) -> RunFolder:
    """``open_run`` that refuses an incomplete run or one of an unknown schema version."""
    return open_run(root, name).require_complete()


# --------------------------------------------------------------------------- a training run's files


def start_run(folder: RunFolder, recipe, *, recipe_path: str | None = None) -> dict:
    """Write the resolved recipe and an ``incomplete`` metrics.json; return the metrics header, which
    records the intra-op thread count the run starts with (a resumed run takes it: threads.py)."""
    import torch

    header = {
        "status": "incomplete",
        "name": folder.name,
        "recipe": recipe.name,
        "recipe_path": recipe_path,
        "created": now_iso(),
        "methods": list(recipe.attribution.methods) if recipe.attribution.enabled else [],
        "torch_threads": torch.get_num_threads(),
    }
    folder.write_recipe(recipe)
    folder.write_metrics(header)
    return header


def resumed_header(folder: RunFolder) -> dict:
    """The metrics header ``start_run`` wrote, to continue the run (``train --resume``)."""
    m = folder.metrics()
    keep = ("name", "recipe", "recipe_path", "created", "methods", "torch_threads")
    return {"status": "incomplete", **{k: m[k] for k in keep if k in m}}


def _write_tables(folder: RunFolder, result) -> None:
    for name, obj in result.data.run_files().items():  # what the data needs kept, e.g. a tokenizer
        atomic_write_json(folder.file(name), obj)
    folder.write_parquet("values.parquet", result.values_frame())
    folder.write_parquet("steps.parquet", result.steps)
    folder.write_parquet("steps_values.parquet", result.steps_values)


def finish_run(folder: RunFolder, header: dict, result) -> dict:
    """Write the value and step tables, then metrics.json with ``status: complete``."""
    _write_tables(folder, result)
    metrics = {
        **header,
        "status": "complete",
        "finished": now_iso(),
        "wall_seconds": result.wall_seconds,
        "methods": list(result.methods),
        **result.metrics,
    }
    folder.write_metrics(metrics)
    return metrics


def fail_run(folder: RunFolder, header: dict, error: BaseException, partial=None) -> None:
    """Record why a run stopped; the run stays ``incomplete``. ``partial``: the result of the
    steps finished before the failure, whose tables are kept for inspection."""
    msg = " ".join(str(error).split()) or type(error).__name__
    done = {}
    # best effort: the failure being recorded (no space left, say) may be why it cannot be, and the
    # caller raises that failure, which a second one here would hide
    with contextlib.suppress(OSError):
        if partial is not None:
            _write_tables(folder, partial)
            done = {"wall_seconds": partial.wall_seconds, "methods": list(partial.methods), **partial.metrics}
        folder.write_metrics({**header, **done, "status": "incomplete", "error": msg, "stopped": now_iso()})
