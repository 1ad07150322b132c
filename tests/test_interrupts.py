"""A command stopped by Ctrl-C or SIGTERM (shared/interrupts.py): one line saying so, no traceback, no stray lock or
temporary file, nothing written lost, and a rerun finishes with what an uninterrupted run writes.

Each CLI here signals itself at a fixed point: a sitecustomize (``_signal_hook``) wraps one function so that its
n-th call sends the signal to its own process, as a scheduler's SIGTERM arriving right then would."""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from testkit import CHECKOUT_PRELUDE, CLI, copy_run, write_manifest, write_square_images

_HOOK = CHECKOUT_PRELUDE + """
import importlib, os, signal, time
_module, _owner, _name, _n, _sig = os.environ["SEMROUTE_TEST_SIGNAL"].split(":")
_target = importlib.import_module(_module)
_holder = getattr(_target, _owner) if _owner else _target
_real, _calls = getattr(_holder, _name), [0]


def _signalled(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] == int(_n):
        os.kill(os.getpid(), getattr(signal, _sig))
        time.sleep(30)  # (a handler raises here, in the main thread; without one the signal's default acts)
    return _real(*args, **kwargs)


setattr(_holder, _name, _signalled)
"""


def _signal_hook(tmp_path: Path, target: str) -> dict:
    """Environment for a CLI whose ``target`` (``module:owner:function:n:SIGNAL``: owner, a class or module in
    ``module``, or empty for the module itself) signals its own process on its n-th call."""
    hook = tmp_path / "signal-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_HOOK)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p),
            "SEMROUTE_TEST_SIGNAL": target, "HF_HUB_OFFLINE": "1"}


