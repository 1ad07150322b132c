"""``semroute verify``: every byte a reader relies on, checked, each problem named with its file and fix.

What is checked, for both kinds of cache:

- ``zarr.json`` (the attributes): parses, is a semroute cache of a known version, and (sealed caches)
  matches the sha256 recorded when the cache was finished;
- every sharded array (text features and fp8 scales; each latent bucket's arrays and status): every inner
  chunk's crc32c and every shard index, shard by shard, and its done flag (each flag chunk read on its
  own, so a damaged flag names its shard);
- the small arrays read whole (offsets, the null caption): zarr's checksums and the sealed sha256, so a
  deleted chunk (which zarr would read as zeros) is found;
- ``index.parquet``: its sealed sha256, and its content against the arrays (row counts, offsets and token
  counts, bucket names and rows, ids present and unique);
- the completion mark.

Nothing here raises for a damaged cache: every finding becomes a line of the report. Caches finished
before seals existed are checked for everything but the seal, and the report says so.
"""

from __future__ import annotations

import json

import numpy as np

from semroute.shared import integrity
from semroute.shared.errors import SemrouteError
from semroute.shared.latent_store import LATENT_KIND, Bucket, latent_array_geometry
from semroute.shared.store import (ATTR_KEY, NOT_COMPLETED, READ_VERSIONS, open_group, read_index, store_file,
                                   verify_array)
from semroute.shared.text_store import BAD_RECORDS_FILE, TEXT_KIND, text_array_geometry

REENCODE = "re-encode the cache (encode-... --overwrite)"


class Report:
    def __init__(self, path: str, command: str):
        self.path = path
        self.command = command  # encode-text or encode-images
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.checked = 0

    def bad(self, where: str, what: str, fix: str) -> None:
        self.problems.append(f"{where}: {what}; {fix}")

    @property
    def rewrite(self) -> str:
        return f"delete it, then `semroute {self.command} ... --resume` rewrites it"


def verify_store(path: str) -> tuple[int, list[str], list[str]]:
    """``(chunks and files checked, problems, notes)`` for the cache at ``path``."""
    path = str(path).rstrip("/")
    attrs, report = _read_attrs(path)
    if attrs is None:
        return report.checked, report.problems, report.notes
    group = open_group(path)
    if attrs.get("kind") == TEXT_KIND:
        report.command = "encode-text"
        _verify_text(path, group, attrs, report)
    else:
        report.command = "encode-images"
        _verify_latent(path, group, attrs, report)
    _left_out_lists(path, report)
    if not attrs.get("complete"):
        report.bad(path, "not marked complete (the encoding run stopped early)",
                   f"finish it with `semroute {report.command} ... --resume`")
    return report.checked, report.problems, report.notes


# -- attributes -----------------------------------------------------------------------------------
def _read_attrs(path: str) -> tuple[dict | None, Report]:
    report = Report(path, "encode-...")
    meta = f"{path}/zarr.json"
    try:
        with store_file(path, "zarr.json") as fh:
            doc = json.loads(fh.read())
        attrs = (doc.get("attributes") or {}).get(ATTR_KEY)
    except FileNotFoundError:
        report.bad(meta, "missing: this is not a cache (or its metadata was deleted)", REENCODE)
        return None, report
    except (ValueError, UnicodeDecodeError, AttributeError, OSError) as err:
        report.bad(meta, f"damaged ({type(err).__name__}: {err})", REENCODE)
        return None, report
    report.checked += 1
    if not isinstance(attrs, dict):
        report.bad(meta, f"no '{ATTR_KEY}' attributes: not a semroute cache", REENCODE)
        return None, report
    if attrs.get("format_version") not in READ_VERSIONS:
        report.bad(meta, f"format version {attrs.get('format_version')!r}, this semroute reads "
                         f"{', '.join(map(str, READ_VERSIONS))}", REENCODE)
        return None, report
    if attrs.get("kind") not in (TEXT_KIND, LATENT_KIND):
        report.bad(meta, f"unknown cache kind {attrs.get('kind')!r}", REENCODE)
        return None, report
    try:
        integrity.check_attrs(path, attrs)
    except SemrouteError:
        report.bad(meta, "the attributes differ from those the cache was written with (sha256 mismatch: edited "
                         "or damaged)", REENCODE)
    if integrity.sealed(attrs) is None and attrs.get("complete"):
        report.notes.append("finished by an older semroute (no integrity record): index.parquet, the attributes "
                            "and the small arrays are checked for consistency only, not against a sha256")
    return attrs, report


