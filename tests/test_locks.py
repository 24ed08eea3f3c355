"""Run-folder locks: ``train --force`` never replaces a run that ``compare``, ``prune`` or ``attribute``
is reading (and writing its results into), and those never start on a run being replaced."""

from __future__ import annotations

import os

import pytest
from helpers import cli, tiny, write_recipe

from adamshap_core import locks, runio
from adamshap_core.errors import UserError


@pytest.fixture
def run(tmp_path):
    folder = runio.create_run_dir(tmp_path / "runs", "r1")
    (folder / "metrics.json").write_text("{}")
    return folder


def test_force_refuses_a_run_being_read_and_leaves_it_whole(run):
    with locks.reading(run):
        with pytest.raises(UserError, match="being read by another adamshap command"):
            runio.create_run_dir(run.parent, "r1", force=True)
    assert sorted(os.listdir(run.parent)) == ["r1"] and (run / "metrics.json").exists()
    assert runio.create_run_dir(run.parent, "r1", force=True) == run  # once the reader is done
    assert list(run.iterdir()) == []


def test_a_reader_refuses_a_run_being_replaced(run):
    with locks.replacing(run):
        with pytest.raises(UserError, match="being replaced by `train --force`"):
            with locks.reading(run):
                pass


def test_readers_share_the_run(run):
    with locks.reading(run), locks.reading(run):
        pass


def test_a_run_replaced_between_opening_and_locking_is_not_read(run, monkeypatch):
    """The folder the lock was taken on is no longer the run's: the reader would read the new one."""
    old = run.parent / "old"
    old.mkdir()
    real_open = os.open
    monkeypatch.setattr(locks.os, "open", lambda path, flags: real_open(old, flags))
    with pytest.raises(UserError, match="was replaced meanwhile"):
        with locks.reading(run):
            pass


def test_the_commands_and_train_force_refuse_each_other(tmp_path):
    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path, tiny())
    assert cli("train", recipe, "--quiet", "--runs-dir", runs).exit_code == 0
    with locks.reading(runs / "tiny"):  # a compare, prune or attribute still running
        res = cli("train", recipe, "--force", "--quiet", "--runs-dir", runs)
    assert res.exit_code == 2 and "being read by another adamshap command" in " ".join(res.output.split())
    with locks.replacing(runs / "tiny"):  # a train --force moving it away
        readers = (["compare", "--no-cumulative"], ["prune", "--frac", "0.3"], ["attribute", "--query", "x"])
        for command in readers:
            res = cli(*command, "--run", "tiny", "--runs-dir", runs, "--quiet")
            assert res.exit_code == 2, res.output
            assert "being replaced by `train --force`" in " ".join(res.output.split())
    assert sorted(p.name for p in (runs / "tiny").iterdir()) == sorted(runio.RUN_FILES)


def test_the_error_that_ended_the_work_is_raised_where_the_lock_file_cannot_be_removed(tmp_path, monkeypatch):
    """A folder made read-only mid-run: removing the lock file fails too, and must not hide why the
    run stopped (the lock is released by closing it either way)."""

    def refused(path):
        raise PermissionError(1, "Operation not permitted", str(path))

    with pytest.raises(OSError, match="No space left"):
        with locks.run_lock(tmp_path):
            monkeypatch.setattr(locks.os, "unlink", refused)
            raise OSError(28, "No space left on device")
    monkeypatch.undo()
    assert not locks.is_locked(tmp_path)


def test_the_holder_text_replaces_a_stale_longer_one(tmp_path):
    """A killed run's longer holder text left in the lock file is replaced whole, not overwritten in part."""
    (tmp_path / locks.LOCK_FILE).write_text("process 999999999999 (adamshap train) and more stale text")
    with locks.run_lock(tmp_path, "prune"):
        assert locks.holder(tmp_path) == f"process {os.getpid()} (adamshap prune)"


def test_an_empty_lock_file_names_another_process(tmp_path):
    """Between another process's flock and its write the file is empty: the refusal still names a holder."""
    import fcntl

    path = tmp_path / locks.LOCK_FILE
    path.write_text("")
    assert locks.holder(tmp_path) == "another process"
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="is being written by another process right now"):
            with locks.run_lock(tmp_path):
                pass
    finally:
        os.close(fd)
