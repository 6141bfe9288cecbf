"""Stage `train`: the victim model a federated client would share, trained on the training set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradinv import __version__
from gradinv.client.data import load_meta, load_set, normalize
from gradinv.client.metadata import check_input_shape, check_normalisation, check_positive_int
from gradinv.client.models import build_model, load_weights, resolve_device, save_weights
from gradinv.commit import commits
from gradinv.errors import UserError
from gradinv.io import read_json, write_json
from gradinv.pipeline.config import VictimConfig, as_dict
from gradinv.progress import progress


@dataclass(frozen=True)
class VictimMeta:
    arch: str
    num_classes: int
    input_shape: list[int]  # (3, R, R)
    mean: list[float]
    std: list[float]


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == labels[start:start + batch_size]).sum().item()
    return correct / len(labels)


def train_model(model: nn.Module, train: torch.Tensor, labels: torch.Tensor, config: VictimConfig,
                on_epoch: Callable[[int, dict], None] | None = None) -> nn.Module:
    """SGD with momentum, cosine learning rate, random flips; images already normalised."""
    device = resolve_device(config.device)
    model.to(device).train()
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=max(1, config.epochs * steps_per_epoch))
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        total_loss, correct, seen = 0.0, 0, 0
        bar = progress(range(0, len(labels), config.batch_size), f"train epoch {epoch + 1}/{config.epochs}", leave=False)
        for start in bar:
            index = order[start:start + config.batch_size]
            batch = train[index]
            flip = torch.rand(len(index), generator=generator) < 0.5
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch).to(device)
            logits = model(batch)
            loss = F.cross_entropy(logits, labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(index)
            correct += int((logits.argmax(1).cpu() == labels[index]).sum())
            seen += len(index)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", accuracy=f"{correct / seen:.0%}", refresh=False)
        if on_epoch is not None:
            on_epoch(epoch, {"train_loss": total_loss / len(labels), "train_batch_accuracy": correct / len(labels)})
    return model.cpu().eval()


@commits("out_dir")
def train(config: VictimConfig, sets_dir: str | Path, out_dir: str | Path,
          on_epoch: Callable[[int, dict], None] | None = None) -> list[Path]:
    """Stage `train`: write model.safetensors and model.json (with accuracies) to out_dir."""
    torch.manual_seed(config.seed)  # weight initialisation
    meta = load_meta(sets_dir)
    train_set, pool_set = load_set(sets_dir, "train"), load_set(sets_dir, "pool")
    model = build_model(config.arch, meta.num_classes, norm=config.norm)
    if config.weights:
        load_weights(model, config.weights)
    x_train, x_pool = normalize(train_set.images, meta.mean, meta.std), normalize(pool_set.images, meta.mean, meta.std)
    if config.epochs:
        model = train_model(model, x_train, train_set.labels, config, on_epoch)
    model.eval()
    out_dir = Path(out_dir)
    info = {
        "arch": config.arch, "norm": config.norm, "num_classes": meta.num_classes,
        "input_shape": [3, meta.resolution, meta.resolution],
        "mean": meta.mean, "std": meta.std, "classes": meta.classes,
        "train_accuracy": accuracy(model, x_train, train_set.labels),
        "pool_accuracy": accuracy(model, x_pool, pool_set.labels),
        "params": as_dict(config), "gradinv_version": __version__,
    }
    return [save_weights(model, out_dir / "model.safetensors"), write_json(out_dir / "model.json", info)]


def load_victim(victim_dir: str | Path) -> tuple[nn.Module, VictimMeta]:
    victim_dir = Path(victim_dir)
    info = read_json(victim_dir / "model.json", "victim metadata")
    where = f"victim metadata {victim_dir / 'model.json'}"
    missing = [key for key in ("arch", "num_classes", "input_shape", "mean", "std") if key not in info]
    if missing:
        raise UserError(f"{where} lacks the key '{missing[0]}'.")
    check_positive_int(info["num_classes"], "num_classes", where)
    check_input_shape(info["input_shape"], where)
    check_normalisation(info["mean"], info["std"], where)
    meta = VictimMeta(info["arch"], info["num_classes"], info["input_shape"], info["mean"], info["std"])
    norm = info.get("norm", "batch")  # written since victim.norm exists; batch before
    model = build_model(meta.arch, meta.num_classes, named_by=f"victim metadata {victim_dir / 'model.json'}", norm=norm)
    model = load_weights(model, victim_dir / "model.safetensors", verify=True)
    return model.eval(), meta
