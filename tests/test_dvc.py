"""dvc.yaml follows the stage registry, and `dvc repro` reruns exactly the stale stages."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gradinv.pipeline.stages import STAGES
from tests.conftest import REPO, write_params

TASK_SOURCES = ["gradinv/pipeline/stages.py", "tasks/stages.py", "tasks/caching.py"]  # what runs every stage


def test_dvc_yaml_declares_exactly_the_registry():
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(declared) == list(STAGES)
    for name, stage in STAGES.items():
        entry = declared[name]
        assert entry["cmd"] == f"python -m flows.pipeline --stage {name}"
        assert entry["deps"] == [*stage.inputs, *stage.sources]
        assert set(TASK_SOURCES) <= set(stage.sources)
        assert entry["params"] == [stage.section, *(["engine.precision"] if stage.uses_engine else []), "preset", "presets"]
        assert entry["outs"] == list(stage.outputs)
        for dep in entry["deps"]:  # regenerate with: python scripts/write_dvc_yaml.py > dvc.yaml
            assert dep.startswith("data/") or (REPO / dep).is_file(), dep


def _ran(output: str) -> list[str]:
    return [name for name in STAGES if f"Running stage '{name}'" in output]


def _project(tmp_path: Path, prefect_api_url: str, data: Path):
    """A copy of the code, dvc.yaml, tiny params and their stages' outputs, and a runner of commands inside it."""
    root = tmp_path / "project"
    root.mkdir()
    for folder in ("gradinv", "tasks", "flows"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(data, root / "data")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_API_URL": prefect_api_url, "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}

    def run(*args):
        command = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    return root, run


@pytest.mark.slow
def test_an_experiment_records_its_metrics_and_repro_then_reruns_only_stale_stages(tmp_path, prefect_api_url,
                                                                                  tiny_project):
    """The documented sweep, `dvc exp run -S ...` in a git repository, then plain `dvc repro` on its
    workspace. The baseline is the tiny project's outputs, which are those of these params, recorded
    with `dvc commit`: every stage run costs ~20 s (a process importing torch, Prefect and MLflow)."""
    root, run = _project(tmp_path, prefect_api_url, tiny_project / "data")
    baseline = json.loads((root / "data/eval/metrics.json").read_text())
    (root / ".gitignore").write_text("__pycache__/\n/data/*\n")
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "commit", "-f", "-q")  # fails unless every stage's declared outputs and inputs exist
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "baseline")
    assert _ran(run("dvc", "repro")) == []
    assert _ran(run("dvc", "exp", "run", "-n", "it4", "-S", "inversion.iterations=4")) == ["invert", "evaluate"]

    shown = json.loads(run("dvc", "exp", "show", "--json"))
    experiments = [exp for commit in shown for exp in (commit.get("experiments") or [])]
    (it4,) = [exp for exp in experiments if exp["name"] == "it4"]
    data = it4["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["inversion"]["iterations"] == 4
    metrics = data["metrics"]["data/eval/metrics.json"]["data"]
    assert metrics["psnr"] > 0 and metrics["psnr"] != baseline["psnr"]  # 4 iterations instead of 6
    # The workspace holds the experiment's results; the baseline params are untouched in git.
    assert json.loads((root / "data/eval/metrics.json").read_text())["psnr"] == metrics["psnr"]
    assert "iterations: 6" in run("git", "show", "HEAD:params.yaml")

    assert _ran(run("dvc", "repro")) == []
    write_params(root / "params.yaml", {"inversion": {"iterations": 4}, "evaluation": {"registration_max_shift": 0}})
    assert _ran(run("dvc", "repro")) == ["evaluate"]
    rerun = json.loads((root / "data/eval/metrics.json").read_text())
    assert rerun["registered_psnr"] == rerun["psnr"] == metrics["psnr"]  # no shift allowed: registration is the identity
