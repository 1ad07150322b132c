"""Prompt files for ``semroute sample --prompts FILE``, and the output layouts their scorers expect.

Readers (``read_prompts``, format auto-detected, ``format=`` overrides):

- ``text``: one prompt per non-empty line. Name ``<index:05d>``; record: the line.
- ``jsonl``: JSONL, each object with a ``prompt``. Name ``<index:05d>``; record: the object.
- ``geneval``: GenEval's ``evaluation_metadata.jsonl`` (JSONL whose objects have ``tag`` and ``include``).
  Name ``<index:05d>``; record: the line's object.
- ``genaibench``: GenAI-Bench's ``genai_image.json``, ``{key: {"id", "prompt", ...}}``. Name: the ``id``;
  record: the value.
- ``drawbench``: DrawBench's ``DrawBench.tsv`` (tab-separated, header ``Prompts``/``Category``). Name
  ``<row:05d>``; record: ``{"id", "caption", "category"}``, as in the derived ``drawbench_meta.json``.
- ``drawbench_json``: that ``drawbench_meta.json``, ``{key: {"caption", "category", ...}}``. Name
  ``<row:05d>``; record: the value.

``index`` is the prompt's 0-based position in the whole file. Output names come from it (or from the
GenAI-Bench id), never from a position within one process's share, so processes that each sample a
disjoint subset of the prompts never write the same file.

Layouts (``layout_for(format, out_dir, n_per_prompt)``):

- GenEval (``geneval``): ``<out>/<index:05d>/metadata.jsonl`` holding that prompt's line as one JSON
  object, and ``<out>/<index:05d>/samples/<k:04d>.png``: the folder GenEval's ``evaluate_images.py``
  scores (digits-only folder names, ``\\d+\\.png`` sample names: GenEval's ``evaluation/evaluate_images.py``).
- GenAI-Bench (``genaibench``): ``<out>/<id>.png`` with one image per prompt (the naming of its scorer,
  which reads ``<id>.jpeg``: convert the files to JPEG for the upstream ``evaluate.py``), and
  ``<out>/<id>_<k>.png`` with several; plus ``<out>/prompts.jsonl``.
- DrawBench (``drawbench``, ``drawbench_json``): ``<out>/<row:05d>_<k>.png`` (its evaluator pairs a file with
  prompt ``int(name.split("_")[0])``), plus ``<out>/prompts.jsonl`` with each row's category.
- Generic (``text``, ``jsonl``): ``<out>/<index:05d>_<k>.png`` plus ``<out>/prompts.jsonl``.

``prompts.jsonl`` lists every prompt of the file with its image files. It depends only on the prompt
list and ``n``, so the main process writes it once (``write_index``); nothing is appended per prompt.
Resume: ``pending(entries)`` leaves out prompts whose files all exist; ``save_image`` writes through a
temporary file and a rename, so a crash never leaves a truncated PNG that would count as done.

Use::

    fmt = detect_format(path)                      # or the user's explicit format
    entries = read_prompts(path, fmt)
    layout = layout_for(fmt, out_dir, n_per_prompt=n)
    if is_main_process:
        layout.write_index(entries)
    for entry in layout.pending(entries[rank::world_size]):
        layout.prepare(entry)
        for k in range(n):
            save_image(image_k, layout.image_path(entry, k))
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semroute.shared.checks import DuplicateKey, json_object, loads_json
from semroute.shared.errors import SemrouteError
from semroute.shared.files import write_atomic

FORMATS = ("text", "jsonl", "geneval", "genaibench", "drawbench", "drawbench_json")


class PromptFileError(SemrouteError):
    """A prompt file that cannot be read; the message names the file and, where it can, the line."""


@dataclass(frozen=True)
class PromptEntry:
    """One prompt. ``index``: 0-based position among the file's prompts; ``name``: the stem its outputs
    are named by; ``record``: the original record (see the module table); ``line``: 1-based source line."""

    index: int
    name: str
    text: str
    record: Any
    line: int


# -- reading ------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PromptFileError(f"cannot read prompt file {path}: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: invalid UTF-8 ({err.reason} at byte {err.start})") from None


def _lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) for every non-blank line."""
    return [(i + 1, line.rstrip("\r")) for i, line in enumerate(text.split("\n")) if line.strip()]


def _whole_json(path: Path, text: str) -> Any:
    """The file as one JSON value, None when it is not one (it may be JSONL); a key given twice is an error."""
    try:
        return loads_json(text)
    except DuplicateKey as err:
        raise PromptFileError(f"{path}:{err.lineno}: {err.msg} (column {err.colno})") from None
    except json.JSONDecodeError:
        return None


