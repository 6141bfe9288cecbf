"""What a client of the embedded federation does with the global model: E epochs of plain SGD
(no momentum, no weight decay) over its examples in a fixed order, in mini-batches of b, with
BatchNorm in train mode, so its running statistics move as in any PyTorch training loop. This is
the update that gradinv's FedAvg client step (gradinv.client.step.local_update) replays."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def train_locally(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
                  batch_size: int) -> float:
    """Trains `model` in place; returns the mean loss of the last epoch."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    last = 0.0
    for _ in range(epochs):
        total = 0.0
        for first in range(0, len(labels), batch_size):
            x, y = images[first:first + batch_size], labels[first:first + batch_size]
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
        last = total / len(labels)
    return last


def local_steps(examples: int, epochs: int, batch_size: int) -> int:
    return epochs * -(-examples // batch_size)
