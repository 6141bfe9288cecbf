"""The house rules, checked from the source: package by concern, small modules, no import cycle,
the client side never reaches the engine, speed settings out of `inversion`, and no sys.path edits."""

import ast
import re
from pathlib import Path

import yaml

from gradinv.pipeline.config import EngineConfig, InversionConfig
from gradinv.pipeline.sources import PROJECT_ROOT, _imported_names, module_closure, module_file
from tests.conftest import REPO

LIBRARY = REPO / "gradinv"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_imports() -> dict[str, set[str]]:
    """{module: the library modules it imports}, function-level imports included."""
    graph = {}
    for path in LIBRARY.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = _imported_names(ast.parse(path.read_text()), package)
        graph[name] = {m for m in imported if m != name and m.startswith("gradinv") and module_file(m) is not None}
    return graph


def test_no_library_module_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in LIBRARY.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_the_library_has_no_import_cycle():
    graph = _library_imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph.get(module, ())):
            assert imported not in path, "import cycle: " + " -> ".join(path[path.index(imported):] + [imported])
            if imported not in done:
                visit(imported, path + [imported])
        done.add(module)

    for module in sorted(graph):
        visit(module, [module])


def test_the_client_side_never_reaches_the_engine_or_the_attack():
    for path in (LIBRARY / "client").glob("*.py"):
        reached = module_closure(_module_name(path))
        assert not {m for m in reached if m.startswith(("gradinv.engine", "gradinv.attack."))}, path.name


def test_the_import_walker_follows_function_level_imports_and_skips_type_checking_blocks():
    # config.py imports the defenses inside a function; audit.py imports config only for type checking.
    assert "gradinv.client.defenses" in module_closure("gradinv.pipeline.config")
    assert "gradinv.pipeline.config" not in module_closure("gradinv.pipeline.audit")
    # Importing a submodule runs its packages' __init__ first.
    assert {"gradinv", "gradinv.engine"} <= module_closure("gradinv.engine.policy")


def test_inversion_holds_no_speed_setting_and_params_yaml_follows_the_sections():
    inversion = set(InversionConfig.__dataclass_fields__)
    engine = set(EngineConfig.__dataclass_fields__)
    assert not inversion & engine
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(params["inversion"]) <= inversion
    assert set(params["engine"]) <= engine
    for speed_only in ("device", "seed_workers", "seed_batch", "cuda_graph", "tf32", "keep_freed_memory",
                       "bn_double_backward", "precision"):
        assert speed_only not in params["inversion"] and speed_only in engine


def test_no_sys_path_edits_in_benchmarks_or_tests():
    edits = [str(p.relative_to(REPO)) for folder in ("benchmarks", "tests") for p in (REPO / folder).rglob("*.py")
             if re.search(r"sys\.path\.(insert|append)|sys\.path\s*\+?=", p.read_text()) and p.name != "test_layout.py"]
    assert not edits


def test_the_project_root_the_walker_uses_is_this_checkout():
    assert PROJECT_ROOT == REPO
