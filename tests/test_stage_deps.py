"""Each DVC stage depends on every vlmprobe source file it imports (else an edit there leaves
stale results: DVC re-runs a stage only when a declared dependency changes)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from vlmprobe.cli import stage_modules

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The source file of module `name` (a package's __init__.py), or None if not ours."""
    path = SRC / name.replace(".", "/")
    if path.is_dir():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING",
                                                                   "typing.TYPE_CHECKING"}


def runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:` (imports for annotations only,
    never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(child for child in ast.iter_child_nodes(node) if not is_type_checking(child))


def imported_modules(path: Path) -> set[str]:
    """vlmprobe modules `path` imports when run, at any depth of its code (lazy imports
    included; annotation-only imports under `if TYPE_CHECKING:` not)."""
    names = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] == "vlmprobe" and module_file(n)}


def import_closure(module: str) -> set[Path]:
    """Every vlmprobe source file `module` needs, its packages' __init__ files included."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        todo.extend(imported_modules(module_file(name)))
    return {module_file(n) for n in seen}


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any(relative == d or relative.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_its_whole_import_closure(name):
    deps = STAGES[name].get("deps", [])
    closure = import_closure(stage_modules(ROOT / "dvc.yaml")[name])
    # An empty package __init__ changes nothing a stage computes.
    missing = sorted(p.relative_to(ROOT).as_posix() for p in closure
                     if p.stat().st_size and not covered(p, deps))
    assert not missing, f"dvc.yaml stage {name!r} imports but does not depend on: {missing}"


def test_closure_follows_lazy_imports():
    closure = import_closure("vlmprobe.cli")  # imports each command's module inside it
    assert SRC / "vlmprobe/models/doctor.py" in closure
