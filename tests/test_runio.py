"""Run folders: atomic writes, exclusive creation, refusal to overwrite, listing."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from adamshap_core import runio
from adamshap_core.errors import UserError
from adamshap_core.locks import run_lock


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "f.json"
    runio.atomic_write_json(p, {"a": 1})
    runio.atomic_write_json(p, {"a": 2, "nan": float("nan")})
    assert json.loads(p.read_text()) == {"a": 2, "nan": None}
    assert os.listdir(tmp_path) == ["f.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "values.parquet"
    runio.atomic_write_parquet(p, pd.DataFrame({"x": [1, 2]}))

    def boom(self, path, **kw):
        with open(path, "wb") as f:
            f.write(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(OSError, match="disk full"):
        runio.atomic_write_parquet(p, pd.DataFrame({"x": [3]}))
    monkeypatch.undo()
    assert pd.read_parquet(p)["x"].tolist() == [1, 2]
    assert os.listdir(tmp_path) == ["values.parquet"]


@pytest.mark.parametrize("named", [None, "temp"])
def test_a_failed_write_names_the_file_it_was_writing(tmp_path, monkeypatch, named):
    """No space left (say) while writing: the error names the target, not nothing or the temp file."""
    p = tmp_path / "values.parquet"

    def no_space(self, path, **kw):
        raise OSError(28, "No space left on device", *([path] if named else []))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", no_space)
    with pytest.raises(OSError) as info:
        runio.atomic_write_parquet(p, pd.DataFrame({"x": [3]}))
    assert info.value.errno == 28 and info.value.filename == str(p)


def test_a_written_file_has_the_permissions_of_any_new_file(tmp_path):
    """As ``open`` would create it (0o666 less the umask), not the temp file's private 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    p = runio.atomic_write_text(tmp_path / "recipe.yaml", "name: x\n")
    assert p.stat().st_mode & 0o777 == runio.FILE_MODE == 0o666 & ~mask


def test_create_run_dir_is_exclusive(tmp_path):
    p = runio.create_run_dir(tmp_path, "r1")
    (p / "metrics.json").write_text("{}")  # a run
    (p / "keep.txt").write_text("old")
    with pytest.raises(UserError, match="already exists.*--force"):
        runio.create_run_dir(tmp_path, "r1")
    assert (p / "keep.txt").exists()
    p2 = runio.create_run_dir(tmp_path, "r1", force=True)
    assert p2 == p and list(p.iterdir()) == []
    assert sorted(os.listdir(tmp_path)) == ["r1"]  # the old folder is gone, nothing aside left


def test_an_existing_run_with_a_checkpoint_is_offered_its_resume_command(tmp_path):
    p = runio.create_run_dir(tmp_path, "r1")
    (p / "metrics.json").write_text('{"status": "incomplete"}')
    with pytest.raises(UserError) as plain:
        runio.create_run_dir(tmp_path, "r1")
    assert "resume" not in str(plain.value)  # no checkpoint: nothing to resume
    (p / runio.CHECKPOINT_FILE).write_bytes(b"")
    with pytest.raises(UserError, match=r"resume it with: adamshap train --resume r1 .*; or pass --force"):
        runio.create_run_dir(tmp_path, "r1")
    with run_lock(p):  # being trained right now: --resume would be refused
        with pytest.raises(UserError) as busy:
            runio.create_run_dir(tmp_path, "r1")
    assert "resume" not in str(busy.value)


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_a_folder_that_is_not_a_run_is_never_replaced(tmp_path, force):
    """--force replaces runs: a folder of other files is refused, kept whole."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="exists and is not a run folder"):
        runio.create_run_dir(tmp_path, "mine", force=force)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()  # what a run stopped before its first file leaves: may be replaced
    assert runio.create_run_dir(tmp_path, "empty", force=True) == tmp_path / "empty"


def test_force_refuses_a_run_it_could_not_delete_whole_before_touching_it(tmp_path, monkeypatch):
    """A run with a folder this user may not write: the deletion would stop halfway, leaving the old
    run hidden beside the runs. (As root every folder is writable, so the refusal is simulated.)"""
    run = runio.create_run_dir(tmp_path, "r1")
    (run / "metrics.json").write_text("{}")
    (run / "plots").mkdir()
    real_access = os.access
    monkeypatch.setattr(runio.os, "access", lambda p, mode: Path(p).name != "plots" and real_access(p, mode))
    with pytest.raises(UserError, match=f"may not delete the files in {run / 'plots'}"):
        runio.create_run_dir(tmp_path, "r1", force=True)
    assert sorted(os.listdir(tmp_path)) == ["r1"] and (run / "metrics.json").exists()


def test_a_folder_holding_only_its_lock_is_a_run_being_created(tmp_path):
    """Another train of the same name holds only the lock until its recipe is written; one killed then
    leaves that behind. Either way it is that run's folder: "already exists", and --force replaces it."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / runio.LOCK_FILE).write_text("process 1")
    (tmp_path / "r" / ".recipe.yaml.x1y2.tmp").write_text("name: r")  # its first write, not renamed yet
    with pytest.raises(UserError, match="run 'r' already exists.*none of a run's files yet.*killed.*--force"):
        runio.create_run_dir(tmp_path, "r")
    assert runio.create_run_dir(tmp_path, "r", force=True) == tmp_path / "r"
    assert list((tmp_path / "r").iterdir()) == []