def _cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def _stray(folder: Path) -> list[str]:
    """Locks and temporary files left in ``folder`` (a run folder's own ``.lock`` is kept by design)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name != ".lock" and (p.name.startswith(".") or p.name.endswith((".tmp", ".lock"))))


def _hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def _stopped(proc: subprocess.CompletedProcess, name: str, code: int) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert f"{name}: stopped;" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_encode_sigterm_removes_its_lock_and_resume_finishes(tmp_path):
    """SIGTERM once the encoder holds --out's lock: the lock file beside the cache was left (the default action
    skips every cleanup); now it is removed, the message names --resume, and the resumed cache is whole."""
    from semroute.shared.inspect import verify
    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images

    write_manifest(tmp_path / "m.jsonl", write_square_images(tmp_path / "img", 8))
    args = ["encode-images", "m.jsonl", "--vae", "pixel", "--resolution", "32", "--device", "cpu", "--workers", "0",
            "--no-progress", "--out", "c.zarr"]
    proc = _cli(*args, env=_signal_hook(tmp_path, "semroute.stage1_encode.images:EncodeImagesRun:prepare:1:SIGTERM"),
                cwd=tmp_path)
    _stopped(proc, "SIGTERM", 128 + signal.SIGTERM)
    assert "--resume" in proc.stderr
    assert _stray(tmp_path) == []  # c.zarr.lock among them
    encode_images(EncodeImagesConfig(data=str(tmp_path / "m.jsonl"), out=str(tmp_path / "c.zarr"), vae="pixel",
                                     resolution=32, device="cpu", workers=0, resume=True, progress=False))
    checked, problems, _ = verify(str(tmp_path / "c.zarr"))
    assert problems == [] and checked > 0


def test_sample_sigterm_mid_write_leaves_no_temporary_file(run4, tmp_path):
    """SIGTERM while an image is being written (its temporary file there, not yet renamed): the temporary file
    was left for good; now it is removed, the images written are kept, and the rerun writes the rest, the same
    bytes an uninterrupted run writes."""
    from semroute.stage2_train.sampling import SampleConfig, sample

    run = copy_run(run4, tmp_path)
    args = ["sample", "-c", str(run), "-p", "a red square", "-p", "a blue square", "--steps", "2", "--device", "cpu",
            "--no-progress"]
    proc = _cli(*args, "-o", "out", env=_signal_hook(tmp_path, "semroute.shared.files:os:replace:4:SIGTERM"),
                cwd=tmp_path)
    _stopped(proc, "SIGTERM", 128 + signal.SIGTERM)
    assert _stray(tmp_path / "out") == []
    kept = _hashes(tmp_path / "out", skip=("sample_run.json",))
    assert "00000_0.png" in kept  # (the first image was written before the signal)
    for out in ("out", "ref"):  # the rerun, and an uninterrupted run
        sample(SampleConfig(checkpoint=str(run), out=str(tmp_path / out), prompts=["a red square", "a blue square"],
                            steps=2, device="cpu", progress=False))
    assert _hashes(tmp_path / "out", skip=("sample_run.json",)) == _hashes(tmp_path / "ref", skip=("sample_run.json",))
    assert _stray(tmp_path / "out") == []


def test_export_sigterm_leaves_no_staging_folder(run4, tmp_path):
    """SIGTERM while the pipeline is being saved: its hidden staging folder (.NAME.export.tmp) was left; now it is
    removed, --out is not created, and the rerun exports."""
    from semroute.stage2_train.checkpoint_files import check_export
    from semroute.stage2_train.pipeline import export_pipeline

    proc = _cli("export", str(run4), "-o", "pipe",
                env=_signal_hook(tmp_path, "semroute.stage2_train.checkpoint_files::write_manifest:1:SIGTERM"),
                cwd=tmp_path)
    _stopped(proc, "SIGTERM", 128 + signal.SIGTERM)
    assert _stray(tmp_path) == [] and not (tmp_path / "pipe").exists()
    export_pipeline(run4, tmp_path / "pipe")
    check_export(tmp_path / "pipe")


def test_report_sigterm_mid_write_leaves_no_temporary_file(run4, tmp_path):
    """SIGTERM while the page is renamed into place: its temporary file (.NAME.PID.TID.tmp) was left beside it."""
    proc = _cli("report", str(run4), "-o", "r.html",
                env=_signal_hook(tmp_path, "semroute.shared.files:os:replace:1:SIGTERM"), cwd=tmp_path)
    _stopped(proc, "SIGTERM", 128 + signal.SIGTERM)
    assert _stray(tmp_path) == [] and not (tmp_path / "r.html").exists()


def test_routing_stopped_mid_write_keeps_the_earlier_files(run4, tmp_path, monkeypatch):
    """Ctrl-C while ``semroute routing`` rewrites RUN/routing/<checkpoint>.csv and .png: they were opened for
    writing in place, so the earlier (good) files were left cut short; now each is replaced whole, or kept."""
    import matplotlib.figure

    from semroute.stage2_train import routing
    from semroute.stage2_train.run_folder import open_model

    run = copy_run(run4, tmp_path)
    model, where = open_model(run)
    png, csv_path = routing.save_routing(model, run / "routing", where)
    before = {p: p.read_bytes() for p in (png, csv_path)}
    real_writer = routing.csv.writer

    class Interrupted:  # a csv writer stopped by Ctrl-C after its header
        def __init__(self, fh):
            self.rows, self.inner = 0, real_writer(fh)

        def writerow(self, row):
            self.rows += 1
            if self.rows == 3:
                raise KeyboardInterrupt
            self.inner.writerow(row)

    monkeypatch.setattr(routing.csv, "writer", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        routing.save_routing(model, run / "routing", where)
    monkeypatch.undo()

    def savefig_interrupted(self, fname, **kwargs):  # half the picture's bytes out, then Ctrl-C
        target = fname if hasattr(fname, "write") else open(fname, "wb")
        target.write(before[png][: len(before[png]) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_interrupted)
    with pytest.raises(KeyboardInterrupt):
        routing.save_routing(model, run / "routing", where)
    assert {p: p.read_bytes() for p in (png, csv_path)} == before
    assert _stray(run / "routing") == []


def test_sample_rerun_stopped_while_writing_the_grid_keeps_the_earlier_grid(run4, tmp_path, monkeypatch):
    """Ctrl-C while a rerun of ``sample`` (every image there already) rewrites OUT/grid.png: the grid was saved
    in place, so the earlier one was left cut short; now it is replaced whole, or kept."""
    import PIL.Image

    from semroute.stage2_train.sampling import SampleConfig, sample

    cfg = SampleConfig(checkpoint=str(run4), out=str(tmp_path / "out"), prompts=["a red square"], steps=2,
                       device="cpu", progress=False)
    grid = Path(sample(cfg)["grid"])
    before = grid.read_bytes()

    def save_interrupted(self, fp, format=None, **kwargs):  # half the picture's bytes out, then Ctrl-C
        target = fp if hasattr(fp, "write") else open(fp, "wb")
        target.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(PIL.Image.Image, "save", save_interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample(cfg)
    assert grid.read_bytes() == before and _stray(tmp_path / "out") == []


def test_stoppable_says_what_to_run_and_restores_sigterm(capsys):
    """Ctrl-C in a ``stoppable`` block prints its hint once (nested blocks stay quiet) and SIGTERM's default
    action is back after."""
    from semroute.shared.interrupts import stoppable

    with pytest.raises(KeyboardInterrupt):
        with stoppable("outer hint"):
            with stoppable("inner hint"):
                raise KeyboardInterrupt
    err = capsys.readouterr().err
    assert "Ctrl-C: stopped; outer hint" in err and "inner hint" not in err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_the_demo_says_that_a_rerun_goes_on_not_the_commands_it_runs(tmp_path, monkeypatch, capsys):
    """The demo runs encode and sample in this process: their hints ("--resume", "the same command") would name
    commands the user did not type."""
    from semroute import demo
    from semroute.shared.interrupts import stoppable

    def encode_stopped(cfg, llm=None):
        with stoppable("the shards written are kept: run the same command with --resume to finish it"):
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_run_demo", encode_stopped)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(demo.DemoConfig(out=str(tmp_path / "d")))
    err = capsys.readouterr().err
    assert f"Ctrl-C: stopped; what {tmp_path / 'd'} holds is kept: run the same command to go on" in err
    assert "--resume" not in err


def _blocked(pid: int) -> int:
    """The signal mask of process ``pid`` (Linux: /proc/PID/status's SigBlk) as a bit set."""
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("SigBlk:"))
    return int(line.split()[1], 16)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_ctrl_c_while_decoding_workers_start(monkeypatch):
    """encode-images --workers N: a Ctrl-C (sent to the terminal's whole process group) while the DataLoader
    starts its workers printed tracebacks: from a worker starting up, and from the iterator this process left
    half-built (``__del__``: no ``_workers``). Now it waits until the iterator is whole, and the workers, which
    this process shuts down, never see it (nor a SIGTERM sent to the group, which killed them and failed this
    process with torch's "worker is killed by signal" traceback)."""
    import torch.multiprocessing

    from semroute.stage1_encode.images import _worker_init, start_batches

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2, worker_init_fn=_worker_init)
    batches = start_batches(loader)
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    batches = start_batches(loader)
    next(batches)  # (worker 0 made it: it has run _worker_init)
    held = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    for worker in batches._workers:
        assert _blocked(worker.pid) & held == held
    assert not _blocked(os.getpid()) & (1 << (signal.SIGINT - 1))
    del batches

    real_event = torch.multiprocessing.Event
    other = threading.Thread(target=threading.Event().wait, args=(30,), daemon=True)
    other.start()
    # The signal's C handler runs in the thread that takes it, once that thread is scheduled (late on a loaded
    # machine); it also writes the signal's number to the wake-up fd, so the test can wait for it.
    woken, wake = os.pipe()
    os.set_blocking(wake, False)
    previous_fd = signal.set_wakeup_fd(wake)

    def ctrl_c_then_event():  # in the iterator's constructor, before it lists its workers: a Ctrl-C taken by
        signal.pthread_kill(other.ident, signal.SIGINT)  # another thread, its handler run in this one
        os.read(woken, 1)
        return real_event()

    monkeypatch.setattr(torch.multiprocessing, "Event", ctrl_c_then_event)
    # Ctrl-C's own handler: a job started in the background (`pytest &`) inherits SIGINT ignored, and Python
    # keeps it so; start_batches gives back whatever was there.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            start_batches(loader)
        gc.collect()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.set_wakeup_fd(previous_fd)
        os.close(woken)
        os.close(wake)
    assert unraisable == []


