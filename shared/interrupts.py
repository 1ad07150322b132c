"""A command stopped by Ctrl-C or by the SIGTERM a scheduler sends ends as cleanly as one that failed, and says so.

Python turns SIGINT into ``KeyboardInterrupt``, so every ``finally`` and ``except BaseException`` cleanup runs (the
encoders' ``NAME.lock`` beside ``--out`` is removed: shared/lock.py; a temporary file or export folder is deleted:
shared/files.py, stage2_train/pipeline.py). SIGTERM's default action ends the process at once, skipping them all,
so it left those files behind. While ``stoppable`` is installed a SIGTERM raises ``Terminated`` instead (a
``SystemExit`` with the status a shell reports for a process ended by SIGTERM, 143), and either signal prints one
line saying what was kept and what to run. A second SIGTERM ends the process at once, as before. Training has its
own handlers (stage2_train/stop.py: it stops with a checkpoint).
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


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
    installed (training's, stage2_train/stop.py, which writes routing plots through here) or SIG_IGN. The default
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
