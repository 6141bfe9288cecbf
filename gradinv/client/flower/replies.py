"""One client reply, as the server received it, turned into gradinv's folders: `victim/` (the
round's global model, which the client started from) and `gradient/` (the client's update,
reply − global, declared as a FedAvg update of its training config, with the batch statistics
its BatchNorm buffers give away when it sent them). Every check of `import-gradient` applies:
a reply that lacks an array, has a wrong shape, a non-float or non-finite value, an unknown
entry or an incomplete training config is refused in one sentence."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gradinv import __version__
from gradinv.client.artifacts import gradient_meta, validated_artifact, write_gradient
from gradinv.client.flower.bn_leak import derive_batch_statistics
from gradinv.client.flower.training import local_steps
from gradinv.client.models import batchnorm_layers
from gradinv.commit import committed
from gradinv.errors import UserError
from gradinv.io import write_json, write_tensors

TRAIN_CONFIG = "train-config"  # the reply's ConfigRecord that declares how the client trained
DECLARED = ("local-epochs", "lr", "batch-size", "num-examples")
MODEL_INFO = ("arch", "num_classes", "input_shape", "mean", "std")


@dataclass(frozen=True)
class Reply:
    round: int
    node: int
    arrays: dict[str, torch.Tensor]
    train_config: dict


def check_train_config(config: dict, where: str) -> dict:
    """The declared (E, η, b, n): whole numbers and a positive finite learning rate."""
    missing = [k for k in DECLARED if k not in config]
    if missing:
        raise UserError(f"{where} does not declare '{missing[0]}' in its '{TRAIN_CONFIG}' record "
                        f"({', '.join(DECLARED)} are needed to replay its update).")
    for key in ("local-epochs", "batch-size", "num-examples"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where} declares '{key}' {value!r}; it must be a whole number of at least 1.")
    lr = config["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UserError(f"{where} declares 'lr' {lr!r}; it must be a positive finite number.")
    return config


def _buffers_sent(reply: Reply, model: nn.Module, where: str) -> bool:
    """Whether the reply carries the BatchNorm buffers: all of them, or none."""
    names = [n for n, _ in model.named_buffers()]
    sent = [n for n in names if n in reply.arrays]
    if sent and len(sent) != len(names):
        lacking = next(n for n in names if n not in reply.arrays)
        raise UserError(f"{where} sends some BatchNorm buffers but lacks '{lacking}'.")
    for name in sent:
        value = reply.arrays[name]
        if tuple(value.shape) != tuple(model.get_buffer(name).shape):
            raise UserError(f"{where} entry '{name}' has shape {tuple(value.shape)}, the model needs "
                            f"{tuple(model.get_buffer(name).shape)}.")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f"{where} entry '{name}' contains NaN or infinite values.")
    return bool(sent)


def reply_artifact(reply: Reply, global_state: dict[str, torch.Tensor], model: nn.Module, model_info: dict):
    """(artifact, derivation) for one reply; `model` has the global weights loaded."""
    where = f"the reply of node {reply.node} in round {reply.round}"
    config = check_train_config(reply.train_config, where)
    n, epochs, lr, b = config["num-examples"], config["local-epochs"], config["lr"], config["batch-size"]
    buffers = _buffers_sent(reply, model, where)
    steps = local_steps(n, epochs, b)
    if buffers:
        for name in (f"{layer}.num_batches_tracked" for layer in batchnorm_layers(model)):
            moved = int(reply.arrays[name]) - int(global_state[name])
            if moved != steps:
                raise UserError(f"{where} declares {steps} local step(s) (E {epochs}, b {b}, n {n}), but its "
                                f"BatchNorm counter '{name}' moved by {moved}.")
    names = {p for p, _ in model.named_parameters()}
    known = names | {b for b, _ in model.named_buffers()}
    for key in reply.arrays:
        if key not in known:
            raise UserError(f"{where} has the entry '{key}', which the model has no parameter or buffer for.")
    tensors = {}
    for name in names:
        if name not in reply.arrays:
            raise UserError(f"{where} lacks the entry '{name}' that the model needs.")
        sent = reply.arrays[name]
        if tuple(sent.shape) != tuple(global_state[name].shape):
            raise UserError(f"{where} entry '{name}' has shape {tuple(sent.shape)}, the model needs "
                            f"{tuple(global_state[name].shape)}.")
        if not sent.is_floating_point():
            raise UserError(f"{where} entry '{name}' has dtype {sent.dtype}; a floating-point dtype is required.")
        if not torch.isfinite(sent).all():
            raise UserError(f"{where} entry '{name}' contains NaN or infinite values.")
        tensors[name] = sent.float() - global_state[name].float()
    derived = None
    if buffers:
        derived = derive_batch_statistics(model, global_state, reply.arrays, steps, model_info["input_shape"], min(b, n))
        tensors.update({f"bn_mean.{k}": v for k, v in derived.mean.items()})
        tensors.update({f"bn_var.{k}": v for k, v in derived.var.items()})
    meta = gradient_meta(*(model_info[k] for k in MODEL_INFO), batch_size=n, bn_leak="exact" if buffers else "none")
    meta.update(defenses=[{"kind": "fedavg", "steps": epochs, "lr": float(lr), "batch_size": b, "known_to_attacker": True}],
                aggregation_clients=1,
                federation={"round": reply.round, "node": reply.node, "client": config.get("client"),
                            "local_steps": steps, "buffers_sent": buffers,
                            "bn_statistics": None if derived is None else ("exact: one local step" if derived.exact else
                                                                           f"approximate: momentum-weighted average "
                                                                           f"over {steps} local steps")})
    return validated_artifact(tensors, model, meta, what=where, grad_prefix=""), meta["federation"]


def write_reply(folder: str | Path, reply: Reply, global_state: dict[str, torch.Tensor], model: nn.Module,
                model_info: dict) -> dict:
    """Commit `folder`/victim and `folder`/gradient for one reply; returns its federation record."""
    artifact, record = reply_artifact(reply, global_state, model, model_info)
    folder = Path(folder)
    info = {**model_info, "source": f"flower round {reply.round}", "gradinv_version": __version__,
            "train_accuracy": None, "pool_accuracy": None}
    with committed(folder / "victim", folder / "gradient") as (victim_dir, gradient_dir):
        write_tensors(victim_dir / "model.safetensors", global_state)
        write_json(victim_dir / "model.json", info)
        write_gradient(artifact, gradient_dir)
    return record
