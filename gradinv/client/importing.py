"""`gradinv import-gradient`: a gradient, or a one-step weight update, captured outside gradinv
becomes the project's victim folder and gradient artifact, so that `labels` and `invert` run on
it unchanged. No ground truth comes with it, so `evaluate` has nothing to score against.

The tensor file (safetensors, or a state dict that torch.load(weights_only=True) reads) maps each
model parameter to its tensor: plain names (`fc.weight`), or names with gradinv's `grad.` or
DDP's `module.` prefix. With the BN leak it also holds `bn_mean.<layer>` and `bn_var.<layer>`
(the batch's per-channel mean and biased variance at each BatchNorm input). The gradient must be
that of the mean cross-entropy of the batch with BatchNorm in train mode, as gradinv's own
capture computes it. An update is new weights − old weights after one plain SGD step (no
momentum, no weight decay) of learning rate lr, so gradient = −update / lr.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from gradinv import __version__
from gradinv.client.artifacts import META_FILE, TENSOR_FILE, gradient_meta, validated_artifact, write_gradient
from gradinv.client.models import batchnorm_layers, build_model, load_weights, save_weights
from gradinv.client.step import train_mode_copy
from gradinv.commit import committed
from gradinv.errors import UserError
from gradinv.io import read_tensors, write_json
from gradinv.pipeline.folders import GRADIENT, TRUTH, VICTIM

KINDS = ("gradient", "update")
BN_LEAKS = ("none", "exact")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_PREFIXES = ("grad.", "module.")


def read_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a dict of tensors saved by torch.save (never unpickled unsafely)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"gradient file {path} does not exist.")
    if path.suffix == ".safetensors":
        return read_tensors(path, "gradient file", verify=False)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - weights_only refuses arbitrary objects; any failure means unusable
        raise UserError(f"gradient file {path} cannot be read by torch.load(weights_only=True) "
                        "as a state dict of tensors.") from None
    if not isinstance(obj, dict):
        raise UserError(f"gradient file {path} holds a {type(obj).__name__}, not a dict of parameter names to tensors.")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"gradient file {path} entry {key!r} is a {type(value).__name__}, not a tensor named by a string.")
        if value.layout != torch.strided:
            raise UserError(f"gradient file {path} entry {key!r} is a {value.layout} tensor; store it dense "
                            "(tensor.to_dense()).")
    return dict(obj)


def _canonical(tensors: dict[str, torch.Tensor], known: set[str], what: str) -> dict[str, torch.Tensor]:
    """Strip `grad.` and `module.` prefixes from keys that the model does not know as they are;
    keys still unknown keep their original spelling, for the error message."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key
        while name not in known and name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        name = name if name in known else key
        if name in out:
            raise UserError(f"{what} holds '{name}' twice (once as '{key}').")
        out[name] = tensor
    return out


def check_settings(num_classes: int, kind: str, batch_size: int, input_size: int, mean: list[float],
                   std: list[float], bn_leak: str, lr: float | None) -> None:
    """Each failure names the command-line flag."""
    def whole(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not whole(num_classes) or num_classes < 1:
        raise UserError(f"--num-classes must be a whole number of at least 1, not {num_classes!r}.")
    if not whole(batch_size) or batch_size < 1:
        raise UserError(f"--batch-size must be a whole number of at least 1, not {batch_size!r}.")
    if not whole(input_size) or input_size < 8:
        raise UserError(f"--input-size must be a whole number of at least 8 pixels, not {input_size!r}.")
    if len(mean) != 3 or not all(math.isfinite(m) for m in mean):
        raise UserError(f"--mean must be 3 finite numbers (one per RGB channel), not {list(mean)!r}.")
    if len(std) != 3 or not all(math.isfinite(s) and s > 0 for s in std):
        raise UserError(f"--std must be 3 positive numbers (one per RGB channel), not {list(std)!r}.")
    if bn_leak not in BN_LEAKS:
        raise UserError(f"--bn-leak must be one of {', '.join(BN_LEAKS)}, not {bn_leak!r}.")
    if kind not in KINDS:
        raise UserError(f"the imported file's kind must be one of {', '.join(KINDS)}, not {kind!r}.")
    if kind == "update" and lr is None:
        raise UserError("--lr is required with --update: the gradient is -update / lr.")
    if kind == "update" and not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr must be a positive number, not {lr!r}.")
    if kind == "gradient" and lr is not None:
        raise UserError("--lr applies only to a weight update (--update); a gradient needs no learning rate.")


def _check_forward(model: nn.Module, batch_size: int, input_size: int, num_classes: int) -> None:
    """The attacker replays the client's train-mode forward: make sure it runs at this size."""
    try:
        with torch.no_grad():
            logits = train_mode_copy(model)(torch.zeros(batch_size, 3, input_size, input_size))
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"the model's train-mode forward fails for a batch of {batch_size} at {input_size} px ({first}).") from None
    if tuple(logits.shape) != (batch_size, num_classes):
        raise UserError(f"the model outputs shape {tuple(logits.shape)}, not (batch size, --num-classes) = {(batch_size, num_classes)}.")