def test_a_folder_that_cannot_be_written_is_a_clear_error_before_any_work(tmp_path):
    runio.require_writable(tmp_path)
    assert os.listdir(tmp_path) == []  # the probe leaves nothing behind
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("")
    with pytest.raises(UserError, match=f"cannot write into {not_a_folder}: Not a directory"):
        runio.require_writable(not_a_folder)


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "a b"])
def test_bad_run_names(tmp_path, name):
    with pytest.raises(UserError, match="run name"):
        runio.create_run_dir(tmp_path, name)
    assert os.listdir(tmp_path) == []


def test_runs_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAMSHAP_RUNS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert runio.runs_root() == tmp_path / "runs"
    monkeypatch.setenv("ADAMSHAP_RUNS", str(tmp_path / "env"))
    assert runio.runs_root() == tmp_path / "env"
    assert runio.runs_root(tmp_path / "opt") == tmp_path / "opt"


def test_list_and_latest(tmp_path):
    with pytest.raises(UserError, match="no runs"):
        runio.latest_run(tmp_path)
    for i, name in enumerate(["b", "a"]):
        f = runio.RunFolder(runio.create_run_dir(tmp_path, name))
        f.write_metrics({"status": "complete", "created": f"2030-01-0{i + 1}T00:00:00"})
    assert [r.name for r in runio.list_runs(tmp_path)] == ["b", "a"]
    assert runio.latest_run(tmp_path).name == "a"
    assert runio.open_run(tmp_path, "b").metrics()["schema_version"] == runio.SCHEMA_VERSION
    with pytest.raises(UserError, match="no run 'zz'"):
        runio.open_run(tmp_path, "zz")


def test_a_bare_run_name_is_looked_up_in_the_runs_folder_never_in_the_current_one(tmp_path, monkeypatch):
    """A run of the same name in the current folder must not shadow the one ``--runs-dir`` names (a
    command would write its results into the wrong run); a path to it still opens it."""
    root, here = tmp_path / "runs", tmp_path / "here"
    for parent, created in ((root, "2030-01-01T00:00:00"), (here, "2031-01-01T00:00:00")):
        f = runio.RunFolder(runio.create_run_dir(parent, "pipe"))
        f.write_metrics({"status": "complete", "created": created})
    runio.RunFolder(runio.create_run_dir(here, "only-here")).write_metrics({"status": "complete"})
    monkeypatch.chdir(here)
    assert runio.open_run(root, "pipe").path.resolve() == (root / "pipe").resolve()
    assert runio.open_run(root, "./pipe").path.resolve() == (here / "pipe").resolve()
    assert runio.open_run(root, str(here / "pipe")).path.resolve() == (here / "pipe").resolve()
    with pytest.raises(UserError, match=r"no run 'only-here' under .*pass --run ./only-here"):
        runio.open_run(root, "only-here")
    with pytest.raises(UserError, match="no run './nowhere' at that path"):
        runio.open_run(root, "./nowhere")


