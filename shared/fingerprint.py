"""Fingerprints: what produced a cache, so that stage two can refuse a cache that does not fit its run.

A fingerprint is a flat JSON-able dict (``llm.weights_sha256``, ``layers``, ``instruction``, ...).
:func:`diff` compares the keys that matter to a consumer and says, key by key, what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from semroute.shared.errors import FingerprintMismatch
from semroute.shared.files import write_atomic

_HASH_CACHE = Path(os.environ.get("SEMROUTE_CACHE_DIR", Path.home() / ".cache" / "semroute")) / "file-sha256.json"
_HEX64 = set("0123456789abcdef")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(value: object) -> str:
    return sha256_text(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str))


def _load_hash_cache() -> dict:
    try:
        return json.loads(_HASH_CACHE.read_text())
    except (OSError, ValueError):
        return {}


def _store_hash_cache(cache: dict) -> None:
    try:
        _HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(_HASH_CACHE, json.dumps(cache))
    except OSError:
        pass  # the cache only saves time; hashing again is always correct


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes.

    A Hugging Face hub snapshot links each large file to ``blobs/<sha256>``, so for those the hash is
    read off the link target. Other files are hashed once and remembered by (path, size, mtime).
    """
    path = Path(path)
    if path.is_symlink():
        target = Path(os.readlink(path))
        name = target.name
        if target.parent.name == "blobs" and len(name) == 64 and set(name) <= _HEX64:
            return name
    real = path.resolve()
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    cache = _load_hash_cache()
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(real, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    cache[key] = digest
    _store_hash_cache(cache)
    return digest


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def folder_weights_sha256(folder: str | Path) -> str:
    """One hash over a model folder's weight files (names and contents) and its config.json."""
    folder = Path(folder)
    parts = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"):
            parts.append((str(p.relative_to(folder)), file_sha256(p)))
    if not parts:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    return sha256_json(parts)


def _same_local_path(a, b) -> bool:
    """Two references to one local LLM: caches written before references were recorded as absolute paths
    (shared/llm.py ``recorded_ref``) hold the path as typed, relative to where encode-text ran."""
    if not (isinstance(a, str) and isinstance(b, str)) or not (Path(a).exists() and Path(b).exists()):
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def diff(have: dict, want: dict, keys: list[str] | None = None) -> list[str]:
    """Lines ``key: cache has X, run expects Y`` for every key (of ``keys``, or of ``want``) that differs."""
    out = []
    for key in keys if keys is not None else sorted(want):
        a, b = have.get(key, "<missing>"), want.get(key, "<missing>")
        if a != b and not (key == "llm_ref" and _same_local_path(a, b)):
            out.append(f"{key}: cache has {_short(a)}, expected {_short(b)}")
    return out


def require_match(have: dict, want: dict, keys: list[str] | None, what: str) -> None:
    """Raise :class:`FingerprintMismatch` listing every difference between two fingerprints."""
    lines = diff(have, want, keys)
    if lines:
        raise FingerprintMismatch(f"{what} does not fit this run:\n  " + "\n  ".join(lines))


def _short(value: object) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
