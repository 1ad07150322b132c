"""A checkpoint's list of files, written last: ``complete.json`` (size and crc32c of every file).

A checkpoint is written into a temporary folder and renamed when complete, so a crash never leaves a
half checkpoint under its final name. Files can still go missing or rot afterwards (a disk fault, a
copy that stopped, a hand edit). ``complete.json`` is the checkpoint's table of contents: ``--resume
latest`` takes the newest checkpoint whose files all match it (and says which it skipped and why), and
``sample``/``export`` check the model files they load. crc32c (hardware-accelerated in the ``crc32c``
package the cache reader uses) reads gigabytes per second, so checking a large checkpoint costs seconds.
Checkpoints written before this file existed have no ``complete.json`` (nor has one whose list was lost); of
those, only the weights files can be checked: each safetensors file must be whole (``unlisted_problems``).
"""

from __future__ import annotations

import json
from pathlib import Path

from semroute.shared.errors import SemrouteError, first_line
from semroute.shared.files import write_atomic

MANIFEST = "complete.json"
TRAIN_STATE = "train_state.json"  # step, epoch, samples, seconds: every checkpoint has it


class DamagedCheckpoint(SemrouteError):
    """A checkpoint whose files do not match its ``complete.json``."""


def _crc32c_file(path: Path) -> int:
    import crc32c

    value = 0
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            value = crc32c.crc32c(block, value)
    return value


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, step: int) -> None:
    """Record every file of ``folder`` (call it last, before the rename that publishes the checkpoint)."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "crc32c": _crc32c_file(p)}
             for p in _files(folder)}
    write_atomic(folder / MANIFEST, json.dumps({"step": step, "files": files}, indent=1), fsync=True)


def unlisted_problems(folder: Path, under: str | None = None) -> list[str]:
    """What is wrong with the weights of a folder that has no ``complete.json``: each ``*.safetensors`` file (below
    ``under``) must be whole, its header read and its tensors ending where the file ends (``safe_open`` checks
    both, reading the header only). A file cut short would otherwise reach diffusers' loader as a bare OSError."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    found = []
    for file in sorted((folder / under if under else folder).rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            found.append(f"{file} is damaged or cut short ({first_line(err, 120)})")
    return found


def problems(folder: Path, under: str | None = None, crc: bool = True) -> list[str]:
    """What is wrong with a checkpoint (empty when every listed file is there, whole and unchanged).
    ``under``: check only the files below that subfolder (e.g. ``model``); ``crc=False``: sizes only (a quick
    look that reads no file, as ``info`` takes). Without a ``complete.json``: ``unlisted_problems``."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        if not (folder / TRAIN_STATE).exists():
            return [f"{folder} has no {MANIFEST} (never completed)"]
        return unlisted_problems(folder, under)
    try:
        listed = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return [f"{path} is damaged ({err})"]
    found = []
    for name, want in listed.items():
        if under is not None and not name.startswith(under.rstrip("/") + "/"):
            continue
        file = folder / name
        if not file.is_file():
            found.append(f"{file} is missing")
        elif file.stat().st_size != want["size"]:
            found.append(f"{file} has {file.stat().st_size} bytes, {want['size']} were written")
        elif crc and _crc32c_file(file) != want["crc32c"]:
            found.append(f"{file} fails its crc32c checksum")
    return found


def require_intact(folder: Path, under: str | None = None) -> None:
    found = problems(folder, under)
    if found:
        raise DamagedCheckpoint(f"checkpoint {folder} is damaged: {'; '.join(found[:5])}"
                                + (f" (and {len(found) - 5} more)" if len(found) > 5 else "")
                                + "; resume from an earlier checkpoint (--resume RUN/checkpoints/step-N) or "
                                  "retrain")


def check_export(folder: Path) -> None:
    """Refuse an exported pipeline whose files do not match its ``complete.json`` (a disk fault, an
    interrupted copy, a hand edit), naming the files. Exports without one (written before it existed, or
    whose list was lost) have their weights files checked whole (``unlisted_problems``)."""
    folder = Path(folder)
    found = problems(folder) if (folder / MANIFEST).exists() else unlisted_problems(folder)
    if found:
        raise SemrouteError(f"exported pipeline {folder} is damaged: {'; '.join(found[:5])}"
                            + (f" (and {len(found) - 5} more)" if len(found) > 5 else "")
                            + f"; export it again (semroute export RUN --out {folder} --overwrite)")