def detect_format(path: str | Path) -> str:
    """Guess a prompt file's format from its content (see ``FORMATS``)."""
    path = Path(path)
    text = _read_text(path)
    lines = _lines(text)
    if not lines:
        raise PromptFileError(f"{path}: the prompt file is empty")
    first = lines[0][1]
    if [c.strip() for c in first.split("\t")][:1] == ["Prompts"]:
        return "drawbench"
    stripped = text.lstrip()
    if stripped.startswith("["):
        raise PromptFileError(f"{path}: a JSON array is not a supported prompt file; use JSONL (one object "
                              f"with a 'prompt' key per line) or plain text (one prompt per line)")
    if stripped.startswith("{"):
        whole = _whole_json(path, text)
        if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
            values = list(whole.values())
            if "caption" in values[0]:
                return "drawbench_json"
            if "prompt" in values[0]:
                return "genaibench"
            raise PromptFileError(f"{path}: a JSON object of records, but its first record has neither 'prompt' "
                                  f"(GenAI-Bench) nor 'caption' (DrawBench); keys: {', '.join(values[0]) or 'none'}")
        try:
            record = loads_json(first)  # a key given twice there was met by _whole_json already
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}:{lines[0][0]}: looks like JSONL but is not valid JSON: {err.msg}") from None
        if isinstance(record, dict) and "tag" in record and "include" in record:
            return "geneval"
        return "jsonl"
    return "text"


def _jsonl_records(path: Path, text: str) -> list[tuple[int, dict]]:
    return [(line_no, json_object(line, f"{path}:{line_no}", error=PromptFileError, expected="a JSON object record"))
            for line_no, line in _lines(text)]


def _prompt_of(path: Path, line: int, record: dict, key: str, what: str) -> str:
    if key not in record:
        raise PromptFileError(f"{path}:{line}: {what} has no '{key}' (keys: {', '.join(record) or 'none'})")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise PromptFileError(f"{path}:{line}: {what}'s '{key}' must be a non-empty string, got {value!r}")
    return value


def _key_lines(text: str, keys: list[str]) -> list[int]:
    """The line where each top-level ``"key":`` of a JSON object starts, for messages. Keys are searched
    in order, each after the previous one, so the scan is linear; 0 where one is not found."""
    lines, pos, line = [], 0, 1
    for key in keys:
        match = re.compile(r"^[ \t]*" + re.escape(json.dumps(key)) + r"[ \t]*:", re.MULTILINE).search(text, pos)
        if match is None:
            lines.append(0)
            continue
        line += text.count("\n", pos, match.start())
        lines.append(line)
        pos = match.start()
    return lines


def _read_keyed_json(path: Path, text: str, prompt_key: str, what: str) -> list[tuple[int, str, dict]]:
    """``(line, key, value)`` for each entry of a JSON object of records, in file order."""
    whole = json_object(text, str(path), error=PromptFileError, expected=f"a JSON object keyed by id ({what})",
                        error_line=True)
    out = []
    for (key, value), line in zip(whole.items(), _key_lines(text, list(whole))):
        if not isinstance(value, dict):
            raise PromptFileError(f"{path}:{line}: entry {key!r} is {type(value).__name__}, expected an object")
        _prompt_of(path, line, value, prompt_key, f"entry {key!r}")
        out.append((line, key, value))
    return out


def _safe_name(path: Path, line: int, name: str) -> str:
    # The name becomes a file name: refuse anything that could leave the output folder or hide a file.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise PromptFileError(f"{path}:{line}: id {name!r} cannot be a file name; use letters, digits, '.', "
                              f"'_' and '-' only")
    return name