def import_gradient(arch: str, weights: str | Path, num_classes: int, tensor_file: str | Path, kind: str,
                    batch_size: int, input_size: int, mean: list[float] = IMAGENET_MEAN,
                    std: list[float] = IMAGENET_STD, bn_leak: str = "none", lr: float | None = None,
                    root: str | Path = ".") -> list[Path]:
    """Validate everything, then commit data/victim and data/capture/gradient under root, and remove
    in the same commit a ground truth left by an earlier capture: it belongs to another gradient."""
    check_settings(num_classes, kind, batch_size, input_size, mean, std, bn_leak, lr)
    model = load_weights(build_model(arch, num_classes), weights).eval()
    if bn_leak == "exact" and not batchnorm_layers(model):
        raise UserError("--bn-leak exact needs BatchNorm layers, and the model has none.")
    _check_forward(model, batch_size, input_size, num_classes)

    what = f"gradient file {tensor_file}"
    tensors = read_tensor_file(tensor_file)
    buffers = {name for name, _ in model.named_buffers()}
    bn_keys = {f"bn_{stat}.{layer}" for layer in batchnorm_layers(model) for stat in ("mean", "var")}
    params = {name for name, _ in model.named_parameters()}
    tensors = _canonical(tensors, params | bn_keys | (buffers if kind == "update" else set()), what)
    if kind == "update":  # a state-dict difference also carries the BN running statistics
        tensors = {k: v for k, v in tensors.items() if k not in buffers}
    if bn_leak == "none" and bn_keys & tensors.keys():
        raise UserError(f"{what} carries BN statistics ('{sorted(bn_keys & tensors.keys())[0]}'); "
                        "pass --bn-leak exact to import them.")

    input_shape = [3, input_size, input_size]
    meta = gradient_meta(arch, num_classes, input_shape, list(map(float, mean)), list(map(float, std)), batch_size, bn_leak)
    meta["imported_from"] = {"file": str(tensor_file), "kind": kind, "lr": lr}
    artifact = validated_artifact(tensors, model, meta, what=what, grad_prefix="")
    if kind == "update":
        artifact.grads = {name: -update / lr for name, update in artifact.grads.items()}

    root = Path(root)
    info = {
        "arch": arch, "num_classes": num_classes, "input_shape": input_shape, "mean": meta["mean"], "std": meta["std"],
        "classes": [str(c) for c in range(num_classes)], "train_accuracy": None, "pool_accuracy": None,
        "params": {"weights": str(weights), "gradient": str(tensor_file), "kind": kind, "lr": lr,
                   "batch_size": batch_size, "bn_leak": bn_leak},
        "source": "imported", "gradinv_version": __version__,
    }
    with committed(root / VICTIM, root / GRADIENT, removing=(root / TRUTH,)) as (victim_dir, gradient_dir):
        save_weights(model, victim_dir / "model.safetensors")
        write_json(victim_dir / "model.json", info)
        write_gradient(artifact, gradient_dir)
    return [root / VICTIM / "model.safetensors", root / VICTIM / "model.json", *(root / GRADIENT / name for name in
            (TENSOR_FILE, META_FILE))]
