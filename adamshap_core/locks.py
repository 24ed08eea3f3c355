"""Advisory locks on run folders, so that two commands never write over each other's work.

- ``run_lock``: training holds the run's ``.lock`` file exclusively; a second ``train`` of the same
  run (or ``--resume`` of it) is refused, and ``is_locked`` tells the readers that it is being trained.
- ``reading``: ``compare``, ``prune`` and ``attribute`` hold a shared lock on the run folder itself
  while they read it and write their results into it; ``replacing``: ``train --force`` takes it
  exclusively before it moves the old run away. So neither can catch the other halfway, and a
  reader never writes its results into the run that replaced the one it read.

All are ``flock`` locks, released by the kernel when the process dies, even by SIGKILL, so a killed
command never leaves a stale lock. Where ``fcntl`` is missing (Windows) or the file system has no
``flock`` for folders, only the exclusive creation of run folders guards them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"  # the file ``run_lock`` locks, in the run folder it guards


@contextlib.contextmanager
def run_lock(run_dir: str | Path, doing: str = "train") -> Iterator[None]:
    """Hold an exclusive lock on a run folder while a command (``doing``: train, prune) writes it
    (another process that tries to take it gets a ``UserError``); the lock file names the process
    holding it and its command."""
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"run {Path(run_dir).name!r} is being written by {holder(run_dir)} right now; wait for it to "
                "finish or stop it first."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} (adamshap {doing})".encode())
        try:
            yield
        finally:
            # tidy, at best: the lock is still held until the close below, a lock file left behind locks
            # nothing, and where it cannot go (a folder made read-only), the error that ended training
            # is the one to report
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        os.close(fd)  # releases the lock


def holder(run_dir: str | Path) -> str:
    """Who holds ``run_lock`` on ``run_dir``, as its lock file says ("process 123 (adamshap prune)")."""
    try:
        return (Path(run_dir) / LOCK_FILE).read_text().strip() or "another process"
    except OSError:
        return "another process"


def is_locked(run_dir: str | Path) -> bool:
    """Whether a live process holds ``run_lock`` on ``run_dir``. Asked without taking the lock and
    without writing: a command that only reads the run leaves its folder as it was."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return False
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file (or no such folder): nobody is writing it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def reading(run_dir: str | Path) -> contextlib.AbstractContextManager[None]:
    """Hold a shared lock on a run folder while a command reads it and writes its results beside
    it, so that ``train --force`` cannot replace the run meanwhile. Any number may hold it."""
    refused = (
        f"run {Path(run_dir).name!r} is being replaced by `train --force` right now; run this command "
        "again once that training has finished."
    )
    return _folder_lock(run_dir, exclusive=False, refused=refused)


def replacing(run_dir: str | Path) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive lock on a run folder while ``train --force`` moves it away and deletes it;
    refused while any command is reading it."""
    refused = (
        f"run {Path(run_dir).name!r} is being read by another adamshap command (compare, prune or "
        "attribute) right now, so --force cannot replace it; wait for that command to finish or stop it."
    )
    return _folder_lock(run_dir, exclusive=True, refused=refused)


@contextlib.contextmanager
def _folder_lock(run_dir: str | Path, *, exclusive: bool, refused: str) -> Iterator[None]:
    """``flock`` on the folder itself (not a file in it, which a deletion would unlink from under
    the lock), raising ``UserError(refused)`` where another process holds it the other way."""
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(refused) from None
        except OSError:  # pragma: no cover - a file system without flock on folders (some NFS)
            pass
        if not _same_file(fd, run_dir):  # it was replaced between the open and the lock
            raise UserError(f"run {Path(run_dir).name!r} was replaced meanwhile; run this command again.")
        yield
    finally:
        os.close(fd)  # releases the lock


def _same_file(fd: int, path: str | Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
