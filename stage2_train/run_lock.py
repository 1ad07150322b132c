"""One training process per run folder: ``RUN/.lock`` (shared/lock.py), held for the run's whole life.

A run that stops before writing anything (bad caches, say) also takes away the folder its lock created, so
that a mistake leaves no empty run folder behind.
"""

from __future__ import annotations

from pathlib import Path

from semroute.shared.lock import FileLock, OutputBusy

LOCK_NAME = ".lock"


class RunFolderBusy(OutputBusy):
    """Another live process trains in this run folder."""


class RunLock(FileLock):
    busy_error = RunFolderBusy

    def __init__(self, run_dir: str | Path):
        super().__init__(Path(run_dir) / LOCK_NAME)
        self.created_folder = False

    def busy(self, holder: str) -> str:
        return (f"{self.path.parent} is in use by another training process ({holder}); wait for it to end or train "
                "into another --out")

    def acquire(self) -> "RunLock":
        self.created_folder = not self.path.parent.exists()
        return super().acquire()

    def release(self, *, failed: bool = False) -> None:
        """Drop the lock; ``failed``: also take away the folder this run created, if it holds only the lock."""
        if not self.held:
            return
        if failed and self.created_folder and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
            self.path.unlink(missing_ok=True)  # still held: no other process can have taken it meanwhile
            try:
                self.path.parent.rmdir()
            except OSError:
                pass  # something appeared in it after all: it stays
        super().release()
