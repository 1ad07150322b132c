"""Content checksums beyond zarr's chunk crc32c: the index, the small arrays and the attributes.

zarr's crc32c covers the bytes of every chunk that exists, but not the rest of what a reader relies on:

- a deleted chunk of a plain (unsharded) array reads as the fill value (zeros): a deleted ``offsets``
  chunk makes every caption 0 tokens, a deleted ``null_features`` chunk makes the null caption zeros;
- ``index.parquet`` has no checksum that pyarrow checks by default: a flipped ``sample_id`` or ``row``
  re-pairs captions and images;
- the attributes in ``zarr.json`` (scaling factor, layer list, ...) are plain JSON.

When a store is finished its writer calls :func:`store.seal`, which records, in the store's own attributes
under ``integrity``: the sha256 of ``index.parquet``, of each small array's bytes, and of the other
attributes. Every reader checks what it reads against the seal (:func:`check_attrs`,
:func:`store.read_index`, :func:`read_small_array`) and ``verify`` checks all of it. A mismatch is a
:class:`CacheDamaged` error naming the file, never silent use. Stores finished before seals existed
have no ``integrity`` entry: they open as before (the format version is unchanged) and ``verify`` says
that these parts are not covered.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from semroute.shared.errors import CacheDamaged

SEAL_KEY = "integrity"
INDEX = "index.parquet"


def attrs_sha256(attrs: dict) -> str:
    semantic = {k: v for k, v in attrs.items() if k != SEAL_KEY}
    return hashlib.sha256(json.dumps(semantic, sort_keys=True, default=str).encode()).hexdigest()


def array_sha256(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def verify_hint(location) -> str:
    return f"run `semroute verify {location}` for the full list of damage"


def sealed(attrs: dict) -> dict | None:
    """The seal of a finished store (None while a store is written or grown: ``complete`` is then false and
    the seal, if any, is the previous one's, renewed by the next finish)."""
    record = attrs.get(SEAL_KEY)
    return record if isinstance(record, dict) and attrs.get("complete") else None


def check_attrs(location, attrs: dict) -> None:
    record = sealed(attrs)
    if record is not None and record.get("attrs_sha256") != attrs_sha256(attrs):
        raise CacheDamaged(f"{location}/zarr.json: the cache's attributes differ from those it was written with "
                           "(sha256 mismatch: edited or damaged); re-encode the cache")


def read_small_array(location, group, name: str, attrs: dict) -> np.ndarray:
    """A plain array read whole, its chunks' crc32c checked by zarr and its content by the seal."""
    from semroute.shared.remote import call, is_url, transient

    def read() -> np.ndarray:
        try:
            return np.asarray(group[name][...])
        except KeyError:
            raise CacheDamaged(f"{location}/{name} is missing; {verify_hint(location)}") from None
        except Exception as err:  # noqa: BLE001 - zarr raises ValueError/OSError/... for damaged chunks or metadata
            if is_url(location) and transient(err):
                raise  # the network, not the cache: retried by ``call``, then named as unreachable
            raise CacheDamaged(f"{location}/{name} is damaged ({type(err).__name__}: {err}); {verify_hint(location)}"
                               ) from None

    data = call(f"{str(location).rstrip('/')}/{name}", read) if is_url(location) else read()
    want = (sealed(attrs) or {}).get("arrays_sha256", {}).get(name)
    if want is not None and array_sha256(data) != want:
        raise CacheDamaged(f"{location}/{name} differs from what was written (sha256 mismatch: a chunk file is "
                           f"missing or altered); {verify_hint(location)}")
    return data
