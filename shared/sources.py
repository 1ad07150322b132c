"""Data inputs for both encoders: every kind of DATA becomes the same list of records.

Kinds (``detect_kind`` picks one from the name; ``kind=`` forces it):

- ``manifest``: a JSON array or JSONL file (``shared/manifest.py``, unchanged).
- ``folder``: a folder of images, searched recursively, each with a same-named ``.txt`` caption
  (``a/b/cat.jpg`` + ``a/b/cat.txt``). Sample id: the image's path relative to the folder, without
  its extension (``a/b/cat``).
- ``parquet`` / ``csv``: one row per sample; ``--image-key`` names a column of paths, of image bytes,
  or of ``{bytes, path}`` structs (Hugging Face ``datasets`` Image columns; one whose bytes are null names
  a file by its path, taken as a path column's value is); ``--text-key`` a string or
  list-of-strings column; ``--id-key`` the optional id column (else the row's position over all files): text
  as written (a CSV's ``001`` stays ``001``) or integers; a float column (ids like ``1.0``, ``nan``) is refused.
- ``webdataset``: tar shards of ``{key}.jpg|png|webp...`` + ``{key}.txt|json`` members, local paths or
  fsspec URLs, with brace ranges (``data-{000000..000127}.tar``). Sample id: the member key. A shard made
  with ``cat a.tar b.tar`` is read to its end.

Several files of one kind: a brace range, a ``::``-separated list (as webdataset writes them), or a
folder holding only ``.tar`` / ``.parquet`` files.

Images inside containers (tar members, Parquet bytes) are named by a *locator* ``CONTAINER::MEMBER``
(``data-000003.tar::cat.jpg``, ``part-0.parquet::image[17]``) and read through :func:`read_image_bytes`;
the bytes then go through the same decode path as files (``shared/images.py``). Tar members carry
their byte range, so a DataLoader worker reads one image with one ranged read.

A bad row of a table (an empty or null caption or id, no image) is an error naming file, row and column, as a
bad manifest record is; with ``skip_bad`` it is reported and left out.

Bad members of folders and shards (an image without a caption, a caption that is not UTF-8, a caption file without an
image, an unreadable shard, one cut short or with a damaged header: named with the byte where it stops)
are reported with shard and key and left out, as bad images are: a large dataset always has a few. A
duplicate sample id is an error naming both places it comes from (with ``skip_bad`` the second one is left
out and reported); so are two members for one part of a sample in a shard (``cat.jpg`` twice), naming both
members (with ``skip_bad`` the sample is left out and reported).
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from semroute.shared.checks import loads_json
from semroute.shared.errors import ManifestError, SemrouteError
from semroute.shared.manifest import Manifest, Problem, Record, _captions, check_record_text, printable, read_manifest
from semroute.shared.remote import is_url

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
KINDS = ("auto", "manifest", "folder", "parquet", "csv", "webdataset")
MEMBER_SEP = "::"


# ---------------------------------------------------------------------------------------------
# Which kind, which files
# ---------------------------------------------------------------------------------------------
# The most names one DATA may expand to. Datasets hold up to a few hundred thousand shards (billions of samples at
# ten thousand a shard); a million names take about 100 MB and two seconds to list. A range with a digit too many
# (data-{0..99999999}.tar) is refused with this instead of filling gigabytes before the first shard is looked at.
MAX_EXPANDED = 1_000_000


def expand(data: str) -> list[str]:
    """``a-{000..002}.tar::b.tar`` -> ``[a-000.tar, a-001.tar, a-002.tar, b.tar]`` (webdataset's own expansion),
    counted first: at most :data:`MAX_EXPANDED` names."""
    if "{" not in str(data) and "::" not in str(data):
        return [str(data)]  # nothing to expand, and no webdataset needed (the GPU image lacks it)
    from braceexpand import UnbalancedBracesError
    from webdataset.shardlists import envsubst, expand_urls

    try:
        count = 0
        for url in str(data).split("::"):  # what expand_urls expands: each part, its ${VAR}s (WDS_VAR) substituted
            for _ in range(10):
                url, last = envsubst(url), url
                if url == last:
                    break
            count += _expansion_size(url)
        if count > MAX_EXPANDED:
            raise SemrouteError(f"{data}: its braces expand to {count:,} names, more than the {MAX_EXPANDED:,} "
                                "one DATA may have (a range with a digit too many?); check the pattern, or "
                                "encode the data in parts (--append)")
        return list(expand_urls(str(data)))
    except UnbalancedBracesError:  # webdataset expands braces with the braceexpand package
        raise SemrouteError(f"{data}: its braces do not pair up (a range is written like data-{{000000..000127}}.tar)"
                            ) from None


def _expansion_size(pattern: str) -> int:
    """How many names ``braceexpand(pattern)`` gives, counted without making them: its generator is not lazy
    (``itertools.product`` first turns every range into a tuple of all its names). Parses as its
    ``parse_pattern`` / ``parse_sequence`` / ``parse_expression`` do, backslash escapes included."""
    from braceexpand import UnbalancedBracesError, char_range_re, int_range_re, make_char_range

    def pattern_size(p: str) -> int:
        size, start, depth, pos = 1, 0, 0, 0
        while pos < len(p):
            if p[pos] == "\\":
                pos += 2
                continue
            if p[pos] == "{":
                if depth == 0:
                    start = pos
                depth += 1
            elif p[pos] == "}":
                depth -= 1
                if depth == 0:
                    size *= expression_size(p[start + 1:pos])
            pos += 1
        if depth != 0:
            raise UnbalancedBracesError(f"Unbalanced braces: '{p}'")
        return size

    def expression_size(expr: str) -> int:
        if m := int_range_re.match(expr):
            first, last, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1) or 1
            return len(range(first, last + 1, step) if first < last else range(first, last - 1, -step))
        if m := char_range_re.match(expr):
            return len(make_char_range(*m.groups()))
        items, start, depth, pos = [], 0, 0, 0  # a sequence {a,b,...}: the sum of its items
        while pos < len(expr):
            if expr[pos] == "\\":
                pos += 2
                continue
            if expr[pos] == "{":
                depth += 1
            elif expr[pos] == "}":
                depth -= 1
            elif expr[pos] == "," and depth == 0:
                items.append(expr[start:pos])
                start = pos + 1
            pos += 1
        if depth != 0 or not items:
            return pattern_size(expr)  # neither: braces kept as written around what the inside expands to
        return sum(pattern_size(item) for item in items + [expr[start:]])

    return pattern_size(pattern)


def require_local_inputs(data: str | os.PathLike, storage_options: dict | None = None) -> None:
    """Name a local input that is not there, a URL no installed client reads, or a manifest URL, before anything
    slow starts (an encoder loads its model first). Of URLs, the first is asked for (one request): an endpoint
    that cannot be reached, a missing bucket or object, missing credentials are named then, not after the load."""
    from semroute.shared.remote import call, filesystem, unknown_protocol

    first_url = None
    for f in expand(str(data)):
        if is_url(f):
            if unknown := unknown_protocol(f):
                raise unknown
            if _suffix_kind(f) == "manifest":
                raise manifest_url(f)
            first_url = first_url or f
        elif not Path(f).exists():
            raise SemrouteError(f"cannot read {f}: no such file or folder")
    if first_url is not None:
        fs, path = filesystem(first_url, storage_options or None)
        call(first_url, fs.info, path, missing=f"cannot read {first_url}: there is no such object; check the URL")


def manifest_url(url: str) -> SemrouteError:
    """The error for a manifest given as a URL: ``read_manifest`` (shared/manifest.py) reads a local file."""
    return SemrouteError(f"{url}: a JSON/JSONL manifest is read from a local file, not a URL; copy it here first "
                         "(aws s3 cp, gsutil cp ...), or give the data as Parquet/CSV tables or WebDataset shards, "
                         "which are read from URLs")


def _suffix_kind(name: str) -> str | None:
    name = name.lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith((".json", ".jsonl", ".ndjson")):
        return "manifest"
    return None


def _folder_files(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))


def detect_kind(data: str) -> tuple[str, list[str]]:
    """The kind of ``data`` and the files it names (one folder for ``folder``)."""
    data = str(data)
    files = expand(data)
    if len(files) == 1 and not is_url(files[0]) and Path(files[0]).is_dir():
        folder = Path(files[0])
        tars = _folder_files(folder, (".tar", ".tar.gz", ".tgz"))
        tables = _folder_files(folder, (".parquet",))
        if tars and not tables:
            return "webdataset", tars
        if tables and not tars:
            return "parquet", tables
        return "folder", [str(folder)]
    kinds = {_suffix_kind(f) for f in files}
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop(), files
    if len(files) == 1 and not is_url(files[0]) and Path(files[0]).is_file():
        return "manifest", files  # a manifest under another name, as before
    raise SemrouteError(
        f"cannot tell what kind of data {data} is (expected a .json/.jsonl manifest, a folder of images with "
        ".txt captions, .parquet/.csv tables or .tar WebDataset shards); pass --input-format to say which"
    )


# ---------------------------------------------------------------------------------------------
# Reading image bytes by locator
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRange:
    """Where a tar member's bytes lie in its shard."""

    offset: int
    size: int


def split_locator(locator: str) -> tuple[str, str | None]:
    """``shard.tar::key.jpg`` -> ``(shard.tar, key.jpg)``; a plain path -> ``(path, None)``."""
    container, sep, member = locator.rpartition(MEMBER_SEP)
    if not sep or _suffix_kind(container) not in ("webdataset", "parquet"):
        return locator, None
    return container, member


def _open_binary(location: str, storage_options: dict | None = None):
    """A local file or a URL (options: ``storage_options`` or those set by ``--storage-options``)."""
    if is_url(location):
        from semroute.shared.remote import call, filesystem

        fs, path = filesystem(location, storage_options or None)
        return call(location, fs.open, path, "rb", missing=f"cannot read {location}: there is no such object; check "
                                                          "the URL")
    return open(location, "rb")


class _ParquetCells:
    """Image bytes of Parquet rows, one row group cached (decoding walks rows in order)."""

    def __init__(self):
        self._files: OrderedDict[str, object] = OrderedDict()
        self._group: tuple[str, str, int, list] | None = None

    def get(self, path: str, column: str, row: int, storage_options: dict | None) -> bytes:
        import numpy as np
        import pyarrow.parquet as pq

        pf = self._files.get(path)
        if pf is None:
            pf = pq.ParquetFile(_open_binary(path, storage_options))
            self._files[path] = pf
            if len(self._files) > 8:
                self._files.popitem(last=False)
        meta = pf.metadata
        starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        group = int(np.searchsorted(starts, row, side="right") - 1)
        if self._group is None or self._group[:3] != (path, column, group):
            values = pf.read_row_group(group, columns=[column]).column(0).to_pylist()
            self._group = (path, column, group, values)
        value = self._group[3][row - int(starts[group])]
        return value["bytes"] if isinstance(value, dict) else value


_CELLS = _ParquetCells()


def read_image_bytes(locator: str, image_range: ImageRange | None = None,
                     storage_options: dict | None = None) -> bytes | None:
    """The bytes of an image inside a container, or None for a plain file (opened by path as before).

    Raises OSError (or ValueError for a malformed locator) when the container cannot be read.
    """
    container, member = split_locator(locator)
    if member is None:
        return None
    if _suffix_kind(container) == "parquet":
        column, _, rest = member.rpartition("[")
        if not column or not rest.endswith("]"):
            raise ValueError(f"bad Parquet cell locator {locator!r} (expected FILE::COLUMN[ROW])")
        return _CELLS.get(container, column, int(rest[:-1]), storage_options)
    if image_range is None:
        raise ValueError(f"{locator}: the byte range of the tar member is not known")
    if is_url(container):
        from semroute.shared.remote import RemoteFile

        data = RemoteFile(container).read(image_range.offset, image_range.offset + image_range.size)
    else:
        with open(container, "rb") as fh:
            data = os.pread(fh.fileno(), image_range.size, image_range.offset)
    if len(data) != image_range.size:
        raise OSError(f"{container} ends inside member {member} (truncated shard)")
    return data


# ---------------------------------------------------------------------------------------------
# The readers
# ---------------------------------------------------------------------------------------------
@dataclass
class Source(Manifest):
    """What every reader returns: ``records`` (image = a path or a locator), ``problems``, and for tar
    members the byte range of each record's image (``ranges[k]`` for ``records[k]``, else None)."""

    kind: str = "manifest"
    ranges: list | None = None

    def image_range(self, k: int) -> ImageRange | None:
        return self.ranges[k] if self.ranges else None


class _Collector:
    """Builds records, checking ids; problems name the shard (or file) and key (or row)."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.records: list[Record] = []
        self.ranges: list[ImageRange | None] = []
        self.problems: list[Problem] = []
        self.seen: dict[str, str] = {}

    def bad(self, where: str, line: int, reason: str, key: str | None = None) -> None:
        """A bad member of a folder or shard: always reported and left out (as a bad image is)."""
        self.problems.append(Problem(printable(where), line, reason if key is None else f"key {key!r}: {reason}"))

    def refuse(self, where: str, line: int, reason: str) -> None:
        """A bad record, as a manifest's is (shared/manifest.py ``read_manifest``): an error naming where it is,
        or with ``skip_bad`` reported and left out."""
        if not self.skip_bad:
            raise ManifestError(f"{printable(where)}: {reason} (or pass --skip-bad to leave it out)") from None
        self.problems.append(Problem(printable(where), line, reason))

    def add(self, record: Record, where: str, image_range: ImageRange | None = None) -> None:
        try:  # an id, caption or path the cache cannot store (a name that is not UTF-8)
            check_record_text(record.sample_id, record.texts, record.image)
        except ManifestError as err:
            self.refuse(where, record.line, str(err))
            return
        first = self.seen.get(record.sample_id)
        if first is not None:
            msg = f"duplicate sample id {record.sample_id!r}: in {first} and in {where}"
            if not self.skip_bad:
                raise ManifestError(msg + " (ids must be unique so the text and latent caches join; pass --skip-bad "
                                          "to keep the first and leave the rest out)")
            self.problems.append(Problem(where, record.line, msg))
            return
        self.seen[record.sample_id] = where
        self.records.append(record)
        self.ranges.append(image_range)

    def result(self, path: str, kind: str, content_sha256: str | None = None) -> Source:
        """``content_sha256``: given when ids are row positions (see :meth:`Manifest.id_source`)."""
        if not self.records:
            detail = f" ({len(self.problems)} bad records, first: {self.problems[0]})" if self.problems else ""
            raise ManifestError(f"{path}: no usable records{detail}")
        ranges = self.ranges if any(r is not None for r in self.ranges) else None
        return Source(path=path, records=self.records, problems=self.problems, kind=kind, ranges=ranges,
                      positional_ids=content_sha256 is not None, content_sha256=content_sha256)


def _caption_text(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise ManifestError(f"caption is not UTF-8 ({err.reason} at byte {err.start})") from None
    if not text:
        raise ManifestError("caption is empty")
    return text


def read_folder(folder: str, *, need_text: bool, need_image: bool, skip_bad: bool) -> Source:
    root = Path(folder)
    out = _Collector(skip_bad)
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    stems = {}
    for p in images:
        rel = p.relative_to(root).with_suffix("").as_posix()
        if rel in stems:
            # Two images with one stem (cat.jpg, cat.png) share one caption file: ambiguous.
            out.bad(str(p), 0, f"another image has the same name ({stems[rel].name}); its caption would be ambiguous")
            continue
        stems[rel] = p
    if need_text:
        orphans = sorted(p for p in root.rglob("*.txt") if p.relative_to(root).with_suffix("").as_posix() not in stems)
        for p in orphans:
            out.bad(str(p), 0, "caption file without an image of the same name")
    for n, (sample_id, path) in enumerate(sorted(stems.items())):
        texts: tuple[str, ...] = ()
        if need_text:
            caption = path.with_suffix(".txt")
            try:
                texts = (_caption_text(caption.read_bytes(), str(caption)),)
            except FileNotFoundError:
                out.bad(str(path), 0, f"no caption file {caption.name} next to the image")
                continue
            except OSError as err:  # a folder named like a caption, no permission: a bad member as any other
                out.bad(str(caption), 0, f"cannot read the caption file: {err.strerror or err}")
                continue
            except ManifestError as err:
                out.bad(str(caption), 0, str(err))
                continue
        out.add(Record(sample_id=sample_id, line=n + 1, texts=texts, image=str(path) if need_image else None),
                str(path))
    return out.result(str(folder), "folder")


def _tar_members(shard: str, storage_options: dict | None):
    """Yield webdataset-style ``{"fname", "data"}`` dicts for every regular member of a tar shard:
    ``data`` is the bytes for captions and an :class:`ImageRange` for images.

    Python's ``tarfile`` (not webdataset's streaming reader) lists the shard, because it gives each
    member's byte offset: the decoding workers then read single images with one ranged read instead
    of streaming whole shards again. It reads on past tar's end-of-archive block (``ignore_zeros``, as
    ``tar -i`` does): a shard made with ``cat a.tar b.tar`` holds a second archive there, which would
    otherwise be left unread without a word. What it skips must be zeros (:func:`_check_gap`), so a damaged
    header is still named, not stepped over.
    """
    with _open_binary(shard, storage_options) as fh, \
            tarfile.open(fileobj=fh, mode="r:*", ignore_zeros=True) as tf:
        compressed = tf.fileobj is not fh
        end = 0  # where the next header belongs: the end of the last member's data
        while True:
            try:
                info = tf.next()
            except tarfile.ReadError:
                _check_gap(tf, end, tf.offset, compressed)  # a damaged header it stepped over is the cause
                raise
            _check_gap(tf, end, tf.offset if info is None else info.offset, compressed)
            if info is None:
                break
            end = tf.offset
            if not info.isfile():
                continue
            ext = info.name.rpartition(".")[2].lower()
            if ext in IMAGE_EXTENSIONS:
                yield {"fname": info.name, "data": ImageRange(info.offset_data, info.size)}
            elif ext in ("txt", "json"):
                yield {"fname": info.name, "data": tf.extractfile(info).read()}
        _check_tar_end(tf, end, compressed)


def _where(offset: int, compressed: bool) -> str:
    return f"byte {offset}" + (" of the decompressed stream" if compressed else "")


def _check_gap(tf: tarfile.TarFile, start: int, stop: int, compressed: bool) -> None:
    """Raise ``tarfile.ReadError`` naming the first block of ``[start, stop)`` that is not zeros: with
    ``ignore_zeros`` ``tarfile`` steps over a damaged header (and the data after it) to the next header
    it can parse, which would drop those members without a word. Zeros there are an end-of-archive
    block and its padding, between the parts of a concatenated tar."""
    tf.fileobj.seek(start)
    pos = start
    while pos < stop:
        chunk = tf.fileobj.read(min(stop - pos, 1 << 20))
        if not chunk:
            return
        if chunk.count(0) != len(chunk):
            bad = pos + (len(chunk) - len(chunk.lstrip(b"\0"))) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE
            raise tarfile.ReadError(f"the member header at {_where(bad, compressed)} is damaged (or what follows is "
                                    "not tar); the members from there on are not read")
        pos += len(chunk)


def _check_tar_end(tf: tarfile.TarFile, end: int, compressed: bool) -> None:
    """Raise ``tarfile.ReadError`` saying where, unless the members ended at tar's end-of-archive block (zeros,
    checked by :func:`_check_gap` up to ``tf.offset``). ``tarfile`` ends its listing quietly at a missing or
    cut header (its ``TarFile.next``), which would drop the rest of a cut shard without a word."""
    tf.fileobj.seek(tf.offset)
    rest = tf.fileobj.read(tarfile.BLOCKSIZE)  # less than a block: a header cut short, or nothing
    if rest.count(0) != len(rest) or (rest and tf.offset == end):
        raise tarfile.ReadError(f"it is cut inside the member header at {_where(tf.offset, compressed)}")
    if tf.offset == end:
        raise tarfile.ReadError(f"it ends at {_where(end, compressed)} without tar's end-of-archive block "
                                "(cut short?)")


def read_webdataset(shards: list[str], *, text_key: str, need_text: bool, need_image: bool, skip_bad: bool,
                    storage_options: dict | None = None) -> Source:
    from webdataset.tariterators import base_plus_ext

    out = _Collector(skip_bad)
    for shard in shards:
        compressed = shard.lower().endswith((".gz", ".tgz"))
        name = shard.rsplit("/", 1)[-1]
        samples: OrderedDict[str, dict] = OrderedDict()
        names: dict[tuple[str, str], str] = {}  # (key, suffix) -> the member's name
        duplicated: dict[str, str] = {}  # key -> why it is left out
        try:
            # Members grouped by key as webdataset groups them (``base_plus_ext``: the key is the name up to
            # its first dot); a key may be split across non-adjacent members, so group over the whole shard.
            for member in _tar_members(shard, storage_options):
                key, suffix = base_plus_ext(member["fname"])
                if key is None:
                    continue
                part = (key, suffix.lower())
                if part in names:  # two members for one part of a sample: which one is meant cannot be told
                    msg = (f"duplicate key {key!r} in {shard}: members {names[part]!r} and {member['fname']!r} are "
                           f"both its .{suffix}")
                    if not skip_bad:
                        raise ManifestError(msg + " (pass --skip-bad to leave the sample out and go on)")
                    duplicated.setdefault(key, msg)
                names.setdefault(part, member["fname"])
                samples.setdefault(key, {})[suffix.lower()] = member["data"]
        except (OSError, tarfile.TarError, EOFError) as err:
            what = "cannot be read" if not samples else f"is damaged after {len(samples)} samples"
            out.bad(shard, 0, f"the shard {what}: {err}")
        for n, (key, sample) in enumerate(samples.items(), start=1):
            if key in duplicated:
                out.bad(shard, n, duplicated[key])
                continue
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if need_image and image_ext is None:
                out.bad(shard, n, "no image member (.jpg/.png/.webp)", key)
                continue
            texts: tuple[str, ...] = ()
            if need_text:
                try:
                    if "txt" in sample:
                        texts = (_caption_text(sample["txt"], shard),)
                    elif "json" in sample:
                        value = loads_json(_caption_text(sample["json"], shard))  # a repeated key is refused
                        if not isinstance(value, dict) or text_key not in value:
                            raise ManifestError(f"{key}.json has no '{text_key}' key")
                        texts = _captions(value[text_key], text_key)
                    else:
                        raise ManifestError("no caption member (.txt or .json)")
                except (ManifestError, ValueError, RecursionError) as err:  # (JSONDecodeError is a ValueError;
                    out.bad(shard, n, str(err), key)  # valid JSON Python refuses: >4300 digits, deep nesting)
                    continue
            if compressed and need_image:
                out.bad(shard, n, "images in a compressed tar cannot be read by byte range; use plain .tar shards", key)
                continue
            image = f"{shard}{MEMBER_SEP}{key}.{image_ext}" if need_image else None
            out.add(Record(sample_id=key, line=n, texts=texts, image=image), f"{name}::{key}",
                    sample[image_ext] if need_image else None)
    return out.result(shards[0] if len(shards) == 1 else f"{shards[0]} ... ({len(shards)} shards)", "webdataset")


def _table(path: str, kind: str, id_key: str, storage_options: dict | None):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        with _open_binary(path, storage_options) as fh:
            if kind == "parquet":
                return pq.read_table(fh)
            opts = pcsv.ParseOptions(delimiter="\t") if path.lower().endswith(".tsv") else None
            # The id as written: type inference would make "001" the integer 1, "1.50" the float 1.5.
            convert = pcsv.ConvertOptions(column_types={id_key: pa.string()})
            return pcsv.read_csv(fh, parse_options=opts, convert_options=convert)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise SemrouteError(f"cannot read {kind} table {path}: {err}") from None


def _table_ids(table, path: str, id_key: str) -> list | None:
    """The id column's values (None without one): text as written, or integers (given as their decimal text). A
    float column is refused, as any other type: pandas writes integers with a missing value as floats, which
    would give ids like "1.0" and "nan" that no other cache of the same samples joins on."""
    import pyarrow as pa

    if id_key not in table.column_names:
        return None
    column = table.column(id_key)
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    values = column.to_pylist()
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
            or pa.types.is_integer(kind) or pa.types.is_null(kind)):
        row = next((k for k, v in enumerate(values) if v is None or v != v), 0)  # a null or NaN says why, if any
        detail = f", row {row} holds {values[row]!r}" if values else ""
        raise SemrouteError(f"{path}: the id column '{id_key}' is of type {column.type}{detail}; ids must be text or "
                            "integers: cast the column to integer or string (or name another with --id-key)")
    return values


def read_table(files: list[str], kind: str, *, text_key: str, image_key: str, id_key: str, need_text: bool,
               need_image: bool, skip_bad: bool, storage_options: dict | None = None) -> Source:
    import pyarrow as pa

    import hashlib

    out = _Collector(skip_bad)
    position = 0
    content = hashlib.sha256()  # of every table's content, for ids taken from row positions
    positional = False
    for path in files:
        table = _table(path, kind, id_key, storage_options)
        if id_key not in table.column_names:
            positional = True
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as stream:
                stream.write_table(table)
            content.update(sink.getvalue())
        needed = ([text_key] if need_text else []) + ([image_key] if need_image else [])
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise SemrouteError(f"{path} has no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
                                "name the columns with --text-key / --image-key / --id-key")
        image_type = table.schema.field(image_key).type if need_image else None
        as_bytes = image_type is not None and (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
                                               or (pa.types.is_struct(image_type)
                                                   and image_type.get_field_index("bytes") >= 0))
        ids = _table_ids(table, path, id_key)
        texts_col = table.column(text_key).to_pylist() if need_text else None
        images_col = (table.column(image_key).to_pylist() if need_image and not as_bytes else None)
        present = (table.column(image_key).is_valid().to_pylist() if as_bytes else None)
        # A Hugging Face Image struct holds the bytes, or (bytes null) only the path of a file, used as a path
        # column's value is (``--image-root`` resolves it).
        struct_paths = None
        if as_bytes and pa.types.is_struct(image_type):
            import pyarrow.compute as pc

            column = table.column(image_key)
            present = pc.struct_field(column, "bytes").is_valid().to_pylist()
            if image_type.get_field_index("path") >= 0:
                struct_paths = pc.struct_field(column, "path").to_pylist()
        for row in range(table.num_rows):
            line = row + 1
            if ids is not None and ids[row] in (None, ""):
                out.refuse(path, line, f"row {row}: the id column '{id_key}' is "
                                       f"{'empty' if ids[row] == '' else 'null'}; give every row an id")
                continue
            sample_id = str(position + row) if ids is None else str(ids[row])
            try:
                texts = _captions(texts_col[row], text_key) if need_text else ()
                image = None
                if need_image:
                    if as_bytes and not present[row] and struct_paths and (struct_paths[row] or "").strip():
                        image = struct_paths[row]
                    elif as_bytes:
                        if not present[row]:
                            raise ManifestError(f"'{image_key}' is null" if struct_paths is None else
                                                f"'{image_key}' has neither bytes nor a path")
                        image = f"{path}{MEMBER_SEP}{image_key}[{row}]"
                    else:
                        image = images_col[row]
                        if not isinstance(image, str) or not image.strip():
                            raise ManifestError(f"'{image_key}' must be a non-empty path string, got {image!r}")
            except ManifestError as err:  # an empty or null caption, a missing image: as a manifest's record
                out.refuse(path, line, f"row {row}: {err}")
                continue
            out.add(Record(sample_id=sample_id, line=line, texts=texts, image=image), f"{path} row {row}")
        position += table.num_rows
    return out.result(files[0] if len(files) == 1 else f"{files[0]} ... ({len(files)} files)", kind,
                      content.hexdigest() if positional else None)


def read_source(data: str | os.PathLike, *, kind: str = "auto", text_key: str = "text", image_key: str = "image",
                id_key: str = "id", need_text: bool = True, need_image: bool = False, skip_bad: bool = False,
                storage_options: dict | None = None) -> Source:
    """Read any supported DATA into records (see the module docstring). The manifest keeps its exact
    behaviour: a bad record is an error naming file and line unless ``skip_bad``."""
    if kind not in KINDS:
        raise SemrouteError(f"--input-format {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "auto":
        kind, files = detect_kind(str(data))
    else:
        files = [str(data)] if kind in ("manifest", "folder") else expand(str(data))
        if len(files) == 1 and kind in ("webdataset", "parquet") and not is_url(files[0]) and Path(files[0]).is_dir():
            files = _folder_files(Path(files[0]), (".tar",) if kind == "webdataset" else (".parquet",))
    if kind == "manifest":
        if is_url(files[0]):
            raise manifest_url(files[0])
        m = read_manifest(files[0], text_key=text_key, image_key=image_key, id_key=id_key, need_text=need_text,
                          need_image=need_image, skip_bad=skip_bad)
        return Source(path=m.path, records=m.records, problems=m.problems, kind="manifest",
                      positional_ids=m.positional_ids, content_sha256=m.content_sha256)
    if kind == "folder":
        if not Path(files[0]).is_dir():
            raise SemrouteError(f"{files[0]} is not a folder")
        return read_folder(files[0], need_text=need_text, need_image=need_image, skip_bad=skip_bad)
    if kind == "webdataset":
        return read_webdataset(files, text_key=text_key, need_text=need_text, need_image=need_image,
                               skip_bad=skip_bad, storage_options=storage_options)
    return read_table(files, kind, text_key=text_key, image_key=image_key, id_key=id_key, need_text=need_text,
                      need_image=need_image, skip_bad=skip_bad, storage_options=storage_options)