# -- arrays ---------------------------------------------------------------------------------------
def _flags(path: str, group, name: str, n_shards: int, report: Report) -> np.ndarray:
    """The done flag of every shard, each read alone: a damaged flag is reported and counts as not done."""
    done = np.zeros(n_shards, dtype=bool)
    try:
        arr = group[f"progress/{name}"]
    except Exception as err:  # noqa: BLE001
        report.bad(f"{path}/progress/{name}", f"unreadable ({type(err).__name__}: {err})", REENCODE)
        return done
    for shard in range(n_shards):
        try:
            done[shard] = bool(arr[shard])
        except Exception as err:  # noqa: BLE001 - zarr: checksum mismatch, truncated chunk, ...
            report.bad(f"{path}/progress/{name}/c/{shard}", f"damaged done flag ({type(err).__name__}: {err})",
                       report.rewrite)
        report.checked += 1
    return done


def _sharded(path: str, name: str, done: np.ndarray, report: Report, expect: tuple | None = None) -> None:
    try:
        checked, problems = verify_array(path, name, done, expect)
    except SemrouteError as err:  # the message without its file (given apart) and `verify` hint
        where = f"{path}/{name}/zarr.json"
        report.bad(where, str(err).split("; run `semroute verify")[0].removeprefix(f"{where} "), REENCODE)
        return
    except Exception as err:  # noqa: BLE001
        report.bad(f"{path}/{name}/zarr.json", f"missing or damaged ({type(err).__name__}: {err})", REENCODE)
        return
    report.checked += checked
    for where, what in problems:
        fix = f"`semroute {report.command} ... --resume` writes it" if what == NOT_COMPLETED else report.rewrite
        report.bad(where, what, fix)


def _small(path: str, group, name: str, attrs: dict, report: Report, fix: str) -> np.ndarray | None:
    try:
        data = integrity.read_small_array(path, group, name, attrs)
    except SemrouteError as err:
        report.bad(f"{path}/{name}", str(err).split("; run `semroute verify")[0].removeprefix(f"{path}/{name} "), fix)
        return None
    report.checked += 1
    return data


def _index(path: str, attrs: dict, report: Report, columns: list[str]):
    try:
        table = read_index(path, attrs, columns=columns)
    except SemrouteError as err:
        report.bad(f"{path}/{integrity.INDEX}", str(err).removeprefix(f"{path}/{integrity.INDEX} ")
                   .removesuffix("; re-encode the cache"), REENCODE)
        return None
    report.checked += 1
    return table


def _has(group, name: str) -> bool:
    try:
        return name in group
    except Exception:  # noqa: BLE001 - a damaged zarr.json below: the array is there, read_small_array says how
        return True


def _geometry(expect, report: Report) -> tuple | None:
    """``expect()``: an array's geometry from the attributes, or None (a note) where they do not give it."""
    try:
        return expect()
    except (KeyError, TypeError, ValueError, AttributeError, SemrouteError) as err:
        report.notes.append(f"the attributes do not give an array's shape ({type(err).__name__}: {err}); its "
                            "zarr.json was not checked against them")
        return None


# -- text caches ----------------------------------------------------------------------------------
def _left_out_lists(path: str, report: Report) -> None:
    """The lists of records left out (``bad_records.jsonl`` of a text cache, ``skipped.jsonl`` of a latent
    cache): an ``--append`` reads them back to add its own, so a damaged line is a problem named here."""
    from pathlib import Path

    from semroute.shared.errors import CacheDamaged
    from semroute.shared.latent_store import read_skipped
    from semroute.shared.manifest import read_problem_report
    from semroute.shared.remote import is_url

    try:
        if report.command == "encode-images":
            read_skipped(path)
        elif not is_url(path):  # (written for local caches only)
            read_problem_report(Path(path) / BAD_RECORDS_FILE)
    except CacheDamaged as err:
        report.problems.append(str(err))


