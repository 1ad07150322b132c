"""Dtype names (shared/dtypes.py): ``--dtype`` spellings, the names caches record, and a damaged name in a cache's
attributes reported as such, naming the cache."""

from __future__ import annotations

import re

import pytest
import torch

from semroute.shared import dtypes
from semroute.shared.errors import CacheDamaged, SemrouteError


def test_dtype_names_round_trip():
    for spelling, dtype in dtypes.DTYPES.items():
        assert dtypes.parse_dtype(spelling.upper()) is dtype
        assert dtypes.cache_dtype(dtypes.dtype_name(dtype), "c.zarr", "k") is dtype
    assert dtypes.dtype_name(torch.float8_e4m3fn) == "float8_e4m3fn"
    with pytest.raises(SemrouteError, match="--dtype 'int8' is not supported"):
        dtypes.parse_dtype("int8")


@pytest.mark.parametrize("name", ["abs", "float", "float64", "Tensor", "", None, 3])
def test_a_name_semroute_never_writes_is_damage_named_with_the_cache(name):
    """Not looked up on ``torch``, where "abs" is a function, "Tensor" a class and "float64" a dtype no cache has."""
    with pytest.raises(CacheDamaged, match=r"^s3://b/c\.text\.zarr/zarr\.json: fingerprint\.compute_dtype is "
                                           f"{re.escape(repr(name))}, not a dtype semroute writes"):
        dtypes.cache_dtype(name, "s3://b/c.text.zarr", "fingerprint.compute_dtype")
