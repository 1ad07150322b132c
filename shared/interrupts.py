"""Ctrl-C and the SIGTERM a scheduler sends (before it preempts or times out a job): what a command does with them.

**Any command while it writes** (``stoppable``): it ends as cleanly as one that failed, and says so. Python turns
SIGINT into ``KeyboardInterrupt``, so every ``finally`` and ``except BaseException`` cleanup runs (the encoders'
``NAME.lock`` beside ``--out`` is removed: shared/lock.py; a temporary file or export folder is deleted:
shared/files.py, stage2_train/pipeline.py). SIGTERM's default action ends the process at once, skipping them all,
so it left those files behind. While ``stoppable`` is installed a SIGTERM raises ``Terminated`` instead (a
``SystemExit`` with the status a shell reports for a process ended by SIGTERM, 143), and either signal prints one
line saying what was kept and what to run. A second SIGTERM ends the process at once, as before.

**Training** (``StopRequest``) stops with a checkpoint instead, so that ``--resume latest`` loses no step. The
first SIGINT or SIGTERM only records the request; the training loop stops at a step every process agrees on
(stage2_train/train.py ``TimeBudget.check``: at once under one process, at the next log step under several, since
they must stop at the same step) and writes a checkpoint there. A second Ctrl-C stops at once, as Python would
(the steps since the last checkpoint are lost); a second SIGTERM changes nothing, and neither does any signal
within ``SAME_REQUEST`` seconds of the first: one Ctrl-C may arrive twice, from the terminal and forwarded by a
launcher whose workers share the terminal's process group (torchrun, under ``accelerate launch``, starts its
workers in sessions of their own and forwards it once).

Handlers are installed only for the block that needs them, and only on the main thread (the only one Python lets
install them); the previous ones come back after.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAME_REQUEST = 2.0  # seconds


class Terminated(SystemExit):
    """A SIGTERM, raised in the main thread while ``stoppable`` is installed; exit status 128 + 15."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _terminate(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


@contextmanager
def stoppable(hint: str) -> Iterator[None]:
    """Run the block with SIGTERM raised as ``Terminated``, and when either signal stops it print ``hint`` (what
    was kept, what to run) and re-raise. Only a block on the main thread (the only one Python lets install a
    handler) over SIGTERM's default action does either: never inside another one, or over a handler a caller
    installed (training's ``StopRequest``, under which routing plots are written through here) or SIG_IGN. The default
    comes back after."""
    install = threading.current_thread() is threading.main_thread() \
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if install:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except (KeyboardInterrupt, Terminated) as stop:
        if install:
            name = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
            print(f"\n{name}: stopped; {hint}", file=sys.stderr, flush=True)
        raise
    finally:
        if install:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
