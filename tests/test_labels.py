import pytest
import torch
import torchvision
from torch import nn

from gradinv.artifacts import GradientArtifact, gradient_meta, load_gradient
from gradinv.capture import client_update
from gradinv.errors import UserError
from gradinv.io import read_json
from gradinv.labels import yin_labels
from gradinv.stages import GRADIENT, LABELS, TRUTH, VICTIM
from gradinv.victim import load_victim


def test_pipeline_labels_match_the_truth(tiny_project):
    recovered = read_json(tiny_project / LABELS / "labels.json", "labels")["labels"]
    truth = read_json(tiny_project / TRUTH / "truth.json", "truth")["labels"]
    assert sorted(recovered) == sorted(truth)


@pytest.mark.parametrize("seed", range(5))
def test_yin_rule_recovers_distinct_labels_on_an_untrained_resnet(seed):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=20).eval()
    labels = torch.randperm(20)[:8]
    meta = dict(arch="resnet18", num_classes=20, input_shape=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3)
    artifact = client_update(model, torch.randn(8, 3, 32, 32), labels, "none", meta)
    recovered, scores = yin_labels(model, artifact)
    assert recovered == sorted(labels.tolist())
    assert scores.shape == (20,)


def test_yin_rule_refuses_a_batch_larger_than_the_class_count(tiny_project):
    model, _ = load_victim(tiny_project / VICTIM)
    artifact = load_gradient(tiny_project / GRADIENT, model)
    artifact.meta = {**artifact.meta, "batch_size": 13}
    with pytest.raises(UserError, match="'yin' assumes distinct labels"):
        yin_labels(model, artifact)


def test_label_recovery_needs_a_final_linear_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    artifact = GradientArtifact(grads={}, meta=gradient_meta("x", 4, [3, 8, 8], [0] * 3, [1] * 3, 2, "none"))
    with pytest.raises(UserError, match="needs a final nn.Linear layer"):
        yin_labels(model, artifact)
