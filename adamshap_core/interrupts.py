"""Ctrl-C and SIGTERM as a clean stop: the first asks the running command to stop after its current
step (training checkpoints there), a second aborts at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopFlag:
    """Set by the first Ctrl-C; the training loop polls it after every step."""

    def __init__(self):
        self._event = threading.Event()
        self.signum: int | None = None  # the signal that set it (SIGINT or SIGTERM)

    def __call__(self) -> bool:
        return self._event.is_set()

    def set(self, signum: int | None = None) -> None:
        self.signum = signum
        self._event.set()


# what a second signal of each kind does, once the first has asked to stop: abort at once
SECOND_SIGNAL = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[StopFlag]:
    """The first SIGINT (Ctrl-C) or SIGTERM (``kill``, a job scheduler's stop) sets the yielded flag:
    stop after this step. A second one of either aborts at once, as it would without this.

    Outside the main thread signals cannot be caught, and the flag simply never fires.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.set(signum)
        for sig, second in SECOND_SIGNAL.items():
            signal.signal(sig, second)

    previous = {sig: signal.signal(sig, handler) for sig in SECOND_SIGNAL}
    try:
        yield flag
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
