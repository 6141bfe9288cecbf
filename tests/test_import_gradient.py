"""`gradinv import-gradient`: gradients and weight updates written by plain torch code (as another
FL framework would) become the project's artifacts, and labels and inversion run on them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from gradinv.client.artifacts import load_gradient
from gradinv.client.victim import load_victim
from gradinv.io import read_tensors
from gradinv.pipeline.cli import main
from gradinv.pipeline.stages import GRADIENT, INVERT, LABELS, TRUTH, VICTIM
from tests.conftest import write_params

CLASSES, BATCH, SIZE, LR = 10, 4, 16, 0.1


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One FedSGD client step in plain torch: weights file, true labels, the gradient (with the
    batch's BN statistics), and the weights before and after one SGD step."""
    folder = tmp_path_factory.mktemp("client")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=CLASSES)
    torch.save(model.state_dict(), folder / "weights.pt")
    old = {k: v.clone() for k, v in model.state_dict().items()}

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    labels = torch.randperm(CLASSES, generator=generator)[:BATCH]
    bn_stats = {}

    def record(name):
        def hook(_module, inputs, _output):
            x = inputs[0].detach()
            bn_stats[f"bn_mean.{name}"] = x.mean((0, 2, 3))
            bn_stats[f"bn_var.{name}"] = x.var((0, 2, 3), unbiased=False)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(record(name))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    new = model.state_dict()
    return {"folder": folder, "weights": folder / "weights.pt", "labels": sorted(labels.tolist()), "grads": grads,
            "bn": bn_stats, "old": old, "new": {k: v.clone() for k, v in new.items()}}


def _import(root, tensor_file, weights, *extra) -> int:
    return main(["import-gradient", "--arch", "resnet18", "--weights", str(weights), "--num-classes", str(CLASSES),
                 "--gradient", str(tensor_file), "--batch-size", str(BATCH), "--input-size", str(SIZE),
                 "--root", str(root), *extra])


