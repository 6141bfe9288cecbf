"""Metadata cannot run code: an artifact's `package.module:callable` model is imported only when
the user named the same spec (gradinv.trust)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from gradinv import trust
from gradinv.client.victim import load_victim
from gradinv.commit import write_manifest
from gradinv.errors import UserError
from gradinv.pipeline.cli import main
from gradinv.pipeline.stages import LABELS, VICTIM
from tests.conftest import write_params

MODULE = """
from pathlib import Path
Path({marker!r}).write_text("imported")
import torchvision
def build(num_classes):
    return torchvision.models.resnet18(num_classes=num_classes)
"""


@pytest.fixture
def planted(tiny_project, tmp_path, monkeypatch):
    """A copy of the tiny project whose model.json names a module that marks its own import."""
    name = f"planted_{tmp_path.name}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(trust, "_USER_NAMED_CODE", set())
    root = tmp_path / "project"
    shutil.copytree(tiny_project / "data", root / "data")
    info = json.loads((root / VICTIM / "model.json").read_text())
    info["arch"] = f"{name}:build"
    (root / VICTIM / "model.json").write_text(json.dumps(info))
    write_manifest(root / VICTIM)  # consistent: the folder's maker chose the spec
    yield root, info["arch"], marker
    sys.modules.pop(name, None)


def test_an_artifact_naming_code_is_refused_before_any_import(planted):
    root, spec, marker = planted
    with pytest.raises(UserError, match=f"names the model '{spec}', which would import and run code"):
        load_victim(root / VICTIM)
    assert not marker.exists()


def test_the_labels_stage_refuses_it_with_one_sentence_and_exit_2(planted, capsys):
    root, spec, marker = planted
    shutil.rmtree(root / LABELS)
    assert main(["--params", str(write_params(root / "params.yaml")), "--root", str(root), "labels"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"victim.arch: '{spec}'" in err[0]
    assert not marker.exists() and not (root / LABELS).exists()


def test_a_spec_the_user_names_in_params_yaml_is_imported(planted):
    root, spec, marker = planted
    from gradinv.pipeline.config import load_params

    load_params(write_params(root / "params.yaml", {"victim": {"arch": spec}}))
    model, meta = load_victim(root / VICTIM)
    assert marker.exists() and meta.arch == spec and type(model).__name__ == "ResNet"
