"""Which project source files a module runs: its imports, followed transitively through the
project's own packages (function-level imports included; `if TYPE_CHECKING:` blocks, which never
run, left out). A stage's cache key and its dvc.yaml deps are derived from this, never listed
by hand."""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("gradinv", "tasks", "flows")


def module_file(name: str) -> Path | None:
    """The file of project module `name` (a package's __init__.py), or None outside the project."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, package: str) -> list[str]:
    """Every module name an import statement in `tree` may load (for `from a import b`: a, and
    a.b in case b is a submodule), type-checking blocks skipped."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@lru_cache(maxsize=None)
def module_closure(name: str) -> frozenset[str]:
    """Project modules that importing `name` runs, `name` included."""
    seen: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        for module in _with_parents(current):
            path = module_file(module)
            if path is None or module in seen:
                continue
            seen.add(module)
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            pending.extend(_imported_names(ast.parse(path.read_text(), str(path)), package))
    return frozenset(seen)


def source_files(*modules: str) -> tuple[str, ...]:
    """The files (relative to the project root, sorted) of every module in the closures of `modules`."""
    files = {module_file(m) for name in modules for m in module_closure(name)}
    return tuple(sorted(str(f.relative_to(PROJECT_ROOT)) for f in files if f is not None))
