"""The seeds' consensus: each seed's image of a slot registered onto the seeds' pixel mean, then
averaged (Yin et al. use RANSAC-flow; we use scikit-image's registration, see below).

Methods (`inversion.registration`):
- `none`:        the plain pixel mean ("lazy"); misaligned seeds blur each other.
- `translation`: a sub-pixel shift by phase correlation; cheap at any size.
- `ilk`:         dense optical flow, iterative Lucas-Kanade.
- `tvl1`:        dense optical flow, TV-L1; the slowest, and the best consensus over the evaluation
                 batches (docs/registration.md, with each method's cost).
Registration estimates the motion on the channel mean and warps every channel with it."""

from __future__ import annotations

import numpy as np
import torch

REGISTRATIONS = ("none", "translation", "ilk", "tvl1")


def _warp_by_flow(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    from skimage.transform import warp

    return np.stack([warp(channel, np.array([rows, cols]), mode="edge", order=1) for channel in image])


def register(reference: torch.Tensor, moving: torch.Tensor, method: str) -> torch.Tensor:
    """`moving` (3, H, W) warped onto `reference` (3, H, W)."""
    if method == "none":
        return moving
    ref = reference.detach().float().mean(0).cpu().numpy()
    mov_image = moving.detach().float().cpu().numpy()
    mov = mov_image.mean(0)
    if method == "translation":
        from scipy.ndimage import shift
        from skimage.registration import phase_cross_correlation

        offset, _, _ = phase_cross_correlation(ref, mov, upsample_factor=10, normalization=None)
        warped = np.stack([shift(channel, offset, mode="nearest", order=1) for channel in mov_image])
    else:
        from skimage.registration import optical_flow_ilk, optical_flow_tvl1

        flow = optical_flow_tvl1 if method == "tvl1" else optical_flow_ilk
        v, u = flow(ref, mov)
        rows, cols = np.meshgrid(np.arange(ref.shape[0]), np.arange(ref.shape[1]), indexing="ij")
        warped = _warp_by_flow(mov_image, rows + v, cols + u)
    return torch.from_numpy(np.ascontiguousarray(warped)).to(moving.dtype).to(moving.device)


def consensus(seeds: torch.Tensor, method: str) -> torch.Tensor:
    """(G, B, 3, H, W) seeds -> (B, 3, H, W): per slot, every seed registered onto the seeds'
    pixel mean, then averaged."""
    reference = seeds.mean(0)
    if method == "none":
        return reference
    return torch.stack([
        torch.stack([register(reference[i], seeds[g, i], method) for g in range(seeds.shape[0])]).mean(0)
        for i in range(seeds.shape[1])
    ])
