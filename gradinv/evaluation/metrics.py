"""Image-quality metrics and the optimal matching of reconstructions to originals.
Images are float tensors in [0, 1], shaped (N, 3, H, W)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def match(reconstructions: torch.Tensor, originals: torch.Tensor, cost: torch.Tensor | None = None) -> torch.Tensor:
    """Hungarian assignment minimising the total cost (default: MSE), a (reconstruction, original)
    matrix: order[i] is the reconstruction matched to original i."""
    if cost is None:
        cost = pairwise_mse(reconstructions, originals)
    rows, cols = linear_sum_assignment(cost.numpy())
    order = torch.empty(len(cols), dtype=torch.int64)
    order[torch.from_numpy(cols)] = torch.from_numpy(rows).long()
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


def fft2d_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image distance of 2-D Fourier spectra: mean absolute difference of the log
    magnitudes (orthonormal FFT per channel). 0 for identical images."""
    spectrum = lambda x: torch.log1p(torch.fft.fft2(x.double(), norm="ortho").abs())  # noqa: E731
    return (spectrum(a) - spectrum(b)).abs().flatten(1).mean(1)


def registered_psnr(reconstruction: torch.Tensor, original: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Per-image PSNR after the best integer translation within ±max_shift pixels (compared on
    the overlap): forgives the small misplacements that gradient inversion is blind to."""
    best = psnr(reconstruction, original)
    size = original.shape[-1]
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            if (dy, dx) == (0, 0):
                continue
            r = reconstruction[..., max(dy, 0):size + min(dy, 0), max(dx, 0):size + min(dx, 0)]
            o = original[..., max(-dy, 0):size + min(-dy, 0), max(-dx, 0):size + min(-dx, 0)]
            best = torch.maximum(best, psnr(r, o))
    return best


def iip_hits(reconstruction_features: torch.Tensor, gallery_features: torch.Tensor,
             original_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image identifiability (Yin et al.): reconstruction i hits when its nearest gallery image by
    cosine similarity of features is exactly its own original (gallery row original_index[i]).
    Returns (hits as bool, nearest gallery index)."""
    similarity = F.normalize(reconstruction_features.double(), dim=1) @ F.normalize(gallery_features.double(), dim=1).T
    nearest = similarity.argmax(1)
    return nearest == original_index, nearest
