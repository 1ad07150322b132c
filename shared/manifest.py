"""Data manifests: a JSON array or JSONL file of records with an image path and one or more captions.

Every record problem (bad JSON, a key given twice, a missing key, a non-string or empty caption, invalid UTF-8,
a duplicate id) is reported with the file and line it comes from. By default the first problem is an error; with
``skip_bad=True`` bad records are left out and listed in ``Manifest.problems`` so the caller can report
them. Nothing is ever substituted for a bad value.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from semroute.shared.checks import DuplicateKey, loads_json, raw_decode_json
from semroute.shared.errors import ManifestError
from semroute.shared.files import write_atomic


@dataclass(frozen=True)
class Record:
    """One manifest record.

    ``sample_id`` joins the text and latent caches: the record's ``id`` value as a string, else its
    position (0-based, counting every record of the file, bad ones included, so ids do not shift when
    a bad record is skipped). ``line`` is the 1-based line where the record starts.
    """

    sample_id: str
    line: int
    texts: tuple[str, ...] = ()
    image: str | None = None


@dataclass(frozen=True)
class Problem:
    """A record that was left out, and why."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class Manifest:
    path: str
    records: list[Record]
    problems: list[Problem] = field(default_factory=list)
    positional_ids: bool = False
    """Some records had no id, so their position is their id: two caches join correctly only when both were
    made from the same file content (``content_sha256``)."""
    content_sha256: str | None = None

    def id_source(self) -> dict:
        """What a cache records about its sample ids (checked when two caches are joined)."""
        return {"positional": self.positional_ids, "content_sha256": self.content_sha256}

    @property
    def n_captions(self) -> int:
        return sum(len(r.texts) for r in self.records)


def _is_json_array(raw: bytes) -> bool:
    head = raw.lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _iter_raw_records(path: str, raw: bytes) -> Iterator[tuple[int, object | Exception]]:
    """Yield ``(line, parsed_value_or_error)`` for each record of a JSON array or JSONL file."""
    if _is_json_array(raw):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise ManifestError(f"{path}:{line}: invalid UTF-8 ({err.reason} at byte {err.start})") from None
        pos = text.index("[") + 1
        n = len(text)
        first = True
        while True:
            # Records are parsed one by one (a bad one is left out with --skip-bad), so the separators between
            # them are checked here, as json.loads would: one comma between two records, none before the first
            # or after the last.
            start = pos
            while pos < n and text[pos] in " \t\r\n":
                pos += 1
            if pos >= n:
                raise ManifestError(f"{path}:{_line_of(text, n)}: the JSON array is not closed with ']'")
            if text[pos] not in ",]" and not first:
                raise ManifestError(f"{path}:{_line_of(text, pos)}: malformed JSON: expected ',' or ']' after the "
                                    f"record ending on line {_line_of(text, start)}")
            if text[pos] == ",":
                if first:
                    raise ManifestError(f"{path}:{_line_of(text, pos)}: malformed JSON: a ',' before the first record")
                pos += 1
                while pos < n and text[pos] in " \t\r\n":
                    pos += 1
                if pos >= n:
                    raise ManifestError(f"{path}:{_line_of(text, n)}: the JSON array is not closed with ']'")
                if text[pos] in ",]":
                    what = "two ','s with no record between them" if text[pos] == "," else \
                        "a ',' after the last record (JSON allows none)"
                    raise ManifestError(f"{path}:{_line_of(text, pos)}: malformed JSON: {what}")
            first = False
            if text[pos] == "]":
                rest = text[pos + 1:].lstrip(" \t\r\n")
                if rest:  # a second array or record after the first: all of it would be left out unread
                    at = _line_of(text, n - len(rest))
                    raise ManifestError(f"{path}:{at}: data after the JSON array's closing ']' (line "
                                        f"{_line_of(text, pos)}): {rest[:40]!r}; a .json manifest is one array of "
                                        "records: move them into it (or write JSONL, one record per line)")
                return
            try:
                value, end = raw_decode_json(text, pos)
            except DuplicateKey as err:  # a bad record, but well-formed: the next one starts where it ends
                value = ManifestError(f"{err.msg} (line {err.lineno}, column {err.colno})")
                end = json.JSONDecoder().raw_decode(text, pos)[1]
            except json.JSONDecodeError as err:
                # Inside one array a syntax error leaves no reliable way to find the next record.
                raise ManifestError(f"{path}:{_line_of(text, err.pos)}: malformed JSON: {err.msg}") from None
            except (ValueError, RecursionError) as err:  # valid JSON Python refuses: >4300 digits, deep nesting
                raise ManifestError(f"{path}:{_line_of(text, pos)}: unreadable JSON: {err}") from None
            yield _line_of(text, pos), value
            pos = end
    else:
        for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
            if lineno == 1 and line_bytes.startswith(b"\xef\xbb\xbf"):
                line_bytes = line_bytes[3:]
            if not line_bytes.strip():
                continue
            try:
                line_text = line_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, ManifestError(f"invalid UTF-8 ({err.reason} at column {err.start + 1})")
                continue
            try:
                yield lineno, loads_json(line_text)
            except DuplicateKey as err:
                yield lineno, ManifestError(f"{err.msg} (column {err.colno})")
            except json.JSONDecodeError as err:
                yield lineno, ManifestError(f"malformed JSON: {err.msg} (column {err.colno})")
            except (ValueError, RecursionError) as err:  # valid JSON Python refuses: >4300 digits, deep nesting
                yield lineno, ManifestError(f"unreadable JSON: {err}")


