"""``info`` and ``verify``: describe and check caches without loading any model.

Each kind of store has a describer and a verifier, keyed by its ``kind`` attribute (tables at the end).
Run folders are stage two's (``stage2_train/run_info.py``); the CLI sends them there.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from semroute.shared.errors import SemrouteError
from semroute.shared.latent_store import LATENT_KIND, describe_latent_cache, verify_latent_cache
from semroute.shared.store import (
    TEXT_KIND,
    DoneFlags,
    dir_size,
    join,
    open_group,
    read_attrs,
    read_parquet,
    verify_array,
)


def describe(path: str) -> dict:
    """A dict describing whatever cache ``path`` is: a text cache or a latent cache."""
    attrs = read_attrs(path)
    kind = attrs.get("kind")
    if kind not in DESCRIBERS:
        raise SemrouteError(f"{path}: unknown cache kind {kind!r}")
    return DESCRIBERS[kind](path, attrs)


def verify(path: str) -> tuple[int, list[str]]:
    """Check a cache; returns (chunks checked, problems naming shard files)."""
    attrs = read_attrs(path)
    kind = attrs.get("kind")
    if kind not in VERIFIERS:
        raise SemrouteError(f"{path}: unknown cache kind {kind!r}")
    return VERIFIERS[kind](path, attrs)


def _text_describe(path: str, attrs: dict) -> dict:
    fp = attrs["fingerprint"]
    total = attrs["total_tokens"]
    L = len(attrs["layers"])
    D = attrs["hidden_size"]
    group = open_group(path)
    flags = DoneFlags(group, "features").done()
    size = dir_size(path)
    data_bytes = sum(dir_size(join(path, n)) for n in ("features", "scales") if n == "features" or attrs["storage"] == "fp8")
    info = {
        "kind": "text cache",
        "path": path,
        "complete": bool(attrs.get("complete")),
        "shards written": f"{int(flags.sum())} / {len(flags)}",
        "captions": attrs["n_captions"],
        "tokens": total,
        "mean tokens per caption": round(total / max(1, attrs["n_captions"]), 2),
        "truncated captions": attrs.get("n_truncated"),
        "layers": f"{L}: {attrs['layers']}",
        "hidden size": D,
        "storage": f"{attrs['storage']} ({fp['stored_dtype']})",
        "size on disk": f"{size / 2**20:.2f} MiB",
        "bytes per token-layer value": round(data_bytes / max(1, total * L * D), 4) if data_bytes else None,
        "null caption": f"{attrs.get('null_text')!r} ({attrs.get('null_n_tokens')} tokens)",
        "fingerprint": {k: v for k, v in fp.items() if k != "layers"},
    }
    if "progress/storage_error" in group:
        err = np.asarray(group["progress/storage_error"][:])
        sq_err, sq_val = float(err[:, 0].sum()), float(err[:, 1].sum())
        info["storage error vs exact"] = {
            "relative RMS": f"{math.sqrt(sq_err / max(sq_val, 1e-30)):.3e}",
            "max abs": f"{float(err[:, 2].max()):.3e}",
            "measured on": f"{int((err[:, 1] > 0).sum())} shards, every value",
        }
    return info


def _text_verify(path: str, attrs: dict) -> tuple[int, list[str]]:
    group = open_group(path)
    problems: list[str] = []
    checked = 0
    names = ["features", "scales"] if attrs["storage"] == "fp8" else ["features"]
    for name in names:
        done = DoneFlags(group, name).done()
        n, found = verify_array(path, name, done)
        checked += n
        problems += found
    try:
        offsets = np.asarray(group["offsets"][:])
        if "lengths" in group:  # an appended cache (format 2): rows between segments are unused
            lengths = np.asarray(group["lengths"][:])
            if (offsets[0] != 0 or len(lengths) != len(offsets) - 1 or np.any(lengths <= 0)
                    or np.any(offsets[:-1] + lengths > offsets[1:]) or lengths.sum() != attrs["total_tokens"]
                    or offsets[-1] != attrs["layout"]["rows"]):
                problems.append(f"{path}/offsets, lengths: not valid for {attrs['total_tokens']} tokens in "
                                f"{attrs['layout']['rows']} rows")
        elif offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] != attrs["total_tokens"]:
            problems.append(f"{path}/offsets: not a valid CSR offsets array for {attrs['total_tokens']} tokens")
        index = read_parquet(path, "index.parquet", columns=["start", "n_tokens"])
        if index.num_rows != attrs["n_captions"] or not np.array_equal(index.column("start").to_numpy(), offsets[:-1]):
            problems.append(f"{path}/index.parquet: does not match offsets")
        checked += 1
    except Exception as err:  # a corrupt small array or index: report it, keep checking the rest
        problems.append(f"{path}: offsets/index unreadable: {err}")
    if "null_features" not in group:
        problems.append(f"{path}: no null caption (the run did not finish; use --resume)")
    if not attrs.get("complete"):
        problems.append(f"{path}: not marked complete")
    return checked, problems


DESCRIBERS: dict[str, Callable[[str, dict], dict]] = {TEXT_KIND: _text_describe, LATENT_KIND: describe_latent_cache}
VERIFIERS: dict[str, Callable[[str, dict], tuple[int, list[str]]]] = {TEXT_KIND: _text_verify,
                                                                     LATENT_KIND: verify_latent_cache}

__all__ = ["describe", "verify", "DESCRIBERS", "VERIFIERS"]
