"""A training run asked to stop (Ctrl-C, or the SIGTERM a scheduler sends before it preempts a job) stops with a
checkpoint, so that ``--resume latest`` loses no step.

The first SIGINT or SIGTERM only records the request; the training loop stops at a step every process agrees on
(``train.TimeBudget.check``: at once under one process, at the next log step under several, since they must stop
at the same step) and writes a checkpoint there. A second Ctrl-C stops at once, as Python would (the steps since
the last checkpoint are lost); a second SIGTERM changes nothing, and neither does any signal within ``SAME_REQUEST``
seconds of the first: one Ctrl-C may arrive twice, from the terminal and forwarded by a launcher whose workers
share the terminal's process group (torchrun, under ``accelerate launch``, starts its workers in sessions of
their own and forwards it once). The handlers are installed only for the loop, and only on the main thread (the only one
Python lets install them); the previous ones come back after.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAME_REQUEST = 2.0  # seconds


class StopRequest:
    """Context manager: ``received`` is the first SIGINT/SIGTERM's number while it is installed (None before)."""

    def __init__(self, say: bool = True):
        self.received: int | None = None
        self.at = 0.0  # when (time.monotonic)
        self.say = say  # the main process tells the user what happens next
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received, self.at = signum, time.monotonic()
            if self.say:
                print(f"\n{signal.Signals(signum).name}: stopping with a checkpoint after this step (after the next "
                      "log step under several processes); Ctrl-C again stops at once, losing the steps since the "
                      "last checkpoint", file=sys.stderr, flush=True)
        elif signum == signal.SIGINT and time.monotonic() - self.at > SAME_REQUEST:
            raise KeyboardInterrupt