def test_folders_that_are_not_runs_are_not_listed(tmp_path):
    (tmp_path / "bench" / "digits-mlp-1").mkdir(parents=True)  # what `adamshap bench` leaves
    f = runio.RunFolder(runio.create_run_dir(tmp_path, "real"))
    f.write_metrics({"status": "complete", "created": "2030-01-01T00:00:00"})
    assert [r.name for r in runio.list_runs(tmp_path)] == ["real"]
    assert runio.latest_run(tmp_path).name == "real"


def test_a_metrics_file_with_fields_of_other_types_is_listed_as_unknown(tmp_path):
    """A hand-edited or foreign metrics.json: the run is listed, without what cannot be read from it."""
    from helpers import cli

    good = runio.RunFolder(runio.create_run_dir(tmp_path, "good"))
    good.write_metrics({"status": "complete", "created": "2030-01-01T00:00:00", "methods": ["adam"]})
    (tmp_path / "odd").mkdir()
    fields = {"status": ["x"], "created": 12345, "methods": "adam", "recipe": 3}
    (tmp_path / "odd" / "metrics.json").write_text(json.dumps(fields))
    assert [r.name for r in runio.list_runs(tmp_path)] == ["odd", "good"]
    odd = runio.open_run(tmp_path, "odd")
    assert odd.methods() == [] and odd.text_field("created") is None and odd.text_field("status") is None
    res = cli("runs", "--runs-dir", tmp_path)
    assert res.exit_code == 0, res.output
    assert "odd" in res.output and "unknown" in res.output and "good" in res.output


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where folders cannot be made")
def test_a_run_folder_that_cannot_be_made_is_a_clear_error():
    with pytest.raises(UserError, match="cannot create the run folder /proc/self/demo"):
        runio.create_run_dir("/proc/self", "demo")


def test_runs_started_within_one_second_are_ordered_by_their_start_not_by_later_writes(tmp_path):
    """``created`` is to the second: the recipe written at the start orders two runs of one second,
    and results written into the older one later (compare, prune) do not make it the latest."""
    for name, started in (("older", 1_000), ("newer", 2_000)):
        f = runio.RunFolder(runio.create_run_dir(tmp_path, name))
        f.write_metrics({"status": "complete", "created": "2030-01-01T00:00:00"})
        (f.path / "recipe.yaml").write_text("name: x\n")
        os.utime(f.path / "recipe.yaml", ns=(started, started))
    (tmp_path / "older" / "compare.json").write_text("{}")  # the older folder changes last
    assert [r.name for r in runio.list_runs(tmp_path)] == ["older", "newer"]


def test_a_set_of_results_cut_short_has_no_summary_and_ctrl_c_lets_it_finish(tmp_path):
    summary = tmp_path / "compare.json"
    summary.write_text("{}")  # an earlier compare's
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(OSError), runio.writing_results(summary):
        runio.atomic_write_text(tmp_path / "compare.parquet", "new")
        raise OSError(28, "No space left on device")  # the next file cannot be written
    assert not summary.exists()  # the new table does not pass for a whole set
    with runio.writing_results(summary):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here: a first Ctrl-C does not cut the set short
        runio.atomic_write_text(summary, "{}")
    assert summary.exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_hidden_folders_are_not_listed_as_runs(tmp_path):
    """A run that train --force moved aside (.demo.old-123), left where its deletion was cut short, is
    no run: never listed, never the latest, though newer."""
    for name, created in (("demo", "2026-01-01T00:00:00"), (".demo.old-123", "2026-06-01T00:00:00")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"status": "complete", "created": created}))
    assert [r.name for r in runio.list_runs(tmp_path)] == ["demo"]
    assert runio.latest_run(tmp_path).name == "demo"


def test_a_resumed_run_keeps_its_created_time(tmp_path):
    """Runs are listed by the time they were created: a resumed run keeps its own."""
    header = {
        "status": "incomplete",
        "name": "r",
        "recipe": "x",
        "recipe_path": None,
        "created": "2026-01-02T03:04:05+00:00",
        "methods": ["adam"],
    }
    (tmp_path / "metrics.json").write_text(json.dumps({"schema_version": 1, **header, "error": "stopped"}))
    assert runio.resumed_header(runio.RunFolder(tmp_path)) == header