def printable(text: str) -> str:
    """``text`` with any lone surrogate written as its escape (``\\udcff``), so a message naming it can be printed
    (a terminal, a UTF-8 file) instead of failing on it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_unicode(value: str, what: str) -> None:
    """Refuse a string that cannot be written as UTF-8 (a lone surrogate: an unpaired ``\\ud800`` escape in JSON,
    or a file or tar member name that is not UTF-8): the cache's index.parquet, and the hashes of the inputs,
    store every id, caption and path as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ManifestError(f"{what} holds a lone surrogate {value[err.start]!r} at character {err.start + 1} "
                            f"({value[:60]!r}): an unpaired \\u escape, or a name that is not UTF-8; "
                            "fix or rename it") from None


def check_record_text(sample_id: str, texts: tuple[str, ...], image: str | None, *, text_key: str = "text",
                      image_key: str = "image") -> None:
    """``check_unicode`` on everything of a record that the caches store."""
    check_unicode(sample_id, "the sample id")
    for k, text in enumerate(texts):
        check_unicode(text, f"caption {k} of '{text_key}'" if len(texts) > 1 else f"'{text_key}'")
    if image is not None:
        check_unicode(image, f"the image ('{image_key}')")


def _captions(value: object, text_key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        captions = (value,)
    elif isinstance(value, list) and value:
        for k, item in enumerate(value):
            if not isinstance(item, str):
                raise ManifestError(f"caption {k} of '{text_key}' is {type(item).__name__}, expected a string")
        captions = tuple(value)
    elif isinstance(value, list):
        raise ManifestError(f"'{text_key}' is an empty list; give at least one caption")
    else:
        raise ManifestError(f"'{text_key}' is {type(value).__name__}, expected a string or a list of strings")
    for k, caption in enumerate(captions):
        if not caption.strip():
            which = f"caption {k} of '{text_key}'" if len(captions) > 1 else f"'{text_key}'"
            raise ManifestError(f"{which} is empty")
    return captions


def read_manifest(
    path: str | Path,
    *,
    text_key: str = "text",
    image_key: str = "image",
    id_key: str = "id",
    need_text: bool = True,
    need_image: bool = False,
    skip_bad: bool = False,
) -> Manifest:
    """Read and validate a manifest.

    Args:
        path: a ``.json`` file holding an array of objects, or a JSONL file (one object per line;
            blank lines are ignored).
        text_key, image_key, id_key: the keys of the caption(s), the image path and the optional id.
        need_text / need_image: which keys every record must have (``encode-text`` needs text,
            ``encode-images`` needs the image).
        skip_bad: leave bad records out and list them in ``problems`` instead of raising.

    Raises:
        ManifestError: naming file and line, for the first bad record (unless ``skip_bad``), for an
            unreadable file, or when no usable record remains.
    """
    path = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ManifestError(f"cannot read manifest {path}: {err.strerror or err}") from None

    records: list[Record] = []
    problems: list[Problem] = []
    seen_ids: dict[str, int] = {}
    positional = False

    for position, (line, value) in enumerate(_iter_raw_records(path, raw)):
        try:
            if isinstance(value, Exception):
                raise value
            if not isinstance(value, dict):
                raise ManifestError(f"record is {type(value).__name__}, expected a JSON object")
            if id_key in value:
                raw_id = value[id_key]
                if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id) == "":
                    # As a Parquet/CSV id column (shared/sources.py): a float (1.0) or true is no stable id.
                    raise ManifestError(f"'{id_key}' is {json.dumps(raw_id)}; an id must be a non-empty string or an "
                                        'integer (7 or "7", not 7.0, true or null): write it as one')
                sample_id = str(raw_id)
            else:
                sample_id = str(position)
                positional = True
            texts: tuple[str, ...] = ()
            if need_text:
                if text_key not in value:
                    raise ManifestError(f"missing key '{text_key}' (keys: {', '.join(sorted(value)) or 'none'})")
                texts = _captions(value[text_key], text_key)
            image = None
            if need_image:
                if image_key not in value:
                    raise ManifestError(f"missing key '{image_key}' (keys: {', '.join(sorted(value)) or 'none'})")
                image = value[image_key]
                if not isinstance(image, str) or not image.strip():
                    raise ManifestError(f"'{image_key}' must be a non-empty path string, got {image!r}")
            check_record_text(sample_id, texts, image, text_key=text_key, image_key=image_key)
            if sample_id in seen_ids:
                raise ManifestError(f"duplicate id {sample_id!r} (first seen on line {seen_ids[sample_id]})")
        except ManifestError as err:
            if not skip_bad:
                raise ManifestError(f"{path}:{line}: {err}") from None
            problems.append(Problem(path, line, str(err)))
            continue
        seen_ids[sample_id] = line
        records.append(Record(sample_id=sample_id, line=line, texts=texts, image=image))

    if not records:
        detail = f" ({len(problems)} bad records, first: {problems[0]})" if problems else ""
        raise ManifestError(f"{path}: no usable records{detail}")
    import hashlib

    return Manifest(path=path, records=records, problems=problems, positional_ids=positional,
                    content_sha256=hashlib.sha256(raw).hexdigest())


def read_problem_report(path: str | Path) -> list[Problem]:
    """The records a ``write_problem_report`` file lists ([] when there is none); a damaged line is named."""
    from semroute.shared.errors import CacheDamaged

    path = Path(path)
    if not path.exists():
        return []
    problems = []
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = loads_json(line.decode("utf-8"))
            problems.append(Problem(path=str(entry["path"]), line=int(entry["line"]), reason=str(entry["reason"])))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CacheDamaged(f"{path}: line {n} is damaged ({type(err).__name__}: {err}); restore the file, or "
                               "delete it (it only lists the records left out)") from None
    return problems


def write_problem_report(problems: list[Problem], out_path: str | Path) -> None:
    """Write skipped records as JSONL (``path``, ``line``, ``reason``) so they can be fixed and re-run. Written to
    a temporary name, then renamed: an append rewrites the report with the earlier parts' records, which a run
    killed mid-write must not lose."""
    write_atomic(out_path, "".join(json.dumps({"path": p.path, "line": p.line, "reason": p.reason}) + "\n"
                                   for p in problems))
