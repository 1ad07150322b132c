"""shared/files.write_atomic: the one writer of files a kill must not leave cut short."""

from __future__ import annotations

import errno
import os

import pytest

from semroute.shared import files


def _no_temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old")
    files.write_atomic(path, "néw")
    assert path.read_bytes() == "néw".encode()
    files.write_atomic(path, b"\x00\x01", fsync=True)
    assert path.read_bytes() == b"\x00\x01"
    assert _no_temporaries(tmp_path) == []


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch, failing):
    path = tmp_path / "config.yaml"
    path.write_text("old: 1\n")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, full)
    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(path, "new: 2\n", fsync=True)
    assert path.read_text() == "old: 1\n"
    assert _no_temporaries(tmp_path) == []