def read_prompts(path: str | Path, format: str | None = None) -> list[PromptEntry]:
    """Read a prompt file; ``format`` is one of ``FORMATS``, or ``None`` to detect it.

    Raises:
        PromptFileError: naming the file and line of the first bad entry, or an unknown format.
    """
    path = Path(path)
    if format is None:
        format = detect_format(path)
    if format not in FORMATS:
        raise PromptFileError(f"unknown prompt-file format {format!r}; expected one of {', '.join(FORMATS)}")
    text = _read_text(path)
    entries: list[PromptEntry] = []

    if format == "text":
        for i, (line, prompt) in enumerate(_lines(text)):
            entries.append(PromptEntry(i, f"{i:05d}", prompt.strip(), prompt, line))
    elif format in ("jsonl", "geneval"):
        for i, (line, record) in enumerate(_jsonl_records(path, text)):
            prompt = _prompt_of(path, line, record, "prompt", "record")
            if format == "geneval":
                for key in ("tag", "include"):
                    if key not in record:
                        raise PromptFileError(f"{path}:{line}: GenEval record has no '{key}'; GenEval's evaluator "
                                              f"needs 'tag' and 'include' (use format='jsonl' to sample only)")
                if not isinstance(record["include"], list):
                    raise PromptFileError(f"{path}:{line}: GenEval 'include' must be a list, got "
                                          f"{type(record['include']).__name__}")
            entries.append(PromptEntry(i, f"{i:05d}", prompt, record, line))
    elif format == "genaibench":
        seen: dict[str, int] = {}
        for i, (line, key, value) in enumerate(_read_keyed_json(path, text, "prompt", "GenAI-Bench")):
            name = _safe_name(path, line, str(value.get("id", key)))
            if name in seen:
                raise PromptFileError(f"{path}:{line}: duplicate id {name!r} (first on line {seen[name]})")
            seen[name] = line
            entries.append(PromptEntry(i, name, value["prompt"], value, line))
    elif format == "drawbench_json":
        for i, (line, key, value) in enumerate(_read_keyed_json(path, text, "caption", "DrawBench")):
            entries.append(PromptEntry(i, f"{i:05d}", value["caption"], value, line))
    else:  # drawbench TSV
        entries = _read_drawbench_tsv(path, text)

    if not entries:
        raise PromptFileError(f"{path}: no prompts found")
    return entries


def _read_drawbench_tsv(path: Path, text: str) -> list[PromptEntry]:
    # TSV, not CSV: prompts contain commas and apostrophes.
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
    if not rows:
        raise PromptFileError(f"{path}: the prompt file is empty")
    header = [c.strip() for c in rows[0]]
    if "Prompts" not in header:
        raise PromptFileError(f"{path}:1: expected a DrawBench header with a 'Prompts' column, got {rows[0]!r}")
    col, cat_col = header.index("Prompts"), header.index("Category") if "Category" in header else None
    entries = []
    for line, row in enumerate(rows[1:], start=2):  # DrawBench has no multi-line cells
        if not any(c.strip() for c in row):
            continue
        if len(row) <= col or not row[col].strip():
            raise PromptFileError(f"{path}:{line}: row has no prompt in column 'Prompts': {row!r}")
        i = len(entries)
        category = row[cat_col].strip() if cat_col is not None and len(row) > cat_col else None
        # The same record as the derived drawbench_meta.json (category with its stray spaces stripped).
        record = {"id": f"{i:05d}", "caption": row[col], "category": category}
        entries.append(PromptEntry(i, f"{i:05d}", row[col], record, line))
    return entries


# -- writing ------------------------------------------------------------------------------------------