def test_decoding_worker_quiet_when_the_main_process_stops_mid_handshake(tmp_path):
    """A decoding worker's resource-sharer thread (which hands a batch's memory to the main process) failed with a
    connection reset when a Ctrl-C stopped the main process mid-handshake, and printed that traceback; now it is
    quiet about that failure alone."""
    code = CHECKOUT_PRELUDE + """
import os, socket, sys, time
from multiprocessing import resource_sharer
from semroute.stage1_encode.images import _worker_init
_worker_init(0)
failed, quiet = [], sys.excepthook
sys.excepthook = lambda *exc: (failed.append(exc[0]), quiet(*exc))
resource_sharer.DupFd(os.open(os.devnull, os.O_RDONLY))  # starts the sharer's server thread
peer = socket.socket(socket.AF_UNIX)
peer.connect(resource_sharer._resource_sharer._address)
peer.close()  # gone mid-handshake, as a main process stopped by Ctrl-C
deadline = time.monotonic() + 10
while time.monotonic() < deadline and not failed:  # (the sharer reports it and serves on)
    time.sleep(0.05)
print("reported" if failed else "not reported")
sys.excepthook(ZeroDivisionError, ZeroDivisionError("any other failure"), None)  # printed
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "reported", proc.stderr
    assert "resource_sharer" not in proc.stderr and "any other failure" in proc.stderr, proc.stderr
