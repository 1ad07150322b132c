"""The demo's command line: a mistaken flag is named before minutes of generating and encoding, in one line,
and a SIGKILLed demo leaves no training processes behind it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from semroute.cli import app


@pytest.mark.parametrize("args, message", [
    (["--fusion", "bogus"], "fusion 'bogus' is unknown; choose one of"),
    (["--preset", "huge"], "--preset 'huge' is unknown; choose one of tiny, small"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--processes", "-1"], "--processes must be >= 0"),
])
def test_demo_mistakes_are_named_before_anything_is_written(tmp_path, args, message):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--no-progress", *args])
    assert result.exit_code != 0 and message in str(result.exception), result.exception
    assert not out.exists()  # refused before the images, the caches (and the folder's settings) were made


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_launched_training_dies_with_the_demo(tmp_path):
    """The launcher started by ``launch_training`` gets SIGTERM when the demo is SIGKILLed (a stand-in parent
    here starts ``sleep`` the same way)."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys; from semroute.demo import die_with_parent\n"
        "child = subprocess.Popen(['sleep', '60'], preexec_fn=die_with_parent())\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); sys.stdin.read()")],
        stdin=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        for _ in range(200):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.05)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        for _ in range(100):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{child}/stat") as f:  # gone, or a zombie awaiting its reaper
                if f.read().split(")")[-1].split()[0] == "Z":
                    break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the child outlived its SIGKILLed parent")
    finally:
        parent.kill()
