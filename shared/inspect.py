"""``info`` and ``verify``: describe and check caches without loading any model.

Each kind of store has a describer (beside its writer and reader), keyed by its ``kind`` attribute (the
table at the end); ``verify`` is ``shared/verify.py``.
Run folders are stage two's (``stage2_train/run_info.py``); the CLI sends them there.
"""

from __future__ import annotations

from typing import Callable

from semroute.shared.errors import CacheDamaged, SemrouteError
from semroute.shared.integrity import INDEX, verify_hint
from semroute.shared.latent_store import LATENT_KIND, describe_latent_cache
from semroute.shared.store import file_exists, interrupted_create, read_attrs
from semroute.shared.text_store import TEXT_KIND, describe_text_cache


def describe(path: str) -> dict:
    """A dict describing whatever cache ``path`` is: a text cache or a latent cache."""
    attrs = read_attrs(path)
    kind = attrs.get("kind")
    if kind not in DESCRIBERS:
        raise SemrouteError(f"{path}: unknown cache kind {kind!r}")
    try:
        info = DESCRIBERS[kind](path, attrs)
    except SemrouteError:
        raise
    except Exception as err:  # noqa: BLE001 - zarr/pyarrow errors of a damaged file name neither store nor file
        raise CacheDamaged(f"{path}: a file of the cache is damaged ({type(err).__name__}: {err}); run "
                           f"`semroute verify {path}` to find it") from None
    missing = missing_index(path, kind)
    if missing:  # the describers read the attributes only: without its index no reader opens the cache
        at = list(info).index("complete") + 1
        items = [*info.items()]
        info = dict([*items[:at], ("index", missing), *items[at:]], complete=False)
    return info


def missing_index(path: str, kind: str) -> str | None:
    """What to do about a cache without ``index.parquet`` (None when it has one): a create cut short before
    writing it (``store.interrupted_create``) is resumed, any other such cache is damaged."""
    if file_exists(path, INDEX):
        return None
    if interrupted_create(path, kind):
        return f"{INDEX} not written yet: the encode that creates the cache was cut short; run it again with --resume"
    return f"{INDEX} is missing, so the cache cannot be read; re-encode it (encode-... --overwrite); {verify_hint(path)}"


def verify(path: str) -> tuple[int, list[str], list[str]]:
    """Check a cache; returns (chunks and files checked, problems naming files and fixes, notes). See
    shared/verify.py for what is covered; nothing there raises for a damaged cache."""
    from semroute.shared.verify import verify_store

    return verify_store(path)


DESCRIBERS: dict[str, Callable[[str, dict], dict]] = {TEXT_KIND: describe_text_cache,
                                                       LATENT_KIND: describe_latent_cache}
__all__ = ["describe", "verify", "DESCRIBERS"]
