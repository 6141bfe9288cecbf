"""What a federated client computes for one FedSGD step. Capture and the attacker share this
code, so the attacker differentiates exactly the function the client differentiated."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gradinv.client.models import batchnorm_layers


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of x (N, C, ...), as BatchNorm in train mode computes them."""
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dims), x.var(dims, unbiased=False)


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


def local_update(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float,
                 batch_size: int, create_graph: bool = False) -> dict[str, torch.Tensor]:
    """FedAvg on the client: `steps` passes of plain SGD (learning rate `lr`) over the batch in
    consecutive mini-batches of `batch_size`, in order; returns new − old weights. With
    create_graph the update is differentiable in `images`: the attacker replays this function."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    start = dict(weights)
    for _ in range(steps):
        for first in range(0, len(labels), batch_size):
            x, y = images[first:first + batch_size], labels[first:first + batch_size]
            loss = F.cross_entropy(torch.func.functional_call(model, {**weights, **buffers}, (x,)), y)
            grads = torch.autograd.grad(loss, [weights[n] for n in names], create_graph=create_graph)
            weights = {n: weights[n] - lr * g for n, g in zip(names, grads)}
    return {n: weights[n] - start[n] for n in names}


def per_example_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂ℓ_i/∂W for every sample i of the batch, shaped (B, *W.shape), where ℓ_i is sample i's
    cross-entropy in the batch's train-mode forward (BN couples the samples, so the batch runs as
    one); the mean over i is the batch gradient."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def losses(w):  # BN updates its (fresh) buffers in place: a transform may not mutate captured ones
        fresh = {n: b.clone() for n, b in buffers.items()}
        return F.cross_entropy(torch.func.functional_call(model, {**w, **fresh}, (images,)), labels, reduction="none")

    jacobian = torch.func.jacrev(losses)(weights)
    return {n: jacobian[n] for n in names}


@contextmanager
def recorded_bn_statistics(model: nn.Module) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """While active, each forward fills {bn layer name: (batch mean, biased batch variance)} of
    the layer's input, as BN itself computes them in train mode (still attached to the graph).
    A layer with a `statistics_sink` (the attacker's own BatchNorm) hands over the statistics of
    its own forward; any other BN layer's are computed from its input by a hook."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def store_for(name: str):
        def store(mean: torch.Tensor, var: torch.Tensor):
            stats[name] = (mean, var)

        return store

    def hook_for(name: str):
        store = store_for(name)

        def hook(_module, inputs, _output):
            store(*batch_statistics(inputs[0]))

        return hook

    handles, sinks = [], []
    for name, bn in batchnorm_layers(model).items():
        if hasattr(type(bn), "statistics_sink"):
            bn.statistics_sink = store_for(name)
            sinks.append(bn)
        else:
            handles.append(bn.register_forward_hook(hook_for(name)))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
        for bn in sinks:
            del bn.statistics_sink
