"""One training process per run folder: ``RUN/.lock``, held with ``flock`` for the run's whole life.

Two ``train`` commands on one ``--out`` would interleave their checkpoints and logs and both exit 0. The
lock is an advisory ``fcntl.flock`` on a file inside the run folder; the kernel drops it when its process
ends, however it ends (exit, exception, ``kill -9``), so a lock left by a dead process never blocks the
next run: there is no stale lock to detect or clean. Under several processes the main one holds it.
The file records the holder's pid and host, for the message the second process prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from semroute.shared.errors import SemrouteError

LOCK_NAME = ".lock"


class RunFolderBusy(SemrouteError):
    """Another live process trains in this run folder."""


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fh = None
        self.created_folder = False

    def acquire(self) -> "RunLock":
        self.created_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = _holder(fh.read())
            fh.close()
            raise RunFolderBusy(f"{self.path.parent} is in use by another training process ({holder}); wait for it "
                                "to end or train into another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        fh.flush()
        self._fh = fh
        return self

    def release(self, *, failed: bool = False) -> None:
        """Drop the lock; ``failed``: a run that stopped before writing anything (bad caches, say) also takes
        away the folder it created, so that a mistake leaves no empty run folder behind."""
        if self._fh is None:
            return
        if failed and self.created_folder and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
            self.path.unlink(missing_ok=True)  # still held: no other process can have taken it meanwhile
            try:
                self.path.parent.rmdir()
            except OSError:
                pass  # something appeared in it after all: it stays
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
