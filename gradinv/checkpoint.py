"""Atomic checkpoints of a running inversion, so that a killed run resumes where it stopped.

One safetensors file holds every seed's images, Adam moments and random-generator state (and the
current consensus); its metadata holds the step, the loss log and a key that ties the file to
its exact inputs and settings, so that a checkpoint is never resumed into a different run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gradinv.io import atomic_path


@dataclass
class InversionState:
    step: int                          # iterations completed
    images: list[torch.Tensor]         # per seed, (B, 3, H, W)
    optimizers: list[dict]             # per seed, torch.optim.Adam state_dict()
    generators: list[torch.Tensor]     # per seed, torch.Generator.get_state()
    consensus: torch.Tensor | None
    log: list[dict]


def save_checkpoint(path: Path, key: str, state: InversionState) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for g, (x, optimizer, generator) in enumerate(zip(state.images, state.optimizers, state.generators)):
        moments = optimizer["state"][0]
        tensors[f"x.{g}"] = x.detach().cpu()
        tensors[f"exp_avg.{g}"] = moments["exp_avg"].cpu()
        tensors[f"exp_avg_sq.{g}"] = moments["exp_avg_sq"].cpu()
        tensors[f"adam_step.{g}"] = torch.as_tensor(moments["step"], dtype=torch.float32).reshape(1).cpu()
        tensors[f"generator.{g}"] = generator
    if state.consensus is not None:
        tensors["consensus"] = state.consensus.detach().cpu()
    from safetensors.torch import save_file  # imported here: runs without checkpoints need no safetensors

    metadata = {"key": key, "step": str(state.step), "seeds": str(len(state.images)), "log": json.dumps(state.log)}
    with atomic_path(path) as tmp:
        save_file({n: t.contiguous().clone() for n, t in tensors.items()}, str(tmp), metadata=metadata)


def load_checkpoint(path: Path, key: str, optimizer_template: dict) -> InversionState | None:
    """The state saved at `path` if it belongs to this run (same key), else None."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("key") != key:
            return None
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None  # a damaged checkpoint is ignored: the run starts over
    seeds = int(metadata["seeds"])
    optimizers = []
    for g in range(seeds):
        state = json.loads(json.dumps(optimizer_template["param_groups"]))
        optimizers.append({"param_groups": state, "state": {0: {
            "step": tensors[f"adam_step.{g}"].reshape(()),
            "exp_avg": tensors[f"exp_avg.{g}"], "exp_avg_sq": tensors[f"exp_avg_sq.{g}"]}}})
    return InversionState(step=int(metadata["step"]), images=[tensors[f"x.{g}"] for g in range(seeds)],
                          optimizers=optimizers, generators=[tensors[f"generator.{g}"] for g in range(seeds)],
                          consensus=tensors.get("consensus"), log=json.loads(metadata["log"]))
