"""Cache keys come from the code: a stage is stale when any module it runs changes, and only then;
engine settings, which change speed only, make nothing stale."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gradinv.pipeline.stages import STAGES
from tasks.caching import stage_key
from tests.conftest import REPO, write_params


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_key_covers_every_project_module_its_entry_loads(name):
    """Independent of the import walker: the project files a fresh interpreter has loaded after
    importing the stage's entry module must all be among the stage's sources."""
    stage = STAGES[name]
    script = ("import sys, " + stage.entry + "\n"
              "print('\\n'.join(sorted(m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None))))")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = [Path(f) for f in loaded.split() if Path(f).is_absolute()]
    ours = {str(f.resolve().relative_to(REPO)) for f in files
            if f.resolve().is_relative_to(REPO) and f.resolve().relative_to(REPO).parts[0] in ("gradinv", "tasks", "flows")}
    assert ours, "nothing of the project was loaded"
    assert ours <= set(stage.sources), sorted(ours - set(stage.sources))


def test_invert_reaches_the_engine_and_the_client_stages_do_not():
    invert = set(STAGES["invert"].sources)
    assert {"gradinv/engine/relu.py", "gradinv/engine/experimental/convolution.py",
            "gradinv/engine/cpu_allocator.py", "gradinv/engine/experimental/bn_elementwise_triton.py"} <= invert
    for name in ("prepare", "train", "capture", "labels", "evaluate"):
        assert not [s for s in STAGES[name].sources if s.startswith("gradinv/engine/")], name


def test_only_result_changing_engine_settings_enter_a_key(tiny_project):
    params = {"iterations": 6}
    key = lambda engine: stage_key("invert", tiny_project, params, engine)  # noqa: E731
    base = key({"device": "cpu"})
    assert key({"device": "cpu", "seed_workers": 1, "seed_batch": 2, "cuda_graph": False, "tf32": False,
                "keep_freed_memory": False, "bn_double_backward": "explicit"}) == base
    assert key({"device": "cpu", "precision": "bfloat16"}) != base
    assert stage_key("labels", tiny_project, {}, None) == stage_key("labels", tiny_project, {}, {"precision": "float16"})


@pytest.mark.slow
def test_editing_a_module_only_invert_reaches_makes_invert_stale_for_prefect_and_dvc(tmp_path, prefect_api_url,
                                                                                     tiny_project):
    root = tmp_path / "project"
    root.mkdir()
    for folder in ("gradinv", "tasks", "flows"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_project / "data", root / "data")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_API_URL": prefect_api_url, "DVC_NO_ANALYTICS": "1"}

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", *args], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    def pipeline() -> dict[str, str]:
        output = run("flows.pipeline", "--stage", "labels", "--stage", "invert")
        return {name: "cached" if f"{name}: cached" in output else "done" for name in ("labels", "invert")}

    def dvc_stale() -> set[str]:
        status = json.loads(run("dvc", "status", "--json"))
        return {name.split(":")[-1] for name in status}

    assert pipeline() == {"labels": "done", "invert": "done"}  # a fresh Prefect cache for this folder
    assert pipeline() == {"labels": "cached", "invert": "cached"}
    run("dvc", "init", "--no-scm", "-q")
    run("dvc", "commit", "-f", "-q")  # the outputs are those of these params
    assert dvc_stale() == set()

    # A speed-only engine setting: nothing is stale, for either.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["engine"].update({"seed_workers": 1, "tf32": False, "bn_double_backward": "explicit"})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert dvc_stale() == set()
    assert pipeline() == {"labels": "cached", "invert": "cached"}

    # engine/relu.py is reached by invert only through engine/policy.py.
    relu = root / "gradinv/engine/relu.py"
    relu.write_text(relu.read_text() + "\n# edited\n")
    assert dvc_stale() == {"invert"}
    assert pipeline() == {"labels": "cached", "invert": "done"}
