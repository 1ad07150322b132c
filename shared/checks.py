"""Range and type checks for options and small JSON inputs: one place that words the error the same way everywhere.

Typer and YAML hand over whatever they parsed (``--lr inf``, ``--set shift=.nan``, ``--set ema='false'``
as a string); these checks turn anything outside an option's allowed range into a :class:`SemrouteError`
naming the option, the value received and what is allowed, before any work starts.

JSON that a user or a record supplies is read through ``loads_json`` / ``raw_decode_json``: Python's reader
keeps the last of a repeated key silently (a record ``{"text": "x", "text": "y"}`` would train on "y").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from semroute.shared.errors import SemrouteError


class BadValue(SemrouteError):
    """A value a check refused, with the name it was checked under and the problem (``must be >= 1, got -3``)
    apart: a caller that knows how the user gave the value (an option, a ``--set``, a config file) names it so
    (``TrainConfig.build``)."""

    def __init__(self, name: str, problem: str):
        super().__init__(name, problem)
        self.name, self.problem = name, problem

    def __str__(self) -> str:
        return f"{self.name} {self.problem}"


def _kind(value) -> str:
    return "a boolean" if isinstance(value, bool) else f"{type(value).__name__} {value!r}"


def check_number(name: str, value, *, integer: bool = False, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False):
    """``value`` as a finite number (an int when ``integer``) within ``[low, high]`` (open ends with
    ``low_open``/``high_open``); ``None`` passes when ``optional``. Returns the value (ints as int)."""
    if value is None and optional:
        return None
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        want = "an integer" if integer else "a number"
        raise BadValue(name, f"must be {want}, got {_kind(value)}")
    if not integer and not math.isfinite(value):
        raise BadValue(name, f"must be a finite number, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise BadValue(name, f"must be {' and '.join(x for x in (lo, hi) if x)}, got {value}")
    return int(value) if integer else value


def check_bool(name: str, value) -> bool:
    """A real boolean: YAML's ``true``/``false``; the strings ``'false'`` or ``'no'`` are refused, not read
    as truthy."""
    if not isinstance(value, bool):
        raise BadValue(name, f"must be true or false, got {_kind(value)}")
    return value


class DuplicateKey(json.JSONDecodeError):
    """A JSON object that gives ``key`` twice. A ``JSONDecodeError`` (``lineno``, ``colno``, ``pos``: where the
    second one starts), so a reader's handler of malformed JSON names it too."""

    def __init__(self, key: str, doc: str, pos: int):
        super().__init__(f"the key {json.dumps(key)} is given twice in one object (JSON readers would silently "
                         "keep the last); give it once", doc, pos)
        self.key = key


class _Repeated(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_pairs(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _Repeated(key)
            seen.add(key)
    return obj


_STRICT = json.JSONDecoder(object_pairs_hook=_unique_pairs)


def _locate(key: str, text: str, pos: int) -> DuplicateKey:
    """The ``DuplicateKey`` of the first object from ``pos`` on that repeats a key, with the position of the second
    one: ``text`` is read again with the pure-Python scanner, whose objects see where their values end (slow, so
    only once a repeat is known). ``pos`` itself where that reading fails (too deep for its recursion)."""
    decoder = json.JSONDecoder()
    skip = json.decoder.WHITESPACE.match

    def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
        ends: list[int] = []

        def scan(s: str, idx: int):
            value, end = scan_once(s, idx)
            ends.append(end)
            return value, end

        pairs, end = json.decoder.JSONObject(s_and_end, strict, scan, None, list, memo)
        s, seen = s_and_end[0], set()
        for i, (name, _) in enumerate(pairs):
            if name in seen:  # never the first pair: this one starts past the comma after the previous value
                raise DuplicateKey(name, s, skip(s, skip(s, ends[i - 1]).end() + 1).end())
            seen.add(name)
        return dict(pairs), end

    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        decoder.raw_decode(text, skip(text, pos).end())
    except DuplicateKey as found:
        return found
    except (ValueError, RecursionError):
        pass
    return DuplicateKey(key, text, pos)


def loads_json(text: str):
    """``json.loads(text)``, refusing an object that repeats a key: raises ``DuplicateKey`` (a ``JSONDecodeError``)."""
    if text.startswith("\ufeff"):  # as json.loads words it
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    try:
        return _STRICT.decode(text)  # json.loads with the hook would build a decoder per call (per record)
    except _Repeated as rep:
        raise _locate(rep.key, text, 0) from None


def raw_decode_json(text: str, pos: int = 0) -> tuple[object, int]:
    """``JSONDecoder().raw_decode(text, pos)`` (the JSON value at ``pos`` and where it ends), refusing an object that
    repeats a key as ``loads_json`` does."""
    try:
        return _STRICT.raw_decode(text, pos)
    except _Repeated as rep:
        raise _locate(rep.key, text, pos) from None


def json_object(text: str, where: str, *, error: type[Exception] = SemrouteError, expected: str = "a JSON object",
                error_line: bool = False) -> dict:
    """``text`` parsed as JSON, which must be an object. Otherwise ``error`` naming ``where`` (a file and line,
    or an option): the parser's message and column, or what was found instead of ``expected``. With
    ``error_line`` (``text`` is a whole file) a syntax error names its line too."""
    try:
        value = loads_json(text)
    except json.JSONDecodeError as err:
        at = f"{where}:{err.lineno}" if error_line else where
        what = err.msg if isinstance(err, DuplicateKey) else f"malformed JSON: {err.msg}"
        raise error(f"{at}: {what} (column {err.colno})") from None
    if not isinstance(value, dict):
        raise error(f"{where}: expected {expected}, got a {type(value).__name__}")
    return value


def read_json_object(path: str | Path, fix: str) -> dict:
    """The JSON object the file ``path`` holds. A file that cannot be read, is not UTF-8, is not JSON or holds
    something else is one :class:`SemrouteError` naming the file and what is wrong, then ``fix`` (what to do)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise SemrouteError(f"cannot read {path}: {err.strerror or err}; {fix}") from None
    except UnicodeDecodeError as err:
        raise SemrouteError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}), so "
                            f"not JSON; {fix}") from None
    try:
        return json_object(text, str(path), error_line=True)
    except SemrouteError as err:
        raise SemrouteError(f"{err}; {fix}") from None


def check_guidance_interval(interval) -> tuple[float, float]:
    """``(lo, hi)`` sigmas with ``0 <= lo < hi <= 1``, else a ``SemrouteError``."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        shown = ",".join(str(v) for v in interval) if isinstance(interval, (list, tuple)) else repr(interval)
        raise SemrouteError(f"guidance interval {shown}: give two sigmas LO,HI in [0, 1] (e.g. 0.3,0.8)") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise SemrouteError(f"guidance interval {lo:g},{hi:g}: need 0 <= LO < HI <= 1 (sigma: 1 = noise, 0 = image)")
    return lo, hi