def save_image(image, path: str | Path) -> None:
    """Save a PIL image as PNG through a temporary file and a rename (a partial file never looks done)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


class OutputLayout:
    """Where the images of each prompt go. Subclasses set the names; the generic layout is
    ``<out>/<index:05d>_<k>.png`` plus ``prompts.jsonl``.

    Use: ``write_index(all_entries)`` once (main process); for each entry in ``pending(my_entries)``:
    ``prepare(entry)``, then ``save_image(img, image_path(entry, k))`` for k in range(n_per_prompt).
    """

    kind = "generic"

    def __init__(self, out_dir: str | Path, n_per_prompt: int = 1):
        if n_per_prompt < 1:
            raise ValueError(f"n_per_prompt must be at least 1, got {n_per_prompt}")
        self.out_dir = Path(out_dir)
        self.n = n_per_prompt

    def image_path(self, entry: PromptEntry, k: int) -> Path:
        return self.out_dir / f"{entry.name}_{k}.png"

    def image_paths(self, entry: PromptEntry) -> list[Path]:
        return [self.image_path(entry, k) for k in range(self.n)]

    def metadata_paths(self, entry: PromptEntry) -> list[Path]:
        """Per-prompt files that ``prepare`` writes (none here)."""
        return []

    def is_complete(self, entry: PromptEntry) -> bool:
        """All of the prompt's images (and per-prompt metadata) exist."""
        return all(p.is_file() for p in [*self.metadata_paths(entry), *self.image_paths(entry)])

    def pending(self, entries: list[PromptEntry]) -> list[PromptEntry]:
        """The entries still to sample (for resume)."""
        return [e for e in entries if not self.is_complete(e)]

    def prepare(self, entry: PromptEntry) -> None:
        """Create the prompt's folders and write its per-prompt metadata, if the layout has any."""
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def index_record(self, entry: PromptEntry) -> dict:
        record = {"index": entry.index, "name": entry.name, "prompt": entry.text}
        if isinstance(entry.record, dict):
            record["metadata"] = entry.record
        return record

    @property
    def index_path(self) -> Path | None:
        """The prompt index ``write_index`` writes (None: the layout writes none)."""
        return self.out_dir / "prompts.jsonl"

    def write_index(self, entries: list[PromptEntry]) -> Path | None:
        """Write ``prompts.jsonl`` (one line per prompt, with its files relative to ``out_dir``)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for e in entries:
            files = [p.relative_to(self.out_dir).as_posix() for p in self.image_paths(e)]
            lines.append(json.dumps({**self.index_record(e), "files": files}, ensure_ascii=False) + "\n")
        write_atomic(self.index_path, "".join(lines).encode("utf-8"))
        return self.index_path


class GenEvalLayout(OutputLayout):
    """``<out>/<index:05d>/metadata.jsonl`` (the source line's object) and ``samples/<k:04d>.png``."""

    kind = "geneval"

    def _folder(self, entry: PromptEntry) -> Path:
        return self.out_dir / f"{entry.index:05d}"

    def image_path(self, entry: PromptEntry, k: int) -> Path:
        return self._folder(entry) / "samples" / f"{k:04d}.png"

    def metadata_paths(self, entry: PromptEntry) -> list[Path]:
        return [self._folder(entry) / "metadata.jsonl"]

    def prepare(self, entry: PromptEntry) -> None:
        if not isinstance(entry.record, dict):
            raise PromptFileError(f"prompt {entry.index} (line {entry.line}) has no metadata record; the GenEval "
                                  f"layout needs a GenEval-format prompt file")
        (self._folder(entry) / "samples").mkdir(parents=True, exist_ok=True)
        # GenEval reads this with json.load: exactly one object, despite the .jsonl name.
        data = (json.dumps(entry.record, ensure_ascii=False) + "\n").encode("utf-8")
        write_atomic(self.metadata_paths(entry)[0], data)

    @property
    def index_path(self) -> Path | None:
        return None  # every prompt folder carries its own metadata

    def write_index(self, entries: list[PromptEntry]) -> Path | None:
        return None


def prompt_metadata_files(out_dir: str | Path) -> list[Path]:
    """The per-prompt metadata a GenEval layout wrote in ``out_dir`` (``<index:05d>/metadata.jsonl``), sorted.
    ``prepare`` writes it before the prompt's images, so it can be there without any image."""
    return sorted(p for p in Path(out_dir).glob("*/metadata.jsonl") if p.parent.name.isdigit() and p.is_file())


class GenAIBenchLayout(OutputLayout):
    """``<out>/<id>.png`` (one image per prompt) or ``<out>/<id>_<k>.png``, plus ``prompts.jsonl``."""

    kind = "genaibench"

    def image_path(self, entry: PromptEntry, k: int) -> Path:
        return self.out_dir / (f"{entry.name}.png" if self.n == 1 else f"{entry.name}_{k}.png")

    def index_record(self, entry: PromptEntry) -> dict:
        return {"id": entry.name, "index": entry.index, "prompt": entry.text}


class DrawBenchLayout(OutputLayout):
    """``<out>/<row:05d>_<k>.png`` plus ``prompts.jsonl`` with each row's category."""

    kind = "drawbench"

    def index_record(self, entry: PromptEntry) -> dict:
        category = entry.record.get("category") if isinstance(entry.record, dict) else None
        return {"row": entry.index, "prompt": entry.text, "category": category}


_LAYOUTS = {"geneval": GenEvalLayout, "genaibench": GenAIBenchLayout, "drawbench": DrawBenchLayout,
            "drawbench_json": DrawBenchLayout, "text": OutputLayout, "jsonl": OutputLayout}


def layout_for(format: str, out_dir: str | Path, n_per_prompt: int = 1) -> OutputLayout:
    """The output layout for prompts read in ``format`` (a ``FORMATS`` name, or ``"generic"``)."""
    cls = OutputLayout if format == "generic" else _LAYOUTS.get(format)
    if cls is None:
        raise ValueError(f"unknown prompt-file format {format!r}; expected one of {', '.join(FORMATS)} or 'generic'")
    return cls(out_dir, n_per_prompt)
