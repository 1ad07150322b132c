"""Imports point one way: ``shared/`` <- ``stage1_encode/`` and ``stage2_train/`` (which never import each
other) <- the top-level commands (``cli.py``, ``demo.py``). Read from the source with ``ast``, so a lazy
import inside a function counts as much as one at the top, and so do relative imports (``from ..x import``)
and modules named in strings for a later ``importlib.import_module`` (``"semroute.stage2_train.dit:SemrouteDiT"``);
packages are read with their subfolders. No module may import itself back through others (a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "stage1_encode", "stage2_train", "configs")
# What each layer may import from semroute (besides itself).
ALLOWED = {
    "shared": set(),
    "stage1_encode": {"shared"},
    "stage2_train": {"shared"},
    "configs": set(),
    "top": {"shared", "stage1_encode", "stage2_train", "configs", "top"},
}


def _modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for path in root.glob("*.py"):
        found["semroute" if path.stem == "__init__" else f"semroute.{path.stem}"] = path
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = ["semroute", package, *path.relative_to(root / package).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _module_of(path: Path, modules: dict[str, Path]) -> str:
    return next((name for name, p in modules.items() if p == path), "semroute.top")


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in PACKAGES) else "top"


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, semroute module) for every import in the file, however deep in a function."""
    out = []
    package = _module_of(path, modules).split(".")[:-1] if path.stem != "__init__" else \
        _module_of(path, modules).split(".")
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level:  # relative: from the file's own package up
            base = ".".join(package[: len(package) - node.level + 1])
            full = f"{base}.{node.module}" if node.module else base
            names = [full] + [f"{full}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("semroute"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("semroute."):
            names = [node.value.split(":")[0]]  # a module named for importlib, e.g. "semroute.x.y:Class"
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            raise AssertionError(f"{path}:{node.lineno}: __import__ hides an import from this check; import normally")
        out += [(node.lineno, n) for n in names if n in modules and n != "semroute"]
    return out


def test_every_layer_imports_only_what_is_below_it():
    modules = _modules()
    assert "semroute.shared.store" in modules and "semroute.cli" in modules
    wrong = []
    for name, path in modules.items():
        layer = _layer(name)
        for line, target in _imports(path, modules):
            if _layer(target) != layer and _layer(target) not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {target} ({_layer(target)})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {t for _, t in _imports(path, modules) if t != name} for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_check_sees_a_wrong_import(tmp_path):
    """The rules themselves: a shared module importing stage two, or stage one importing stage two, is caught."""
    assert _layer("semroute.shared.store") == "shared" and _layer("semroute.cli") == "top"
    assert _layer("semroute.stage2_train.train") == "stage2_train"
    assert "stage2_train" not in ALLOWED["shared"] and "stage2_train" not in ALLOWED["stage1_encode"]
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from semroute.stage2_train.train import train\n")
    assert _imports(bad, _modules()) == [(2, "semroute.stage2_train.train")]


def test_the_check_sees_relative_imports_string_names_and_subpackages(tmp_path):
    modules = _modules()
    assert modules["semroute.stage2_train.models"] == ROOT / "stage2_train" / "models.py"
    # stage2_train/models.py names its DiT classes as strings for importlib: those count as imports
    assert any(t == "semroute.stage2_train.dit" for _, t in _imports(modules["semroute.stage2_train.models"], modules))
    # a relative import, read as if the file were shared/fake.py
    fake = tmp_path / "fake.py"
    fake.write_text("from ..stage2_train import train\nfrom .store import join\nMODEL = 'semroute.stage1_encode.text:x'\n")
    modules = {**modules, "semroute.shared.fake": fake}
    assert sorted(t for _, t in _imports(fake, modules)) == [
        "semroute.shared.store", "semroute.stage1_encode.text", "semroute.stage2_train", "semroute.stage2_train.train"]
    # a subfolder of a package is read: shared/sub/x.py is semroute.shared.sub.x
    (tmp_path / "tree" / "shared" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "shared" / "sub" / "x.py").write_text("")
    assert _modules(tmp_path / "tree")["semroute.shared.sub.x"] == tmp_path / "tree" / "shared" / "sub" / "x.py"
