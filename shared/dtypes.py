"""Names of torch dtypes, parsed and printed in one place: the values of ``--dtype``, and the names a cache
records in its attributes (``fingerprint.compute_dtype`` of a text cache, ``stored_dtype`` of a latent cache).
A name is looked up here, never as ``getattr(torch, name)``: a damaged attribute there could name a function
(``"abs"``) or a dtype semroute never writes (``"float64"``) and fail far from its cause."""

from __future__ import annotations

import torch

from semroute.shared.errors import CacheDamaged, SemrouteError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how a dtype is written into a cache's attributes and messages."""
    return str(dtype).removeprefix("torch.")


# The dtypes a model runs in (``--dtype``), by the names a cache records for them.
BY_NAME = {dtype_name(d): d for d in DTYPES.values()}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise SemrouteError(f"--dtype {name!r} is not supported; use bfloat16, float16 or float32") from None


def cache_dtype(name, location, key: str, names: dict | None = None):
    """The dtype that the attribute ``key`` of the cache at ``location`` names: ``names[name]`` (default:
    ``BY_NAME``; a latent cache's own table maps its names to numpy dtypes)."""
    names = BY_NAME if names is None else names
    dtype = names.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CacheDamaged(f"{location}/zarr.json: {key} is {name!r}, not a dtype semroute writes there "
                           f"({', '.join(names)}): the cache's attributes are damaged; restore the cache from a "
                           "copy or encode it again")
    return dtype
