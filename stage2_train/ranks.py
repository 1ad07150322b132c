"""When one training process fails, every process of the job stops, promptly and quietly.

Without this, a rank that raises (a damaged shard only it reads, a ``SemrouteError`` in its data) leaves
the others in a collective that never completes. What ends them depends on the launcher and backend:
under ``accelerate launch``/``torchrun`` on one machine the elastic agent SIGTERMs the other workers when
one exits (measured in bench/RESULTS.md: the job ends in seconds), and gloo raises "Connection closed by
peer" in a rank whose peer died, printing a second, raw traceback that buries the real error. But a rank
on another node (its agent hears nothing), a rank blocked in NCCL, or every rank when the failing process
cannot exit (a thread still downloading a shard keeps the interpreter alive) waits for the process
group's timeout: 30 minutes by default.

torch.distributed offers no "abort the job" call that reaches other processes, so :func:`fail_together`
uses the key-value store every rank of the process group already shares (the launcher's TCPStore):

- the failing rank posts ``(rank, message)`` there, waits (briefly) until each other rank has seen it, and
  re-raises: the CLI prints its error once and exits 1; should its interpreter not exit (threads that
  never end), it is ended :data:`EXIT_GRACE_S` later;
- each other rank watches the store from a daemon thread; once a failure is posted, an error that its own
  collective then raises (the peer's connection closing) ends it with one line naming the failed rank
  instead of a traceback, and if it is still blocked :data:`PEER_GRACE_S` later, it ends itself.

Under one process the context manager does nothing.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager

from semroute.shared.distributed import MainProcessFailed
from semroute.shared.processes import several_processes
from semroute.shared.errors import SemrouteError, first_line

KEY = "semroute/failed"
ACKS = "semroute/failed/seen"
POLL_S = 0.2
ACK_WAIT_S = 3.0  # the failing rank waits at most this long for the others to see its failure
PEER_GRACE_S = float(os.environ.get("SEMROUTE_PEER_GRACE_S", 10.0))
EXIT_GRACE_S = float(os.environ.get("SEMROUTE_EXIT_GRACE_S", 20.0))
JOIN_S = 5.0  # close() waits this long for the watcher's store call to return


class PeerFailed(SemrouteError):
    """Another process of the job failed; this one stops (its error was printed by that process)."""


def _store():
    """A client of the default process group's store of its own (a watcher thread must not share the main
    thread's connection), or None when there is no process group of several ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    try:
        # torch has no public accessor for the default group's store; without it we fall back to the
        # launcher's and backend's own behaviour (see the module docstring).
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store().clone()
    except Exception:  # noqa: BLE001
        return None


class _Watch:
    def __init__(self):
        self.store = None
        self.rank = 0
        self.world = 1
        self.peer: dict | None = None  # the failure another rank posted
        self.failing = False  # this rank posted (or is posting) its own failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="semroute-ranks", daemon=True)
        self._thread.start()

    def _attach(self) -> bool:
        import torch.distributed as dist

        if self.store is None:
            self.store = _store()
            if self.store is not None:
                self.rank, self.world = dist.get_rank(), dist.get_world_size()
        return self.store is not None

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                if not self._attach() or self.failing or not self.store.check([KEY]):
                    continue
                self.peer = json.loads(self.store.get(KEY))
                if self.peer["rank"] == self.rank:
                    continue
                self.store.add(ACKS, 1)
            except Exception:  # noqa: BLE001 - the store went away with the job: nothing left to watch
                return
            # Seen: the main thread may now meet the peer's death in a collective (handled in
            # fail_together); if it is blocked instead, end it after a grace period.
            if self._stop.wait(PEER_GRACE_S) or self.failing:
                return
            _say(f"rank {self.rank}: stopping, rank {self.peer['rank']} failed (its error is printed by that "
                 f"process); still waiting after {PEER_GRACE_S:.0f}s")
            os._exit(1)

    def post(self, err: BaseException) -> None:
        """Tell the other ranks this one failed; wait until they have seen it (or ACK_WAIT_S)."""
        self.failing = True
        if not self._attach():
            return
        try:
            message = first_line(err, 500) or type(err).__name__
            record = json.dumps({"rank": self.rank, "error": message})
            self.store.compare_set(KEY, "", record)  # the first failure is the one reported
            deadline = time.monotonic() + ACK_WAIT_S
            while self.store.add(ACKS, 0) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S / 4)
        except Exception:  # noqa: BLE001 - the others are gone already
            pass

    def posted_by_other(self) -> dict | None:
        """The failure another rank posted, looked up now (the watcher may not have polled yet)."""
        if self.peer is None and self._attach():
            try:
                if self.store.check([KEY]):
                    self.peer = json.loads(self.store.get(KEY))
            except Exception:  # noqa: BLE001
                pass
        return self.peer if self.peer is not None and self.peer["rank"] != self.rank else None

    def close(self) -> None:
        # Joined, not just told: a daemon thread inside a store call (torch C++) when the interpreter
        # exits aborts the process (exit status 134). A call to a dead store is given up on after a while.
        self._stop.set()
        self._thread.join(JOIN_S)


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _exit_later(seconds: float) -> None:
    """End this process ``seconds`` from now if it is still alive (an interpreter that cannot exit)."""

    def end():
        time.sleep(seconds)
        _say(f"rank {watch_rank()}: the process did not exit {seconds:.0f}s after its error; ending it")
        os._exit(1)

    threading.Thread(target=end, name="semroute-exit", daemon=True).start()


_current: _Watch | None = None
_kept: list = []


def keep_until_exit(obj) -> None:
    """Hold ``obj`` (a finished trainer: its DDP model, whose reducer holds the process group) until the CLI ends
    the process (``shared/processes.py`` ``end_process``), under several processes; under one, nothing is held."""
    if several_processes():
        _kept.append(obj)


def watch_rank() -> int:
    return _current.rank if _current is not None else 0


@contextmanager
def fail_together():
    """Around a multi-process job (a no-op under one process): see the module docstring."""
    global _current
    if not several_processes():
        yield
        return
    watch = _current = _Watch()
    try:
        yield
    except BaseException as err:
        peer = None if isinstance(err, SemrouteError) else watch.posted_by_other()
        if peer is not None:
            # What this rank met is the other rank's failure (its connection closed mid-collective).
            raise PeerFailed(f"rank {watch.rank} stopped: rank {peer['rank']} failed (its error is printed by "
                             "that process)") from None
        if not isinstance(err, MainProcessFailed):
            # (rank 0's own error is the job's failure: rank 0 posts it. Posted from here first, it made rank 0
            # report "rank 1 failed" and end the job before this rank printed why.)
            watch.post(err)
        _exit_later(EXIT_GRACE_S)
        raise
    finally:
        watch.close()
        _current = None
