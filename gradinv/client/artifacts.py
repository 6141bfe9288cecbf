"""The gradient artifact: what a client shares (plus what leaked with it), and its validation.

On disk: gradient.safetensors with `grad.<parameter>` for every model parameter and, when the
batch statistics leaked (BN_exact), `bn_mean.<layer>` and `bn_var.<layer>` for every BN layer;
gradient.json beside it with the metadata the attacker needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gradinv import __version__
from gradinv.client.defenses import check_declared
from gradinv.client.defenses import validate as validate_defenses
from gradinv.client.metadata import check_batch_memory, check_input_shape, check_normalisation, check_positive_int
from gradinv.client.models import batchnorm_layers
from gradinv.commit import commits
from gradinv.errors import UserError
from gradinv.io import read_json, read_tensors, write_json, write_tensors

FORMAT = "gradinv-gradient/1"
TENSOR_FILE, META_FILE = "gradient.safetensors", "gradient.json"
REQUIRED_META = ("format", "arch", "num_classes", "input_shape", "mean", "std", "loss", "batch_size", "bn_mode", "bn_leak")


@dataclass
class GradientArtifact:
    grads: dict[str, torch.Tensor]
    meta: dict
    bn_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    bn_var: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.meta["batch_size"])

    @property
    def has_bn_statistics(self) -> bool:
        return self.meta["bn_leak"] == "exact"


def gradient_meta(arch: str, num_classes: int, input_shape: list[int], mean: list[float], std: list[float],
                  batch_size: int, bn_leak: str) -> dict:
    return {"format": FORMAT, "arch": arch, "num_classes": num_classes, "input_shape": list(input_shape),
            "mean": list(mean), "std": list(std), "loss": "cross_entropy_mean", "batch_size": batch_size,
            "bn_mode": "train", "bn_leak": bn_leak, "gradinv_version": __version__}


def write_gradient(artifact: GradientArtifact, out_dir: str | Path) -> list[Path]:
    """The artifact's two files in out_dir (a folder that the caller commits)."""
    out_dir = Path(out_dir)
    tensors = {f"grad.{n}": t for n, t in artifact.grads.items()}
    tensors.update({f"bn_mean.{n}": t for n, t in artifact.bn_mean.items()})
    tensors.update({f"bn_var.{n}": t for n, t in artifact.bn_var.items()})
    return [write_tensors(out_dir / TENSOR_FILE, tensors), write_json(out_dir / META_FILE, artifact.meta)]


save_gradient = commits("out_dir")(write_gradient)


def load_gradient(gradient_dir: str | Path, model: nn.Module, expected: dict | None = None) -> GradientArtifact:
    """Read and validate a gradient artifact against `model` (and, if given, the model's own
    metadata: arch, num_classes, input_shape). Raises UserError with one sentence on any mismatch."""
    gradient_dir = Path(gradient_dir)
    if not gradient_dir.is_dir():
        raise UserError(f"gradient folder {gradient_dir} does not exist.")
    meta = read_json(gradient_dir / META_FILE, "gradient metadata")
    where = gradient_dir / META_FILE
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise UserError(f"gradient metadata {where} lacks the key '{missing[0]}'.")
    if meta["format"] != FORMAT:
        raise UserError(f"gradient metadata {where} has format {meta['format']!r}; this gradinv reads {FORMAT!r}.")
    if meta["bn_mode"] != "train" or meta["bn_leak"] not in ("exact", "none"):
        raise UserError(f"gradient metadata {where} declares bn_mode {meta['bn_mode']!r} / bn_leak {meta['bn_leak']!r}; supported: train / exact or none.")
    label = f"gradient metadata {where}"
    check_positive_int(meta["batch_size"], "batch_size", label)
    check_positive_int(meta["num_classes"], "num_classes", label)
    check_input_shape(meta["input_shape"], label)
    check_normalisation(meta["mean"], meta["std"], label)
    check_batch_memory(meta["batch_size"], meta["input_shape"], label)
    for key, value in (expected or {}).items():
        if meta[key] != value:
            raise UserError(f"gradient artifact does not match the model: its {key} is {meta[key]!r}, the model's is {value!r}.")

    defenses = validate_defenses(meta.get("defenses", []), where=f"gradient metadata {where} 'defenses'")
    clients = meta.get("aggregation_clients", 1)
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise UserError(f"gradient metadata {where} has an invalid aggregation_clients {clients!r}.")
    meta = {**meta, "defenses": defenses, "aggregation_clients": clients}
    tensors = read_tensors(gradient_dir / TENSOR_FILE, "gradient file")
    artifact = validated_artifact(tensors, model, meta)
    check_declared(artifact.grads, defenses, clients, f"gradient artifact {gradient_dir}")
    return artifact


def validated_artifact(tensors: dict[str, torch.Tensor], model: nn.Module, meta: dict,
                       what: str = "gradient file", grad_prefix: str = "grad.") -> GradientArtifact:
    """The artifact held by `tensors` (`<grad_prefix><parameter>`, plus `bn_mean.<layer>` and
    `bn_var.<layer>` when meta declares the BN leak), each entry checked against `model`: every
    one present, with the model's shape, a float dtype and finite values, and no other entry.
    `what` names the source in the one-sentence UserError. Consumes `tensors`."""
    artifact = GradientArtifact(grads={}, meta=meta)
    for name, param in model.named_parameters():
        artifact.grads[name] = _take(tensors, f"{grad_prefix}{name}", tuple(param.shape), what)
    if artifact.has_bn_statistics:
        layers = batchnorm_layers(model)
        if not layers:
            raise UserError("gradient metadata declares leaked BN statistics, but the model has no BatchNorm layer.")
        for name, bn in layers.items():
            artifact.bn_mean[name] = _take(tensors, f"bn_mean.{name}", (bn.num_features,), what)
            artifact.bn_var[name] = _take(tensors, f"bn_var.{name}", (bn.num_features,), what)
            if (artifact.bn_var[name] < 0).any():
                raise UserError(f"{what} entry 'bn_var.{name}' has negative variances.")
    if tensors:
        raise UserError(f"{what} has the entry '{sorted(tensors)[0]}', which the model has no parameter or BN layer for.")
    return artifact


def _take(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], what: str = "gradient file") -> torch.Tensor:
    tensor = tensors.pop(key, None)
    if tensor is None:
        raise UserError(f"{what} lacks the entry '{key}' that the model needs.")
    if tuple(tensor.shape) != shape:
        raise UserError(f"{what} entry '{key}' has shape {tuple(tensor.shape)}, the model needs {shape}.")
    if not tensor.is_floating_point():
        raise UserError(f"{what} entry '{key}' has dtype {tensor.dtype}; a floating-point dtype is required.")
    if not torch.isfinite(tensor).all():
        raise UserError(f"{what} entry '{key}' contains NaN or infinite values.")
    return tensor.float()
