"""dvc.yaml follows the stage registry, and `dvc repro` reruns exactly the stale stages."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from gradinv.stages import STAGES
from tests.conftest import REPO, write_params

TASK_SOURCES = ["gradinv/stages.py", "tasks/stages.py", "tasks/caching.py"]


def test_dvc_yaml_declares_exactly_the_registry():
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(declared) == list(STAGES)
    for name, stage in STAGES.items():
        entry = declared[name]
        assert entry["cmd"] == f"python -m flows.pipeline --stage {name}"
        assert entry["deps"] == [*stage.inputs, *stage.sources, *TASK_SOURCES]
        assert entry["params"] == [stage.section, "preset", "presets"]
        assert entry["outs"] == list(stage.outputs)
        for dep in entry["deps"]:  # regenerate with: python scripts/write_dvc_yaml.py > dvc.yaml
            assert dep.startswith("data/") or (REPO / dep).is_file(), dep


def _ran(output: str) -> list[str]:
    return [name for name in STAGES if f"Running stage '{name}'" in output]


def test_dvc_repro_runs_only_stale_stages(tmp_path, prefect_api_url):
    root = tmp_path / "project"
    root.mkdir()
    for folder in ("gradinv", "tasks", "flows"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_API_URL": prefect_api_url, "DVC_NO_ANALYTICS": "1"}

    def dvc(*args):
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    dvc("init", "--no-scm", "-q")
    assert _ran(dvc("repro")) == list(STAGES)
    assert (root / "data/eval/metrics.json").is_file()
    assert _ran(dvc("repro")) == []
    write_params(root / "params.yaml", {"inversion": {"iterations": 4}})
    assert _ran(dvc("repro")) == ["invert", "evaluate"]
