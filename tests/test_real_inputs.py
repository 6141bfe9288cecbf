"""The `paper` preset on a user's ImageFolder tree and a torchvision-style weights file, with
nothing changed in params.yaml but the three paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from gradinv.pipeline.config import load_params
from gradinv.pipeline.stages import STAGES
from tests.conftest import REPO

CLASSES = [f"n{i:08d}" for i in range(9)]  # synset-style folder names, as in ImageNet


def _tree(root, per_class, rng):
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (int(rng.integers(230, 300)), int(rng.integers(230, 300)))
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name / f"{name}_{i}.JPEG")


@pytest.mark.slow
def test_paper_preset_runs_on_an_imagefolder_and_a_pth_weights_file(tmp_path):
    rng = np.random.default_rng(0)
    _tree(tmp_path / "imagenet/train", 1, rng)
    _tree(tmp_path / "imagenet/val", 2, rng)
    torch.manual_seed(0)
    weights = tmp_path / "cache/resnet50-test.pth"  # what torch.hub keeps: a plain state dict
    weights.parent.mkdir()
    torch.save(torchvision.models.resnet50(num_classes=len(CLASSES)).state_dict(), weights)

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw["preset"] == "fast"
    raw["preset"] = "paper"
    paper = raw["presets"]["paper"]
    paper["data"].update(train_dir=str(tmp_path / "imagenet/train"), pool_dir=str(tmp_path / "imagenet/val"))
    paper["victim"]["weights"] = str(weights)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(tmp_path / "params.yaml")
    assert (params["victim"].arch, params["data"].resolution, params["inversion"].iterations,
            params["inversion"].seeds, params["capture"].batch_size) == ("resnet50", 224, 20000, 8, 8)

    project = tmp_path / "project"
    for name in ("prepare", "train", "capture", "labels"):
        STAGES[name].run(params[STAGES[name].section], project, None, params["engine"])

    victim = json.loads((project / "data/victim/model.json").read_text())
    assert victim["arch"] == "resnet50" and victim["input_shape"] == [3, 224, 224]
    assert victim["classes"] == CLASSES
    truth = json.loads((project / "data/capture/truth/truth.json").read_text())
    recovered = json.loads((project / "data/labels/labels.json").read_text())["labels"]
    assert sorted(recovered) == sorted(truth["labels"]) and len(recovered) == 8
