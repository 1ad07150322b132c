"""One writer at a time: an advisory ``fcntl.flock`` on a lock file, held for the writer's whole life.

Two commands writing one output (two ``train`` on one ``--out``, two ``encode-text`` on one cache) would
interleave their files and both exit 0. The kernel drops a ``flock`` when its process ends, however it ends
(exit, exception, ``kill -9``), so a lock left by a dead process never blocks the next one: there is no stale
lock to detect or clean. Under several processes the main one holds it. The file records the holder's pid
and host, for the message the second writer prints. The run folder's lock is ``stage2_train/run_lock.py``;
the encoders' is ``OutputLock`` below.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from semroute.shared.errors import SemrouteError
from semroute.shared.remote import is_url


class OutputBusy(SemrouteError):
    """Another live process writes this output."""


class FileLock:
    """``flock`` on ``path`` (created with its parent folders); ``busy(holder)`` words the refusal."""

    busy_error: type[SemrouteError] = OutputBusy

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = None

    def busy(self, holder: str) -> str:
        return f"{self.path} is held by another process ({holder})"

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = _holder(fh.read())
                fh.close()
                raise self.busy_error(self.busy(holder)) from None
            if self._still_there(fh):
                break
            # The file was removed (``OutputLock.release``) between our open and our lock: a lock on it guards
            # nothing, since the next process creates and locks a new file. Open the path again.
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        fh.flush()
        self._fh = fh
        return self

    def _still_there(self, fh) -> bool:
        """Whether ``fh`` is still the file at ``self.path`` (not removed or replaced since it was opened)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            return False

    @property
    def held(self) -> bool:
        return self._fh is not None

    def check_free(self) -> None:
        """Raise the refusal now if another process holds the lock (taken and given back at once), so that it
        comes before minutes of loading a model; ``acquire`` later still decides a race. Without the file
        nobody holds it (a holder keeps it until it releases), and nothing is created."""
        if not self.held and self.path.is_file():
            self.acquire()
            self.release()

    def release(self) -> None:
        if self._fh is None:
            return
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class OutputLock(FileLock):
    """An encoder's ``--out``: ``NAME.lock`` beside the store (inside it, creating or ``--overwrite`` would
    delete it, since a create empties the folder). ``NAME`` is the folder's real path (symlinks, ``.`` and
    ``..`` resolved), so every spelling of one folder (``out``, ``./out/``, ``/abs/out``, ``.``, a link to it)
    takes the same lock. Object storage has no such lock: ``s3://`` outputs get none (``acquire`` is a no-op
    there)."""

    def __init__(self, out: str):
        self.out = str(out)
        self.remote = is_url(self.out)
        real = Path(os.path.realpath(self.out)) if not self.remote else Path()
        super().__init__(Path(f"{real}.lock") if not self.remote else Path())

    def busy(self, holder: str) -> str:
        return (f"--out {self.out} is being written by another encode process ({holder}; lock {self.path}); wait "
                "for it to end, or write to another --out")

    def acquire(self):
        return self if self.remote else super().acquire()

    def release(self) -> None:
        """Drop the lock and remove its file, so no stray ``NAME.lock`` stays beside the cache. (A process that
        opened the file just before its removal could then lock the removed file while a third locks a new
        one: a race of three starts within the same instant, accepted so as not to leave files behind.)"""
        if self.held:
            self.path.unlink(missing_ok=True)
        super().release()


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