@pytest.mark.slow
@pytest.mark.parametrize("bn_leak", ["none", "exact"])
def test_imported_gradient_runs_labels_and_inversion(client, tmp_path, capsys, bn_leak):
    tensors = dict(client["grads"]) | (client["bn"] if bn_leak == "exact" else {})
    torch.save(tensors, tmp_path / "gradient.pt")
    root = tmp_path / "project"
    assert _import(root, tmp_path / "gradient.pt", client["weights"], "--bn-leak", bn_leak) == 0

    model, victim = load_victim(root / VICTIM)
    assert victim.input_shape == [3, SIZE, SIZE] and json.loads((root / VICTIM / "model.json").read_text())["source"] == "imported"
    artifact = load_gradient(root / GRADIENT, model)
    assert artifact.batch_size == BATCH and artifact.meta["bn_leak"] == bn_leak
    for name, grad in client["grads"].items():
        assert torch.equal(artifact.grads[name], grad), name
    if bn_leak == "exact":
        assert all(torch.equal(artifact.bn_mean[k.removeprefix("bn_mean.")], v) for k, v in client["bn"].items() if k.startswith("bn_mean."))
    assert not (root / TRUTH).exists()

    params = write_params(tmp_path / "params.yaml", {"inversion": {"bn_prior": "exact" if bn_leak == "exact" else "none"}})
    for stage in ("labels", "invert"):
        assert main(["--params", str(params), "--root", str(root), stage]) == 0
    assert json.loads((root / LABELS / "labels.json").read_text())["labels"] == client["labels"]
    reconstruction = read_tensors(root / INVERT / "reconstruction.safetensors", "reconstruction")
    assert reconstruction["chosen"].shape == (BATCH, 3, SIZE, SIZE)
    assert reconstruction["seeds"].shape == (2, BATCH, 3, SIZE, SIZE)

    capsys.readouterr()
    assert main(["--params", str(params), "--root", str(root), "evaluate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "imported gradient has none" in err[0], err


def test_weight_update_imports_as_the_same_gradient(client, tmp_path):
    # As a DDP-wrapped client would save it: 'module.' prefixes, BN buffers included.
    update = {f"module.{k}": client["new"][k] - client["old"][k] for k in client["new"]}
    save_file(update, str(tmp_path / "update.safetensors"))
    root = tmp_path / "project"
    (root / TRUTH).mkdir(parents=True)  # left by an earlier capture: it belongs to another gradient
    assert _import(root, tmp_path / "update.safetensors", client["weights"], "--update", "--lr", str(LR)) == 0
    assert not (root / TRUTH).exists()

    artifact = load_gradient(root / GRADIENT, load_victim(root / VICTIM)[0])
    eps = torch.finfo(torch.float32).eps
    for name, grad in client["grads"].items():
        # new = fl(old - lr g) and new - old carry float32 rounding of |old| and lr |g|; dividing by lr scales it.
        bound = eps * (client["old"][name].abs() + 3 * LR * grad.abs()) / LR + eps * grad.abs()
        assert ((artifact.grads[name] - grad).abs() <= bound).all(), name
    assert artifact.meta["imported_from"]["kind"] == "update"


class _Trap:
    """Unpickling this would create a file: a torch.load without weights_only would run it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_file(client, tmp_path, how):
    grads = {k: v.clone() for k, v in client["grads"].items()}
    if how == "shape":
        grads["fc.weight"] = torch.zeros(CLASSES - 1, 512)
    elif how == "nan":
        grads["conv1.weight"][0, 0, 0, 0] = float("nan")
    elif how == "missing":
        del grads["fc.bias"]
    elif how == "extra":
        grads["decoder.weight"] = torch.zeros(3)
    elif how == "integer":
        grads["fc.bias"] = torch.zeros(CLASSES, dtype=torch.int64)
    elif how == "list":
        grads = list(grads.values())
    elif how == "object":
        grads = _Trap(tmp_path / "unpickled")
    path = tmp_path / "gradient.pt"
    torch.save(grads, path)
    return path


@pytest.mark.parametrize("how, extra, fragment", [
    ("shape", [], "entry 'fc.weight' has shape (9, 512), the model needs (10, 512)"),
    ("nan", [], "entry 'conv1.weight' contains NaN"),
    ("missing", [], "lacks the entry 'fc.bias'"),
    ("extra", [], "has the entry 'decoder.weight'"),
    ("integer", [], "entry 'fc.bias' has dtype torch.int64"),
    ("list", [], "holds a list, not a dict"),
    ("object", [], "cannot be read by torch.load(weights_only=True)"),
    ("good", ["--update"], "--lr is required with --update"),
    ("good", ["--lr", "0.1"], "--lr applies only to a weight update"),
    ("good", ["--update", "--lr", "0"], "--lr must be a positive number"),
    ("good", ["--bn-leak", "exact"], "lacks the entry 'bn_mean.bn1'"),
    ("good", ["--mean", "0", "0", "0", "--std", "1", "0", "1"], "--std must be 3 positive numbers"),
])
def test_bad_imports_exit_2_with_one_line_and_write_nothing(client, tmp_path, capsys, how, extra, fragment):
    path = _bad_file(client, tmp_path, how)
    root = tmp_path / "project"
    assert _import(root, path, client["weights"], *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    if how != "good":
        assert str(path) in err[0]
    assert not root.exists()
    assert not (tmp_path / "unpickled").exists()


def test_bad_flags_name_the_flag(client, tmp_path, capsys):
    torch.save(client["grads"], tmp_path / "gradient.pt")
    code = main(["import-gradient", "--arch", "resnet18", "--weights", str(client["weights"]), "--num-classes", "7",
                 "--gradient", str(tmp_path / "gradient.pt"), "--batch-size", "0", "--input-size", str(SIZE),
                 "--root", str(tmp_path / "project")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--batch-size" in err[0], err
    code = main(["import-gradient", "--arch", "resnet18", "--weights", str(client["weights"]), "--num-classes", "7",
                 "--gradient", str(tmp_path / "gradient.pt"), "--batch-size", "4", "--input-size", str(SIZE),
                 "--root", str(tmp_path / "project")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not fit the model" in err[0], err
    assert not (tmp_path / "project").exists()
