"""Shared fixtures: a tiny project (16 px images, a one-epoch victim) built once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Prefect keeps results and cache records under PREFECT_HOME: a fresh one per test session, and one
# per process that imports this module (Dask workers), inside the session's so that it goes with it.
_SESSION_HOME = os.environ.get("GRADINV_TESTS_PREFECT_HOME")
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="gradinv-prefect-", dir=_SESSION_HOME)
if _SESSION_HOME is None:
    os.environ["GRADINV_TESTS_PREFECT_HOME"] = os.environ["PREFECT_HOME"]
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "data": {"resolution": 16, "train_per_class": 12, "pool_per_class": 4, "seed": 0},
    "victim": {"epochs": 2, "batch_size": 32, "lr": 0.05, "seed": 0, "device": "cpu"},
    "capture": {"batch_size": 4, "seed": 1},
    "labels": {"strategy": "yin"},
    "inversion": {"iterations": 6, "seeds": 2, "warmup": 2, "log_every": 2},
    "engine": {"device": "cpu", "precision": "float32"},  # dvc.yaml declares engine.precision for invert
    "evaluation": {"match_distance": "mse"},
}


def write_params(path: Path, overrides: dict | None = None) -> Path:
    params = {section: dict(values) for section, values in TINY_PARAMS.items()}
    for section, values in (overrides or {}).items():
        params.setdefault(section, {}).update(values)
    params.update({"preset": "fast", "presets": {"fast": {}}})
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A project folder whose data/ holds every stage's output, made by the library alone."""
    from gradinv.pipeline.config import load_params
    from gradinv.pipeline.stages import STAGES

    root = tmp_path_factory.mktemp("tiny")
    params = load_params(write_params(root / "params.yaml"))
    for stage in STAGES.values():
        stage.run(params[stage.section], root, None, params["engine"])
    return root


@pytest.fixture
def attack(tiny_project):
    """The tiny project's victim, its gradient artifact, the true batch (normalised) and labels."""
    from gradinv.client.artifacts import load_gradient
    from gradinv.client.capture import TRUTH_FILE
    from gradinv.client.data import normalize
    from gradinv.client.victim import load_victim
    from gradinv.io import read_tensors
    from gradinv.pipeline.stages import GRADIENT, TRUTH, VICTIM

    model, meta = load_victim(tiny_project / VICTIM)
    artifact = load_gradient(tiny_project / GRADIENT, model)
    truth = read_tensors(tiny_project / TRUTH / TRUTH_FILE, "truth")
    return model, meta, artifact, normalize(truth["images"], meta.mean, meta.std), truth["labels"]


@pytest.fixture
def attack64(attack):
    """`attack` in float64 (model, gradient artifact and images): where a test holds two formulas to
    each other exactly. The test victim's BatchNorm layers normalise 4 values per channel at
    1×1 px, so ill-conditioned that float32 rounding alone moves an image gradient by ~2e-4."""
    import copy

    from gradinv.client.artifacts import GradientArtifact

    model, meta, artifact, images, labels = attack
    double = lambda tensors: {n: t.double() for n, t in tensors.items()}  # noqa: E731
    return (copy.deepcopy(model).double(), meta,
            GradientArtifact(double(artifact.grads), artifact.meta, double(artifact.bn_mean), double(artifact.bn_var)),
            images.double(), labels)


@pytest.fixture
def project_copy(tiny_project, tmp_path) -> Path:
    """A private copy of the tiny project, for tests that break or rewrite its files."""
    root = tmp_path / "project"
    shutil.copytree(tiny_project, root)
    return root


@pytest.fixture(scope="session")
def prefect_api_url():
    """A Prefect server for the whole session (started once: it takes several seconds)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def flows_project(tiny_project, tmp_path_factory) -> Path:
    """One copy of the tiny project per test module for its flows: the first trains the victim, the
    others find it cached. Each flow writes its own folder under data/."""
    root = tmp_path_factory.mktemp("flows") / "project"
    shutil.copytree(tiny_project, root)
    return root


@pytest.fixture(scope="module")
def shared_cluster(prefect_api_url):
    """A two-worker cluster started once, which flows reach through `batches.address` (as a
    cluster started by hand): its workers load torch and the code once for every flow."""
    from distributed import LocalCluster

    with mock.patch.dict(os.environ, {"PREFECT_API_URL": prefect_api_url}):  # workers report to the tests' server
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
    with cluster:
        yield cluster
