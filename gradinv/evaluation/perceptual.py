"""LPIPS, the learned perceptual distance, with backbone weights from a local file (never random)."""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torchvision

from gradinv.client.models import load_weights
from gradinv.errors import UserError

LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16"}
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def load_lpips(net: str, backbone_weights: str) -> Distance:
    """LPIPS v0.1 (the lpips package's calibrated linear layers) on a torchvision backbone whose
    weights come from `backbone_weights` (e.g. alexnet-owt-7be5be79.pth from a torch cache).
    Returns d(a, b) -> per-pair distances for images in [0, 1]."""
    try:
        import lpips
    except ImportError:
        raise UserError("LPIPS needs the 'lpips' package (pip install lpips).") from None
    backbone = torchvision.models.get_model(LPIPS_BACKBONES[net], weights=None)
    load_weights(backbone, backbone_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lpips asks torchvision for an untrained backbone the old way
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    features = backbone.features.state_dict()
    state = model.state_dict()
    for key in state:
        if key.startswith("net.slice"):  # net.slice<k>.<index in features>.<weight|bias>
            state[key] = features[key.split(".", 2)[2]]
    model.load_state_dict(state)
    model.eval()

    @torch.no_grad()
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return model(a.float(), b.float(), normalize=True).flatten().double()

    return distance


def pairwise(distance: Distance, reconstructions: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """(R, O) matrix of a pairwise image distance."""
    rows = [distance(r.expand_as(originals), originals) for r in reconstructions.unsqueeze(1)]
    return torch.stack(rows)
