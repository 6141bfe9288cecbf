"""README.md and docs/ stay true to the code: the README is short, its figures are rendered from
result files (scripts/write_readme_results.py), every relative link resolves, and the commands,
params keys, defaults, modules and paths the pages name exist as named."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re

import pytest
import yaml

from gradinv.errors import UserError
from gradinv.pipeline.config import SECTIONS, build_section
from tests.conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
MARKDOWN = [README, *sorted(DOCS.glob("*.md"))]
# The pages written by hand for users, whose every command, key and path is checked below. The
# others are written by their own scripts (benchmarks/) or hold measurement narratives.
HOW_TO = [README, *(DOCS / name for name in (
    "pipeline.md", "engine.md", "own-gradient.md", "own-data.md", "defenses.md", "audit.md",
    "batches.md", "scheduling.md", "mlflow.md", "reruns.md", "cli.md"))]
FILE_SUFFIXES = {"json", "yaml", "yml", "py", "md", "png", "html", "parquet", "safetensors", "pth", "pt", "txt",
                 "db", "csv"}


def _script():
    spec = importlib.util.spec_from_file_location("write_readme_results", REPO / "scripts" / "write_readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fenced(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def _without_code(text: str) -> str:
    text = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _inline_code(text: str) -> list[str]:
    text = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", text)


def _code(text: str) -> list[str]:
    """Every piece of code a page shows: fenced blocks and inline spans."""
    return _fenced(text) + _inline_code(text)


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README.md has no section '## {title}'"
    return match.group(1)


def _params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _shipped_value(path: list[str]):
    """The value params.yaml ships for a dotted key, else the config's default (the experimental
    engine keys are not listed in params.yaml); KeyError if the key exists in neither."""
    node = _params()
    for part in path:
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
    else:
        return node
    if len(path) == 2 and path[0] in SECTIONS:
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[path[0]])}
        if path[1] in fields:
            field = fields[path[1]]
            return field.default_factory() if field.default is dataclasses.MISSING else field.default
    raise KeyError(".".join(path))


def _as_value(text: str, like):
    value = yaml.safe_load(text)
    if isinstance(value, str) and isinstance(like, (int, float)) and not isinstance(like, bool):
        value = float(value)  # YAML 1.1 reads 1e-6 as a string
    return value


def test_the_readme_is_at_most_250_lines():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("md, name, result_file, renderer", _script().BLOCKS,
                         ids=[f"{md}:{name}" for md, name, *_ in _script().BLOCKS])
def test_every_figures_block_is_what_the_script_renders_from_its_result_file(md, name, result_file, renderer):
    script = _script()
    shown = script.block_of((REPO / md).read_text(), name)
    assert shown == "\n" + script.render(result_file, renderer) + "\n", \
        f"{md}: block {name} is stale; run `python scripts/write_readme_results.py`"


def test_the_default_results_file_records_its_command_and_machine():
    import json

    results = json.loads((DOCS / "results" / "default.json").read_text())
    assert results["command"] == "make run" and results["machine"] and results["commit"]


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: p.name)
def test_every_relative_link_points_to_an_existing_file(page):
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)", _without_code(page.read_text())):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files {broken}"


def test_the_two_commands_are_the_makefiles_and_ci_runs_the_test_command():
    section = _section(README.read_text(), "The two commands")
    commands = [line.split("#")[0].strip() for block in _fenced(section) for line in block.splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^run: ", makefile, flags=re.M) and re.search(r"^test: ", makefile, flags=re.M)
    assert "make test" in [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    python = re.search(r"Python (\d+\.\d+)\+", section).group(1)
    assert f'requires-python = ">={python}"' in (REPO / "pyproject.toml").read_text()


def test_the_speed_section_is_only_the_generated_table_and_its_link():
    lines = [line for line in _section(README.read_text(), "Speed").splitlines() if line.strip()]
    assert lines[0] == "<!-- speed-table:start -->"
    end = lines.index("<!-- speed-table:end -->")
    assert lines[end + 1:] == ["Details, open targets and how each figure was measured: "
                               "[docs/performance.md](docs/performance.md)."]


def test_the_stage_table_and_picture_follow_the_stage_registry():
    from gradinv.pipeline.stages import STAGES

    text = README.read_text()
    picture = next(line for line in text.splitlines() if line.startswith("prepare ─►"))
    assert [w for w in re.findall(r"[a-z]+", picture) if w in STAGES] == list(STAGES)
    for name, stage in STAGES.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        writes = row.split("|")[4]
        assert all(f"`{out}" in writes for out in stage.outputs), (name, stage.outputs, writes)


@pytest.mark.parametrize("page", HOW_TO, ids=lambda p: p.name)
def test_every_make_target_and_flow_module_named_exists(page):
    phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), flags=re.M).group(1).split()
    code = "\n".join(_code(page.read_text()))
    targets = set(re.findall(r"\bmake ([a-z][\w-]*)", code))
    assert targets <= set(phony), f"{page.name}: not Makefile targets: {targets - set(phony)}"
    for module in re.findall(r"python -m ([\w.]+)", code):
        module = module.rstrip(".")
        if module.split(".")[0] in ("gradinv", "tasks", "flows", "benchmarks", "scripts"):
            base = REPO.joinpath(*module.split("."))
            assert base.with_suffix(".py").is_file() or (base / "__init__.py").is_file(), f"{page.name}: {module}"


@pytest.mark.parametrize("page", HOW_TO, ids=lambda p: p.name)
def test_every_gradinv_command_named_is_one_the_cli_has(page):
    from gradinv.pipeline.stages import STAGES

    known = {*STAGES, "all", "import-gradient"}
    code = "\n".join(_code(page.read_text()))
    named = set(re.findall(r"(?:^|[\s/])gradinv (?:--(?:params|root) \S+ )*([a-z][\w-]*)", code, flags=re.M))
    assert named <= known, f"{page.name}: not gradinv commands: {named - known}"


@pytest.mark.parametrize("page", HOW_TO, ids=lambda p: p.name)
def test_every_params_key_named_exists_and_every_value_shown_is_valid(page):
    for span in _inline_code(page.read_text()):
        match = re.fullmatch(r"((?:presets\.\w+\.)?([a-z_]+)\.([a-z_]+))(?::\s*(.+))?", span)
        if not match or match.group(2) not in SECTIONS or match.group(3) in FILE_SUFFIXES:
            continue
        key, section, name, value = match.groups()
        _shipped_value(key.split("."))  # KeyError: the page names a key the config does not have
        if value is not None and not key.startswith("presets."):
            try:
                build_section(section, {name: yaml.safe_load(value)})
            except UserError as err:
                assert f"'{section}.{name}'" not in str(err), f"{page.name}: `{span}`: {err}"


@pytest.mark.parametrize("page", HOW_TO, ids=lambda p: p.name)
def test_every_default_stated_is_the_one_params_yaml_ships(page):
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", page.read_text(), flags=re.M | re.S)
    for key, stated in re.findall(r"`((?:presets\.\w+\.)?[a-z_]+\.[a-z_]+)` \(default ([^),;]+)", prose):
        shipped = _shipped_value(key.split("."))
        value = _as_value(stated.strip(), shipped)
        assert value == (pytest.approx(shipped) if isinstance(shipped, float) else shipped), \
            f"{page.name}: {key} stated default {stated!r}, params.yaml ships {shipped!r}"


@pytest.mark.parametrize("page", HOW_TO, ids=lambda p: p.name)
def test_every_project_path_and_module_named_exists(page):
    text = page.read_text()
    paths = re.findall(r"(?<![\w/.-])((?:gradinv|tasks|flows|scripts|benchmarks|tests|docs|\.ci)/[\w./+-]*\w)", text)
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"{page.name}: no such files: {missing}"
    for dotted in re.findall(r"`(gradinv(?:\.\w+)+)`", text):
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            base = REPO.joinpath(*parts[:i])
            if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
                break
        obj = importlib.import_module(".".join(parts[:i]))
        for attribute in parts[i:]:
            obj = getattr(obj, attribute)  # AttributeError: the page names what the module lacks


@pytest.mark.parametrize("page", HOW_TO, ids=lambda p: p.name)
def test_every_data_folder_named_is_one_a_stage_or_flow_writes(page):
    from gradinv.pipeline import folders

    written = {value.split("/")[1] for value in vars(folders).values() if isinstance(value, str) and value.startswith("data/")}
    clean = re.search(r"^clean:\n\trm -rf (.*)$", (REPO / "Makefile").read_text(), flags=re.M).group(1).split()
    written |= {p.split("/")[1] for p in clean if p.startswith("data/")}
    assert '".checkpoints"' in (REPO / "gradinv" / "attack" / "inversion.py").read_text()
    written.add(".checkpoints")
    named = set(re.findall(r"(?<![\w/.-])data/([\w.-]+)", page.read_text()))
    assert named <= written, f"{page.name}: data folders nothing writes: {named - written}"


def test_the_engine_page_states_the_constants_of_the_code():
    from gradinv.engine.cuda_graph import WARMUP_CALLS
    from gradinv.engine.policy import BATCHED_IMAGES

    text = (DOCS / "engine.md").read_text()
    for name, value in (("BATCHED_IMAGES", BATCHED_IMAGES), ("WARMUP_CALLS", WARMUP_CALLS)):
        stated = re.findall(rf"`{name}` = (\d+)", text)
        assert stated and all(int(s) == value for s in stated), name


def test_the_engine_pages_table_gives_the_values_params_yaml_ships():
    rows = [line for line in (DOCS / "engine.md").read_text().splitlines() if line.startswith("| `engine.")]
    assert {row.split("`")[1] for row in rows} == {f"engine.{key}" for key in _params()["engine"]}
    for row in rows:
        key, shipped = (cell.strip().strip("`") for cell in row.split("|")[1:3])
        assert yaml.safe_load(shipped) == _params()["engine"][key.split(".")[1]], row


def test_the_engine_page_lists_every_engine_setting_and_the_result_changing_ones():
    from gradinv.pipeline.config import RESULT_CHANGING_ENGINE_SETTINGS, EngineConfig

    text = (DOCS / "engine.md").read_text()
    for field in dataclasses.fields(EngineConfig):
        assert f"`engine.{field.name}" in text, field.name
    listed = set(_params()["engine"])
    experimental = {f.name for f in dataclasses.fields(EngineConfig)} - listed
    for name in experimental:
        assert re.search(rf"^### `engine\.{name}", text, flags=re.M), f"experimental {name} has no section"
    for name in RESULT_CHANGING_ENGINE_SETTINGS:
        assert f"`engine.{name}` changes the result" in text


def test_the_scheduling_page_gives_the_times_prefect_yaml_schedules():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    rows = (DOCS / "scheduling.md").read_text().splitlines()
    for deployment in deployments:
        row = next(line for line in rows if line.startswith(f"| `{deployment['name']}` |"))
        (schedule,) = deployment["schedules"]
        minute, hour, _, _, weekday = schedule["cron"].split()
        assert f"{int(hour):02d}:{int(minute):02d}" in row and schedule["timezone"] == "UTC"
        assert ("every day" if weekday == "*" else "Sundays" if weekday == "0" else "?") in row
