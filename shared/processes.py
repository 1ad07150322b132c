"""How a process that is one of several ends (torch-free: the CLI's entry point imports it)."""

from __future__ import annotations

import os
import sys


def several_processes() -> bool:
    """Whether this process is one of several (a launcher's ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) >= 2


def end_process(code: int = 0) -> None:
    """Under several processes, end this one now, its output flushed, without freeing the process group.

    Freeing it can hang for good (seen twice in the 2-process demo test; gdb: the main thread in
    ``~ProcessGroupGloo``, reached from the DDP ``~Reducer`` with the GIL held, joins gloo's worker thread, which
    waits for the GIL to free the tensors of a collective it has just finished: pytorch/pytorch#56297). The
    barrier after each broadcast (shared/distributed.py, ``ProcessInfo.broadcast``) made it rarer, not
    impossible: gloo has two worker threads, and a finished collective is freed on its worker after the caller's
    ``wait`` returns; torch's ``destroy_process_group`` does not stop gloo's threads. The CLI calls this when a
    command has finished (everything written and closed, locks released, trackers ended), so skipping the
    interpreter's teardown loses nothing. Under one process it returns."""
    if not several_processes():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
