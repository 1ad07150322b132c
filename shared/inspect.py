"""``info`` and ``verify``: describe and check caches without loading any model.

Each kind of store has a describer and a verifier, keyed by its ``kind`` attribute (tables at the end).
Run folders are stage two's (``stage2_train/run_info.py``); the CLI sends them there.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from semroute.shared.errors import CacheDamaged, SemrouteError
from semroute.shared.latent_store import LATENT_KIND, describe_latent_cache
from semroute.shared.store import (
    TEXT_KIND,
    DoneFlags,
    dir_size,
    join,
    open_group,
    read_attrs,
    read_parquet,
)


def describe(path: str) -> dict:
    """A dict describing whatever cache ``path`` is: a text cache or a latent cache."""
    attrs = read_attrs(path)
    kind = attrs.get("kind")
    if kind not in DESCRIBERS:
        raise SemrouteError(f"{path}: unknown cache kind {kind!r}")
    try:
        return DESCRIBERS[kind](path, attrs)
    except SemrouteError:
        raise
    except Exception as err:  # noqa: BLE001 - zarr/pyarrow errors of a damaged file name neither store nor file
        raise CacheDamaged(f"{path}: a file of the cache is damaged ({type(err).__name__}: {err}); run "
                           f"`semroute verify {path}` to find it") from None


def verify(path: str) -> tuple[int, list[str], list[str]]:
    """Check a cache; returns (chunks and files checked, problems naming files and fixes, notes). See
    shared/verify.py for what is covered; nothing there raises for a damaged cache."""
    from semroute.shared.verify import verify_store

    return verify_store(path)


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


DESCRIBERS: dict[str, Callable[[str, dict], dict]] = {TEXT_KIND: _text_describe, LATENT_KIND: describe_latent_cache}
__all__ = ["describe", "verify", "DESCRIBERS"]
