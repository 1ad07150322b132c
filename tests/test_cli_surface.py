"""The demo's command line: a mistaken flag is named before minutes of generating and encoding, in one line,
and a SIGKILLed demo leaves no training processes behind it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from semroute.cli import app


@pytest.mark.parametrize("args, message", [
    (["--fusion", "bogus"], "--fusion 'bogus' is unknown; choose one of"),
    (["--preset", "huge"], "--preset 'huge' is unknown; choose one of tiny, small"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--processes", "-1"], "--processes must be >= 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--train-minutes", "0"], "--train-minutes must be > 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),  # was numpy's ValueError after the data was written
])
def test_demo_mistakes_are_named_before_anything_is_written(tmp_path, args, message):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--no-progress", *args])
    assert result.exit_code != 0 and message in str(result.exception), result.exception
    assert not out.exists()  # refused before the images, the caches (and the folder's settings) were made


def test_a_changed_setting_is_named_by_its_flag(tmp_path):
    """A demo folder made with other settings is refused naming each change as the user gives it: by its option
    (``--steps``, not the field ``sample_steps``), or by its key for the demo's fixed recipe."""
    from semroute.demo import SETTINGS_FILE, DemoConfig, recorded_settings

    out = tmp_path / "demo"
    out.mkdir()
    (out / SETTINGS_FILE).write_text(json.dumps({**recorded_settings(DemoConfig()), "width": 64}))
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--no-progress", "--steps", "4"])
    said = str(result.exception)
    assert result.exit_code != 0 and "other settings: width 64 (now 128); --steps 50 (now 4). " in said, said


def test_demo_options_name_the_flags_the_cli_declares():
    import typer

    from semroute.demo import OPTIONS, DemoConfig

    demo = typer.main.get_command(app).commands["demo"]
    declared = {opt for param in demo.params if param.name != "no_progress" for opt in param.opts if opt.startswith("--")}
    assert set(OPTIONS.values()) == declared
    assert set(OPTIONS) <= set(DemoConfig.__dataclass_fields__)


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


def test_version_names_semroute_and_the_libraries_it_runs_on():
    import torch

    from semroute import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"semroute {__version__} (torch {torch.__version__}, transformers ")
