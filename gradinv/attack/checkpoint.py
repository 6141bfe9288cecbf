"""Atomic checkpoints of a running inversion, so that a killed run resumes where it stopped.

One safetensors file holds the seeds' images, the Adam moments, every random generator's state
(and the current consensus); its metadata holds the step, the loss log and a key that ties the
file to its exact inputs and settings, so that a checkpoint is never resumed into a different run.
A checkpoint of another layout (FORMAT) is ignored: the run starts over."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gradinv.io import atomic_path

FORMAT = "2"  # 1: one Adam per seed; 2: the seeds stacked under one Adam


@dataclass
class InversionState:
    step: int                          # iterations completed
    images: torch.Tensor               # (G, B, 3, H, W)
    optimizer: dict                    # torch.optim.Adam state_dict() over the images
    generators: list[torch.Tensor]     # per seed, torch.Generator.get_state() (initial noise, views)
    noise_generator: torch.Tensor      # the Langevin noise's generator state
    consensus: torch.Tensor | None
    log: list[dict]


def save_checkpoint(path: Path, key: str, state: InversionState) -> None:
    moments = state.optimizer["state"][0]
    tensors = {"images": state.images, "exp_avg": moments["exp_avg"], "exp_avg_sq": moments["exp_avg_sq"],
               "adam_step": torch.as_tensor(moments["step"], dtype=torch.float32).reshape(1),
               "noise_generator": state.noise_generator,
               **{f"generator.{g}": generator for g, generator in enumerate(state.generators)}}
    if state.consensus is not None:
        tensors["consensus"] = state.consensus
    from safetensors.torch import save_file  # imported here: runs without checkpoints need no safetensors

    metadata = {"key": key, "format": FORMAT, "step": str(state.step), "seeds": str(len(state.generators)),
                "log": json.dumps(state.log)}
    with atomic_path(path) as tmp:
        save_file({n: t.detach().cpu().contiguous().clone() for n, t in tensors.items()}, str(tmp), metadata=metadata)


def load_checkpoint(path: Path, key: str, optimizer_template: dict) -> InversionState | None:
    """The state saved at `path` if it belongs to this run (same key and format), else None.
    `optimizer_template` is the running Adam's state_dict(): its settings are kept."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("key") != key or metadata.get("format") != FORMAT:
            return None
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None  # a damaged checkpoint is ignored: the run starts over
    optimizer = {"param_groups": optimizer_template["param_groups"], "state": {0: {
        "step": tensors["adam_step"].reshape(()), "exp_avg": tensors["exp_avg"], "exp_avg_sq": tensors["exp_avg_sq"]}}}
    return InversionState(step=int(metadata["step"]), images=tensors["images"], optimizer=optimizer,
                          generators=[tensors[f"generator.{g}"] for g in range(int(metadata["seeds"]))],
                          noise_generator=tensors["noise_generator"], consensus=tensors.get("consensus"),
                          log=json.loads(metadata["log"]))