def _verify_text(path: str, group, attrs: dict, report: Report) -> None:
    names = ["features", "scales"] if attrs.get("storage") == "fp8" else ["features"]
    n_shards = None
    for name in names:
        try:
            n_shards = int(group[f"progress/{name}"].shape[0])
        except Exception:  # noqa: BLE001 - reported by _flags
            n_shards = 0
        done = _flags(path, group, name, n_shards, report)
        _sharded(path, name, done, report, _geometry(lambda: text_array_geometry(attrs, path)[name], report))
    null_fix = "delete the null_features folder, then `semroute encode-text ... --resume` writes it again"
    for name in ["null_features"] + (["null_scales"] if attrs.get("storage") == "fp8" else []):
        if not _has(group, name):
            report.bad(f"{path}/{name}", "missing (the run did not finish)", null_fix)
        else:
            _small(path, group, name, attrs, report, null_fix)
    offsets = _small(path, group, "offsets", attrs, report, REENCODE)
    appended = _has(group, "lengths")  # format 2: segments start at shard boundaries, lengths stored
    lengths = _small(path, group, "lengths", attrs, report, REENCODE) if appended else None
    index = _index(path, attrs, report, ["sample_id", "start", "n_tokens"])
    where = f"{path}/{integrity.INDEX}"
    if offsets is not None and (lengths is not None or not appended):
        offsets = offsets.astype(np.int64)
        lengths = np.diff(offsets) if lengths is None else lengths.astype(np.int64)
        total, rows = attrs.get("total_tokens"), (attrs.get("layout") or {}).get("rows", attrs.get("total_tokens"))
        if len(offsets) != attrs.get("n_captions", -1) + 1 or len(lengths) != len(offsets) - 1 or offsets[0] != 0 \
                or np.any(lengths <= 0) or np.any(offsets[:-1] + lengths > offsets[1:]) or lengths.sum() != total \
                or offsets[-1] != rows:
            report.bad(f"{path}/offsets", f"not the offsets of {attrs.get('n_captions')} captions and {total} "
                                          "tokens", REENCODE)
            offsets = None
    else:
        offsets = None
    if index is not None:
        if index.num_rows != attrs.get("n_captions"):
            report.bad(where, f"{index.num_rows} rows, the cache holds {attrs.get('n_captions')} captions", REENCODE)
        elif offsets is not None and (not np.array_equal(index.column("start").to_numpy(), offsets[:-1])
                                      or not np.array_equal(index.column("n_tokens").to_numpy(), lengths)):
            report.bad(where, "caption starts or token counts differ from offsets", REENCODE)
        if index.column("sample_id").null_count:
            report.bad(where, "captions without a sample id", REENCODE)


# -- latent caches --------------------------------------------------------------------------------
def _verify_latent(path: str, group, attrs: dict, report: Report) -> None:
    try:
        buckets = [Bucket.from_attrs(b) for b in attrs["buckets"]]
        arrays = list(attrs["arrays"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        report.bad(f"{path}/zarr.json", f"the bucket list is damaged ({type(err).__name__}: {err})", REENCODE)
        return
    for b in buckets:
        n_shards = b.layout.n_shards
        done = _flags(path, group, b.name, n_shards, report)
        for name in [*arrays, "status"]:
            _sharded(path, f"buckets/{b.name}/{name}", done, report,
                     _geometry(lambda: latent_array_geometry(attrs, b, name, path), report))
    index = _index(path, attrs, report, ["sample_id", "bucket", "row", "status"])
    if index is None:
        return
    where = f"{path}/{integrity.INDEX}"
    if index.num_rows != attrs.get("n_records"):
        report.bad(where, f"{index.num_rows} rows, the attributes say {attrs.get('n_records')}", REENCODE)
    rows_of = {b.name: b.rows for b in buckets}
    names = index.column("bucket").to_pylist()
    rows = index.column("row").to_pylist()
    status = index.column("status").to_pylist()
    seen: dict[str, set] = {b.name: set() for b in buckets}
    for i, (name, row, st) in enumerate(zip(names, rows, status)):
        if name is None:
            continue
        if name not in rows_of or row is None or not 0 <= row < rows_of[name] or row in seen[name]:
            report.bad(where, f"record {i} points at bucket {name!r} row {row}, which its arrays do not hold "
                              "(or another record holds)", REENCODE)
            return
        seen[name].add(row)
    for b in buckets:
        # an appended cache has unused rows before each appended part (no record names them)
        if len(seen[b.name]) > b.rows if attrs.get("segments") else len(seen[b.name]) != b.rows:
            report.bad(where, f"{len(seen[b.name])} records in bucket {b.name}, its arrays hold {b.rows}", REENCODE)
    ids = index.column("sample_id").to_pylist()
    if None in ids or len(set(ids)) != len(ids):
        report.bad(where, "sample ids missing or repeated", REENCODE)
    if attrs.get("complete") and "ok" not in status:
        report.bad(where, "no image encoded ok", REENCODE)
