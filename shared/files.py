"""Replacing a local file whole: the one way semroute writes a file a kill must never leave cut short.

Records (run.json, config.yaml, a checkpoint's complete.json), lists of records left out, prompt sets, reports
and a store's plain files are written to a temporary sibling and renamed over the old one, so a reader (or a
resume after ``kill -9`` or a full disk) finds the old file or the new one, never part of either. The temporary
name carries the process and thread, so two writers never share one; a write that fails removes its temporary
file and raises the original error. Object storage gets one PUT instead (:func:`semroute.shared.remote.write_bytes`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str, *, fsync: bool = False) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` through a rename. ``fsync`` also flushes it to the disk first,
    for a file whose presence publishes others (a checkpoint's manifest)."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
