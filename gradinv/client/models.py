"""Building models by name and moving their weights in and out of safetensors files."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torchvision
from torch import nn

from gradinv.errors import UserError
from gradinv.io import read_tensors, write_tensors
from gradinv.trust import check_named_code

NORMS = ("batch", "group")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm in place of BatchNorm: 32 groups (fewer for narrow layers), as DP-SGD needs
    samples that do not see each other's statistics."""
    return nn.GroupNorm(min(32, channels), channels)


def build_model(arch: str, num_classes: int, named_by: str | None = None, norm: str = "batch") -> nn.Module:
    """A torchvision classifier by name (random weights), or `package.module:callable(num_classes=...)`.
    `norm` group builds a torchvision model with GroupNorm layers instead of BatchNorm.
    `named_by` is the artifact file whose metadata gave `arch`: its code spec is imported only
    if the user named the same spec, since an artifact folder may come from anyone."""
    if not isinstance(arch, str):
        raise UserError(f"model {arch!r} is not a model name.")
    if norm not in NORMS:
        raise UserError(f"model normalisation {norm!r} is not one of {', '.join(NORMS)}.")
    if named_by is not None:
        check_named_code(arch, named_by)
    if ":" in arch and norm != "batch":
        raise UserError(f"'victim.norm: {norm}' applies to torchvision models; model '{arch}' is your own code, "
                        "so build its normalisation into it and leave victim.norm at batch.")
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise UserError(f"model '{arch}' cannot be imported ({err}).") from None
        if not callable(factory):
            raise UserError(f"model '{arch}' names a {type(factory).__name__}, not a callable that builds a model.")
        try:
            model = factory(num_classes=num_classes)
        except Exception as err:  # noqa: BLE001 - user code: any failure means no model
            first = str(err).strip().splitlines()[0] if str(err).strip() else "no message"
            raise UserError(f"model '{arch}' fails when called with num_classes={num_classes} "
                            f"({type(err).__name__}: {first}).") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"model '{arch}' returns a {type(model).__name__}, not a torch nn.Module.")
        return model
    options = {"norm_layer": group_norm} if norm == "group" else {}
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **options)
    except ValueError:
        raise UserError(f"model '{arch}' is neither a torchvision model name nor 'package.module:callable'.") from None
    except TypeError:
        raise UserError(f"torchvision's '{arch}' takes no norm_layer, so 'victim.norm: group' cannot build it "
                        "(the resnet family can).") from None


def load_weights(model: nn.Module, path: str | Path, verify: bool = False) -> nn.Module:
    """Load a safetensors file or a plain state dict (never unpickling arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        state = read_tensors(path, "weights file", verify)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure here means the file is unusable
            raise UserError(f"weights file {path} cannot be read as a state dict ({err}).") from None
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} holds a {type(state).__name__}, not a state dict of names to tensors.")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.layout != torch.strided:
            raise UserError(f"weights file {path} entry {name!r} is a {tensor.layout} tensor; only dense tensors load.")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"weights file {path} holds NaN or infinite values in {name!r}.")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UserError(f"weights file {path} does not fit the model ({first}).") from None
    return model


def save_weights(model: nn.Module, path: str | Path) -> Path:
    return write_tensors(path, dict(model.state_dict()))


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last nn.Linear in registration order: the classifier head label recovery needs."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("label recovery needs a final nn.Linear layer, and the model has none.")
    return linears[-1]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}' is not a torch device name (auto, cpu, cuda, cuda:0, ...).") from None


@torch.no_grad()
def penultimate_features(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The input of the model's final Linear layer (ResNet: the avgpool output), in eval mode."""
    _, head = final_linear(model)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].flatten(1)))
    try:
        model.eval()
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured)
