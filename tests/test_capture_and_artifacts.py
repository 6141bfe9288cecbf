import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from gradinv.client.artifacts import META_FILE, TENSOR_FILE, load_gradient, save_gradient
from gradinv.client.capture import TRUTH_FILE, draw_batch
from gradinv.client.data import ImageSet, normalize
from gradinv.client.models import batchnorm_layers
from gradinv.client.victim import load_victim
from gradinv.commit import MANIFEST, write_manifest
from gradinv.errors import UserError
from gradinv.io import read_tensors, write_tensors
from gradinv.pipeline.cli import main
from gradinv.pipeline.stages import GRADIENT, LABELS, TRUTH, VICTIM
from tests.conftest import write_params


def test_draw_batch_gives_distinct_labels_reproducibly():
    pool = ImageSet(torch.zeros(40, 3, 4, 4, dtype=torch.uint8), torch.arange(10).repeat(4))
    a = draw_batch(pool, 8, True, torch.Generator().manual_seed(5))
    b = draw_batch(pool, 8, True, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and len(set(pool.labels[a].tolist())) == 8
    with pytest.raises(UserError, match="exceeds the 10 classes"):
        draw_batch(pool, 11, True, torch.Generator())


def _truth(root):
    truth = read_tensors(root / TRUTH / TRUTH_FILE, "truth")
    model, meta = load_victim(root / VICTIM)
    return model, meta, normalize(truth["images"], meta.mean, meta.std), truth["labels"]


def test_captured_gradient_equals_an_independent_train_mode_backward(tiny_project):
    model, meta, images, labels = _truth(tiny_project)
    artifact = load_gradient(tiny_project / GRADIENT, model)
    reference = load_victim(tiny_project / VICTIM)[0].train()
    F.cross_entropy(reference(images), labels).backward()
    for name, param in reference.named_parameters():
        assert torch.allclose(artifact.grads[name], param.grad, rtol=1e-4, atol=1e-6), name
    assert artifact.meta["batch_size"] == len(labels) == 4


def test_leaked_bn_statistics_are_the_batch_statistics(tiny_project):
    model, _, images, _ = _truth(tiny_project)
    artifact = load_gradient(tiny_project / GRADIENT, model)
    first = next(iter(batchnorm_layers(model)))
    stem = model.conv1(images)  # resnet: the first BN normalises conv1's output
    assert torch.allclose(artifact.bn_mean[first], stem.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(artifact.bn_var[first], stem.var((0, 2, 3), unbiased=False), atol=1e-5)


def test_capture_does_not_move_the_victims_running_statistics(tiny_project):
    model, _ = load_victim(tiny_project / VICTIM)
    before = {n: bn.running_mean.clone() for n, bn in batchnorm_layers(model).items()}
    from gradinv.client.step import parameter_gradients, train_mode_copy

    parameter_gradients(train_mode_copy(model), torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    for name, bn in batchnorm_layers(model).items():
        assert torch.equal(bn.running_mean, before[name])


def test_ground_truth_is_kept_apart_from_the_shared_artifact(tiny_project):
    shared = sorted(p.name for p in (tiny_project / GRADIENT).iterdir())
    assert shared == [META_FILE, TENSOR_FILE, MANIFEST]
    assert all(not k.startswith(("images", "labels")) for k in read_tensors(tiny_project / GRADIENT / TENSOR_FILE, "g"))


def _broken(root, how):
    """Break the artifact as its maker could: the manifest is rewritten to match, so only the
    loader's own checks stand between the broken file and the attack."""
    _break(root, how)
    write_manifest(root / GRADIENT)


def _break(root, how):
    tensors = read_tensors(root / GRADIENT / TENSOR_FILE, "g")
    meta = json.loads((root / GRADIENT / META_FILE).read_text())
    key = next(k for k in tensors if k.startswith("grad."))
    if how == "garbage":
        (root / GRADIENT / TENSOR_FILE).write_bytes(b"\x00not a safetensors file at all")
        return
    if how == "nan":
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
    elif how == "shape":
        tensors[key] = tensors[key].flatten()[:-1].clone()
    elif how == "missing":
        del tensors[key]
    elif how == "extra":
        tensors["grad.nonexistent"] = torch.zeros(3)
    elif how == "arch":
        meta["num_classes"] = 99
    elif how == "json":
        (root / GRADIENT / META_FILE).write_text("{not json")
        return
    write_tensors(root / GRADIENT / TENSOR_FILE, tensors)
    (root / GRADIENT / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("how, fragment", [
    ("garbage", "not a readable safetensors file"),
    ("nan", "contains NaN or infinite values"),
    ("shape", "has shape"),
    ("missing", "lacks the entry"),
    ("extra", "'grad.nonexistent'"),
    ("arch", "does not match the model: its num_classes is 99"),
    ("json", "is not valid JSON"),
])
def test_corrupt_or_mismatched_artifact_exits_2_with_one_sentence_and_writes_nothing(project_copy, capsys, how, fragment):
    root = project_copy
    shutil.rmtree(root / LABELS)
    _broken(root, how)
    code = main(["--params", str(write_params(root / "params.yaml")), "--root", str(root), "labels"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and fragment in err[0], err
    assert not (root / LABELS).exists()


def test_artifact_round_trips(tiny_project, tmp_path):
    model, _ = load_victim(tiny_project / VICTIM)
    artifact = load_gradient(tiny_project / GRADIENT, model)
    save_gradient(artifact, tmp_path)
    again = load_gradient(tmp_path, model)
    assert again.meta == artifact.meta
    assert all(torch.equal(again.grads[n], artifact.grads[n]) for n in artifact.grads)
