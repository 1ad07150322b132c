"""The README and docs/ name only commands and options the CLI has (read from the typer app in cli.py), only
``--set`` keys ``TrainConfig`` has, and the README's "Layout" lists only paths the repository has."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import typer

from semroute.cli import app
from semroute.stage2_train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")  # inline code may wrap onto the next line
HEADING = re.compile(r"^#+ .*$", re.M)
COMMAND = re.compile(r"(?:\bsemroute|\bcli\.py)\s+([a-z][\w-]*)")
OPTION = re.compile(r"(?<![\w/-])(--?[A-Za-z][\w-]*)")
SET_KEY = re.compile(r"--set\s+'?([\w.]+)=")
SET_PLACEHOLDERS = {"key"}  # `--set key=value`


@functools.cache
def cli_options() -> dict[str, frozenset[str]]:
    """Each command's options as the app parses them (--help included). (Typer bundles its own click: the
    parameters' kind is read by name, not by class.)"""
    group = typer.main.get_command(app)
    ctx = group.context_class(group)
    return {name: frozenset(opt for p in cmd.get_params(ctx) if p.param_type_name == "option"
                            for opt in p.opts + p.secondary_opts)
            for name, cmd in group.commands.items()}


def command_uses(text: str, section_command: str | None = None):
    """``(command, option or None, line)`` for each command line in ``text``: from ``semroute CMD`` or ``cli.py CMD``
    (or a leading command name: `encode-text --append`) to the line's end, a shell comment or ``&&``. In a section
    about one command (``### `semroute train ...` ``), a line of options alone counts for that command."""
    known = cli_options()
    for line in text.splitlines():
        found = list(COMMAND.finditer(line))
        words = line.split()
        if found:
            for i, match in enumerate(found):
                end = found[i + 1].start() if i + 1 < len(found) else len(line)
                yield from _uses(match.group(1), line[match.end():end], line)
        elif words and words[0] in known:
            yield from _uses(words[0], line.split(None, 1)[-1] if len(words) > 1 else "", line)
        elif section_command is not None and line.lstrip().startswith("-"):
            yield from _uses(section_command, line, line)


def _uses(command: str, rest: str, line: str):
    yield command, None, line
    for option in OPTION.findall(re.split(r"&&|;|(?:^|\s)#", rest)[0]):
        yield command, option, line


def code_texts(text: str):
    """``(code, section command)``: each fenced block (None), and each inline code span with the command its
    section is about (None outside such sections)."""
    for block in FENCE.findall(text):
        yield block, None
    prose = FENCE.sub("", text)
    bounds = [m.start() for m in HEADING.finditer(prose)] + [len(prose)]
    for section in [prose[:bounds[0]]] + [prose[a:b] for a, b in zip(bounds, bounds[1:])]:
        title = section.split("\n", 1)[0]
        about = COMMAND.search(title) if title.startswith("#") else None
        for span in SPAN.findall(section):
            yield " ".join(span.split()), about and about.group(1)


def doc_uses(text: str):
    """Every command use in a document's fenced code blocks and inline code."""
    for code, about in code_texts(text):
        yield from command_uses(code, about)


def problems(path: Path, text: str | None = None) -> list[str]:
    """What ``path`` (or ``text`` as its content) names that the CLI does not have."""
    text = path.read_text() if text is None else text
    known = cli_options()
    found = []
    for command, option, line in doc_uses(text):
        if command not in known:
            found.append(f"{path.name}: no command {command!r}: {line!r}")
        elif option is not None and option not in known[command]:
            found.append(f"{path.name}: {command} has no option {option}: {line!r}")
    keys = set(TrainConfig.keys())
    for code, _ in code_texts(text):
        found += [f"{path.name}: --set {key}: no TrainConfig key {key.split('.')[0]!r}"
                  for key in SET_KEY.findall(code) if key.split(".")[0] not in keys | SET_PLACEHOLDERS]
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_documented_command_and_option_exists(path):
    assert problems(path) == []


def test_the_check_sees_the_readme_commands_and_a_bogus_option():
    """The extraction finds the README's commands (a check that found nothing would pass), and an option no command
    has, in a code block or in a command section's inline code, is named."""
    text = README.read_text()
    commands = {command for command, _, _ in doc_uses(text)}
    assert set(cli_options()) <= commands  # every command is documented, so every one is checked
    options = {(c, o) for c, o, _ in doc_uses(text) if o}
    assert {("train", "--cache-size"), ("sample", "-p"), ("sample", "--guidance-interval"),
            ("encode-images", "--allow-outside-root"), ("encode-text", "--append")} <= options
    fenced = text.replace("--resample bilinear --out d.latents.zarr", "--no-such-flag --out d.latents.zarr")
    assert problems(README, fenced) == [
        "README.md: encode-images has no option --no-such-flag: 'semroute encode-images data.jsonl --vae "
        "black-forest-labs/FLUX.1-dev --vae-subfolder vae --resolution 256 --no-such-flag --out d.latents.zarr'"]
    inline = text.replace("`--allow-outside-root`", "`--no-such-flag`")
    assert [p.split(":")[1] for p in problems(README, inline)] == [" encode-images has no option --no-such-flag"]
    assert problems(README, text.replace("semroute verify CACHE", "semroute check CACHE"))
    assert problems(README, text.replace("--set warmup_steps=500", "--set warmup_stepz=500"))


def layout_paths() -> list[str]:
    """The paths the README's "Layout" section names: its link, each listing row's names, and the files and folders
    its descriptions name (a file relative to its row's folder)."""
    section = README.read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    paths = re.findall(r"\]\(([^)]+)\)", section)
    rows = [line.strip() for line in section.splitlines() if line.startswith("    ")]
    assert rows, "the Layout section lists no paths"
    for row in rows:
        names, described = re.split(r"\s{2,}", row, maxsplit=1)
        folders = names.split()
        paths += folders
        paths += re.findall(r"(?<![\w/])((?:[\w.-]+/)+)(?=[\s:;,)]|$)", described)
        for file in re.findall(r"(?<![\w/.])([\w-]+\.(?:md|py|sh|yaml))\b", described):
            paths.append(next((f + file for f in folders if (ROOT / f / file).exists()), file))
    return paths


def test_every_layout_path_exists():
    paths = layout_paths()
    assert {"cli.py", "shared/", "configs/paper/", "docs/architecture.md", "docs/method.md", "bench/RESULTS.md"} <= set(paths)
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == [], f"README's Layout names paths the repository does not have: {missing}"
