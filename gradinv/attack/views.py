"""The random view of each seed's images that the model sees (Yin et al.'s jitter and flips): a
shift within ±jitter pixels (wrapping), then a horizontal flip. Views are index permutations,
data rather than code, so a captured CUDA graph (gradinv.engine.cuda_graph) replays each iteration
with that iteration's draws."""

from __future__ import annotations

import torch

from gradinv.pipeline.config import InversionConfig

View = tuple[int, int, bool]  # (rows shifted down, columns shifted right, flipped)


def views_enabled(config: InversionConfig) -> bool:
    return config.jitter > 0 or config.flip


def draw_view(config: InversionConfig, generator: torch.Generator) -> View:
    """One seed's view for one iteration: the shift, then the flip, from that seed's generator."""
    shift = torch.randint(-config.jitter, config.jitter + 1, (2,), generator=generator).tolist() if config.jitter else [0, 0]
    flip = bool(torch.rand((), generator=generator) < 0.5) if config.flip else False
    return shift[0], shift[1], flip


def view_indices(views: list[View], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source rows (G, H) and columns (G, W) of each seed's view: view[..., i, j] = x[..., rows[i], cols[j]].
    The same pixels as torch.roll by the shift followed by a flip of the last dimension."""
    rows = torch.stack([(torch.arange(height) - down) % height for down, _, _ in views])
    shifted = [(torch.arange(width) - right) % width for _, right, _ in views]
    cols = torch.stack([c.flip(0) if flip else c for c, (_, _, flip) in zip(shifted, views)])
    return rows, cols


def apply_views(xs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """xs (G, B, C, H, W) seen through each seed's view; differentiable (a gather)."""
    shifted = torch.take_along_dim(xs, rows[:, None, None, :, None], dim=3)
    return torch.take_along_dim(shifted, cols[:, None, None, None, :], dim=4)
