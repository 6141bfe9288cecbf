"""Seeds stacked into the channels (`inversion.batched_seeds: stacked`), instead of vmap.

With `batched_seeds: vmap` the engine batches G seeds with torch.func.vmap, whose convolutions
fold the seeds into the batch while BatchNorm (per-seed statistics) folds them into the
channels, so every BN layer's activations are copied between the two layouts, forward and
backward. Here every layer holds
one copy of the weights per seed, laid out so that the seeds live in the channels throughout:
convolutions become grouped (one group per seed), BatchNorm runs over G·C channels, the last
Linear layers multiply each seed's features by its own copy. One ordinary backward of the sum of
the seeds' losses then gives each seed's parameter gradients (its copy's gradient), with no
layout changes at all (benchmarks/step_roofline.py counts what either step moves;
tests/test_stacked_seeds.py checks that both compute the same).

    images (G, N, C, H, W) --fold_images--> (N, G·C, H, W) --stacked model--> logits (N, G, classes)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gradinv.batchnorm import TrainBatchNorm2d

PER_CHANNEL = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)


class SeedLinear(nn.Module):
    """nn.Linear with one (weight, bias) per seed, on features laid out (N, G·F)."""

    def __init__(self, linear: nn.Linear, seeds: int):
        super().__init__()
        self.seeds = seeds
        self.weight = nn.Parameter(linear.weight.detach().expand(seeds, *linear.weight.shape).clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().expand(seeds, -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("ngi,goi->ngo", x.reshape(x.shape[0], self.seeds, -1), self.weight)
        return out if self.bias is None else out + self.bias


def _stacked_conv(conv: nn.Conv2d, seeds: int) -> nn.Conv2d:
    stacked = nn.Conv2d(seeds * conv.in_channels, seeds * conv.out_channels, conv.kernel_size, conv.stride,
                        conv.padding, conv.dilation, seeds * conv.groups, conv.bias is not None, conv.padding_mode)
    stacked.weight = nn.Parameter(conv.weight.detach().repeat(seeds, 1, 1, 1))
    if conv.bias is not None:
        stacked.bias = nn.Parameter(conv.bias.detach().repeat(seeds))
    return stacked


def _stacked_batch_norm(bn: nn.BatchNorm2d, seeds: int) -> nn.BatchNorm2d:
    """The same class (gradinv.batchnorm's TrainBatchNorm2d stays one), over G·C channels."""
    stacked = type(bn)(seeds * bn.num_features, bn.eps, track_running_stats=False).to(bn.weight.device).train()
    stacked.weight = nn.Parameter(bn.weight.detach().repeat(seeds))
    stacked.bias = nn.Parameter(bn.bias.detach().repeat(seeds))
    if isinstance(bn, TrainBatchNorm2d):
        stacked.fused_second_order = bn.fused_second_order
    return stacked


def stack_seeds(model: nn.Module, seeds: int) -> nn.Module:
    """A copy of `model` (train mode, batch statistics) computing `seeds` seeds at once on
    fold_images(xs); its logits are (N, G, classes). Models with layers other than 2-d
    convolutions, affine BatchNorm2d, Linear layers on flattened features and per-channel layers
    are refused (ValueError); a forward that mixes channels is not seen here (the caller checks
    the logits)."""
    stacked = copy.deepcopy(model).train()
    for parent in list(stacked.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                setattr(parent, name, _stacked_conv(child, seeds))
            elif isinstance(child, nn.BatchNorm2d) and child.affine:
                setattr(parent, name, _stacked_batch_norm(child, seeds))
            elif type(child) is nn.Linear:
                setattr(parent, name, SeedLinear(child, seeds))
            elif not list(child.children()) and not isinstance(child, PER_CHANNEL):
                raise ValueError(f"stack_seeds: layer {name} ({type(child).__name__}) has no stacked form.")
    return stacked


def fold_images(xs: torch.Tensor) -> torch.Tensor:
    """(G, N, C, H, W) -> (N, G·C, H, W)."""
    seeds, batch = xs.shape[:2]
    return xs.transpose(0, 1).reshape(batch, seeds * xs.shape[2], *xs.shape[3:])


def per_seed(grad: torch.Tensor, seeds: int, shape: torch.Size) -> torch.Tensor:
    """A stacked parameter's gradient -> (G, *shape), shape that of the model's own parameter
    (of the same name): the seeds' copies are laid out seed-major in every stacked layer."""
    return grad.reshape(seeds, *shape)
