"""Pictures of a run: the PNG grid of originals above reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.utils as vutils

from gradinv.io import atomic_path


def save_grid(rows: list[torch.Tensor], path: str | Path, scale: int = 2) -> Path:
    """One row per tensor of (B, 3, H, W) images in [0, 1]; small images are upscaled for viewing."""
    images = torch.cat(rows)
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    with atomic_path(path) as tmp:
        vutils.save_image(images, tmp, nrow=len(rows[0]), padding=2, pad_value=1.0, format="png")
    return Path(path)
