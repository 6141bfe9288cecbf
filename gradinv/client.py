"""What a federated client computes for one FedSGD step. Capture and the attacker share this
code, so the attacker differentiates exactly the function the client differentiated."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gradinv.models import batchnorm_layers


def train_mode_copy(model: nn.Module) -> nn.Module:
    """A copy in train mode (BN uses batch statistics) whose running statistics never move."""
    clone = copy.deepcopy(model).train()
    for bn in batchnorm_layers(clone).values():
        bn.momentum = 0.0
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def client_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the batch: the loss whose gradient the client shares."""
    return F.cross_entropy(model(images), labels)


def parameter_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        create_graph: bool = False) -> dict[str, torch.Tensor]:
    """∂(mean CE)/∂W for every named parameter; differentiable in `images` if create_graph."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(client_loss(model, images, labels), params, create_graph=create_graph)
    return dict(zip(names, grads))


@contextmanager
def recorded_bn_statistics(model: nn.Module) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """While active, each forward fills {bn layer name: (batch mean, biased batch variance)} of
    the layer's input, as BN itself computes them in train mode (still attached to the graph)."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0]
            dims = [0] + list(range(2, x.ndim))
            stats[name] = (x.mean(dims), x.var(dims, unbiased=False))

        return hook

    handles = [bn.register_forward_hook(hook_for(name)) for name, bn in batchnorm_layers(model).items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
