"""Image-quality metrics and the optimal matching of reconstructions to originals.
Images are float tensors in [0, 1], shaped (N, 3, H, W)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for a data range of 1."""
    mse = (a - b).pow(2).flatten(1).mean(1).double()
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (scikit-image, Gaussian-free 7×7 windows, colour channels averaged)."""
    values = [structural_similarity(x.permute(1, 2, 0).double().numpy(), y.permute(1, 2, 0).double().numpy(),
                                    channel_axis=2, data_range=1.0)
              for x, y in zip(a.cpu(), b.cpu())]
    return torch.tensor(values, dtype=torch.float64)


def pairwise_mse(reconstructions: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """(R, O) matrix of mean squared errors."""
    return torch.cdist(reconstructions.flatten(1).double(), originals.flatten(1).double()).pow(2) / reconstructions[0].numel()


def match(reconstructions: torch.Tensor, originals: torch.Tensor) -> np.ndarray:
    """Hungarian assignment minimising total MSE: order[i] is the reconstruction matched to original i."""
    cost = pairwise_mse(reconstructions, originals).numpy()
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(cols), dtype=np.int64)
    order[cols] = rows
    return order


def label_accuracy(recovered: list[int], true: list[int]) -> float:
    """Multiset overlap of recovered and true labels, divided by the batch size."""
    remaining = list(true)
    hits = 0
    for label in recovered:
        if label in remaining:
            remaining.remove(label)
            hits += 1
    return hits / len(true)
