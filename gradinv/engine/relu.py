"""ReLU for the attacker's model, with the second derivative autograd would waste left out.

The inversion differentiates the parameter gradients, and the first backward of a ReLU,
threshold_backward(g, relu(x)), depends on relu(x) only through its 0/1 mask, whose derivative
is zero almost everywhere. Autograd still writes that zero out as a tensor the size of the
activations and adds it into relu(x)'s gradient, at every ReLU, every step. Here the mask is a
constant to the second derivative (the same values; tests/test_relu.py)."""

from __future__ import annotations

import torch
from torch import nn


class _ReLU(torch.autograd.Function):
    generate_vmap_rule = True  # elementwise: the seeds batched under vmap need no rule of their own

    @staticmethod
    def forward(x):
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out.detach(), 0)


class DetachedMaskReLU(nn.ReLU):
    """nn.ReLU through _ReLU, always out of place (`inplace` is ignored: nothing else keeps the
    input, which is freed once the output exists)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLU.apply(x)


def with_detached_relu_masks(model: nn.Module) -> nn.Module:
    """`model` with each nn.ReLU (exactly that class) turned into DetachedMaskReLU, in place."""
    for module in model.modules():
        if type(module) is nn.ReLU:
            module.__class__ = DetachedMaskReLU
    return model
