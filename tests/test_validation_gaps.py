"""Bad inputs that used to end in a traceback or a silent wrong result: each is a one-sentence UserError."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from gradinv.client.artifacts import META_FILE, GradientArtifact, gradient_meta, load_gradient, save_gradient
from gradinv.client.metadata import physical_memory
from gradinv.client.models import build_model, load_weights, save_weights
from gradinv.errors import UserError
from gradinv.io import write_tensors
from gradinv.pipeline.cli import main
from gradinv.pipeline.config import load_params
from tests.conftest import write_params

CLASSES, SIZE = 4, 16


class Tiny(nn.Module):
    """Conv, BatchNorm (with its integer num_batches_tracked buffer) and a linear head."""

    def __init__(self, num_classes: int = CLASSES):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_params_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("inversion:\n  lr: 0.1  # café\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8") as err:
        load_params(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("section, key, value", [
    ("inversion", "lr", math.inf),
    ("victim", "weight_decay", math.inf),
    ("audit", "fedavg_lr", math.inf),
    ("audit", "noise_sigmas", [0.0, math.inf]),
    ("inversion", "layer_weights", {"conv1": math.nan}),
])
def test_non_finite_numbers_in_params_are_refused(tmp_path, section, key, value):
    path = write_params(tmp_path / "params.yaml", {section: {key: value}})
    with pytest.raises(UserError, match=f"'{section}.{key}' must hold finite numbers"):
        load_params(path)


@pytest.mark.parametrize("key, value", [
    ("std", [1.0, 1.0, math.nan]),
    ("std", [True, True, True]),
    ("mean", [True, 0.5, 0.5]),
    ("mean", ["a", "b", "c"]),
    ("mean", [0.5, 0.5]),
])
def test_data_normalisation_must_be_three_finite_numbers(tmp_path, key, value):
    path = write_params(tmp_path / "params.yaml", {"data": {key: value}})
    with pytest.raises(UserError, match=f"'data.{key}'"):
        load_params(path)


def _gradient(folder, **changes):
    """A gradient artifact of the Tiny model (no BN leak) with `changes` to its metadata, and the model."""
    model = Tiny()
    generator = torch.Generator().manual_seed(0)
    grads = {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}
    meta = gradient_meta("tests:Tiny", CLASSES, [3, SIZE, SIZE], [0.5] * 3, [0.25] * 3, 2, "none")
    save_gradient(GradientArtifact(grads, {**meta, **changes}), folder)
    return folder, model


def test_valid_gradient_metadata_loads(tmp_path):
    folder, model = _gradient(tmp_path / "gradient")
    assert load_gradient(folder, model).batch_size == 2


@pytest.mark.parametrize("key, value", [
    ("mean", ["a", "b", "c"]),
    ("mean", [0.5, 0.5]),
    ("std", [0, 0, 0]),
    ("std", [1, 1, math.nan]),
    ("input_shape", [3, SIZE]),
    ("input_shape", [3, SIZE, "16"]),
    ("input_shape", [3, 0, SIZE]),
    ("input_shape", [1, SIZE, SIZE]),
    ("num_classes", "4"),
    ("num_classes", 0),
    ("batch_size", True),
])
def test_bad_gradient_metadata_is_refused(tmp_path, key, value):
    folder, model = _gradient(tmp_path / "gradient", **{key: value})
    with pytest.raises(UserError, match=f"{META_FILE} has '{key}'"):
        load_gradient(folder, model)


def test_gradient_batch_larger_than_memory_is_refused(tmp_path):
    folder, model = _gradient(tmp_path / "gradient", batch_size=physical_memory() // (3 * SIZE * SIZE * 4) + 1)
    with pytest.raises(UserError, match=r"needs \d+\.\d GiB, more than this machine's \d+\.\d GiB"):
        load_gradient(folder, model)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("name, value", [("conv.weight", math.nan), ("bn.running_var", math.inf)])
def test_weights_with_nan_or_inf_are_refused(tmp_path, suffix, name, value):
    state = Tiny().state_dict()
    assert not state["bn.num_batches_tracked"].is_floating_point()
    state[name].view(-1)[0] = value
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        write_tensors(path, state)
    else:
        torch.save(state, path)
    with pytest.raises(UserError, match=f"weights file {path} holds NaN or infinite values in '{name}'"):
        load_weights(Tiny(), path)


def test_finite_weights_with_integer_buffers_load(tmp_path):
    source = Tiny()
    path = save_weights(source, tmp_path / "model.safetensors")
    loaded = load_weights(Tiny(), path)
    assert torch.equal(loaded.conv.weight, source.conv.weight)


@pytest.mark.parametrize("spec, fragment", [
    ("math:pi", "names a float, not a callable"),
    ("math:sqrt", "fails when called with num_classes=4 (TypeError"),
    ("builtins:dict", "returns a dict, not a torch nn.Module"),
    (":resnet18", "cannot be imported"),
])
def test_bad_model_callables_are_refused(spec, fragment):
    with pytest.raises(UserError, match=f"model '{spec}'") as err:
        build_model(spec, CLASSES)
    assert fragment in str(err.value)


def _import(root, weights, gradient, arch="resnet18") -> int:
    return main(["import-gradient", "--arch", arch, "--weights", str(weights), "--num-classes", str(CLASSES),
                 "--gradient", str(gradient), "--batch-size", "2", "--input-size", str(SIZE), "--root", str(root)])


def test_import_gradient_with_a_non_callable_arch_exits_2(tmp_path, capsys):
    assert _import(tmp_path / "project", tmp_path / "weights.pt", tmp_path / "gradient.pt", arch="math:pi") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model 'math:pi' names a float" in err[0], err
    assert not (tmp_path / "project").exists()


def test_import_gradient_with_a_sparse_tensor_exits_2(tmp_path, capsys):
    model = torchvision.models.resnet18(num_classes=CLASSES)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    generator = torch.Generator().manual_seed(0)
    grads = {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}
    grads["fc.weight"] = grads["fc.weight"].to_sparse()
    torch.save(grads, tmp_path / "gradient.pt")
    assert _import(tmp_path / "project", tmp_path / "weights.pt", tmp_path / "gradient.pt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"gradient file {tmp_path / 'gradient.pt'} entry 'fc.weight'" in err[0], err
    assert "torch.sparse_coo" in err[0]
    assert not (tmp_path / "project").exists()


def test_mlflow_artifacts_land_under_the_root_whatever_the_cwd(tmp_path, monkeypatch):
    from tasks.tracking import tracked_run

    root, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    logged = tmp_path / "labels.json"
    logged.write_text("{}")
    with tracked_run(root, "test", "python -m flows.pipeline") as tracker:
        tracker.artifact(logged, "labels")
    assert [p.relative_to(root).parts[0] for p in root.rglob("labels.json")] == ["mlartifacts"]
    assert list(elsewhere.iterdir()) == []
