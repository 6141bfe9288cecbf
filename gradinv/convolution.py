"""Conv2d for the attacker, with each seed's own convolutions dense when the seeds are vmapped.

The seeds share the model's weights, but each seed has its own weight gradient, and the second
derivative convolves with the upstream gradients of those: under torch.func.vmap
(gradinv.objective.batched_terms) torch's batching rules run every such convolution as one
grouped convolution (groups = seeds) on the seeds folded into the channels. On an H100, cuDNN
ran one of them (3×3, 14×14, 256 channels per seed, 15 GFLOP; matched by its count of calls) in
5.8 ms, at 2.6 TFLOP/s, half a percent of the card's TF32 rate
(benchmarks/results/step_profile-cuda.json). Written out here, a convolution with
per-seed weights runs as one dense convolution per seed, on that seed's contiguous slice;
convolutions with the shared weight run once over all seeds' images folded into the batch.

A convolution y = conv(x, W) (+ b) is bilinear. Its backward, given g = ∂/∂y:
    g_x = conv_transpose(g, W)  (dgrad),   g_W = wgrad(x, g),   g_b = Σ g
and the backward of that, given upstream u, v, w of (g_x, g_W, g_b):
    d/dg = conv(u, W) + conv(x, v) + w,   d/dx = dgrad(g, v),   d/dW = wgrad(u, g)
(⟨u, g_x⟩ = ⟨conv(u, W), g⟩ and ⟨v, g_W⟩ = ⟨conv(x, v), g⟩). Per seed, W is shared and v is
the seed's own; d/dW sums over the seeds. Exact to float precision: tests/test_convolution.py
(gradgradcheck, and against torch's own layer under vmap). Under autocast it convolves in the half
type, as autocast runs nn.Conv2d, keeps the half copies for its backwards and runs them in that
type. A third derivative is not defined.
`inversion.conv_double_backward: explicit` turns it on."""

from __future__ import annotations

import torch
from torch import nn

from gradinv.batchnorm import TrainBatchNorm2d

aten = torch.ops.aten


class _Geometry:
    """A convolution's stride, padding, dilation and groups, as aten.convolution takes them."""

    def __init__(self, stride, padding, dilation, groups):
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return aten.convolution(x, weight, None, self.stride, self.padding, self.dilation, False, [0, 0], self.groups)

    def backward(self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool, weight_grad: bool):
        """(dgrad, wgrad) of conv(x, weight) given grad; None where not asked for."""
        grad_x, grad_weight, _ = aten.convolution_backward(
            grad, x, weight, None, self.stride, self.padding, self.dilation, False, [0, 0], self.groups,
            [input_grad, weight_grad, False])
        return grad_x, grad_weight


def _fold(t: torch.Tensor) -> torch.Tensor:
    """(G, N, ...) -> (G·N, ...): every seed's images one batch."""
    return t.reshape(-1, *t.shape[2:])


def _seeds_first(t: torch.Tensor, dim: int | None, seeds: int) -> torch.Tensor:
    """A tensor under vmap, its seed dimension moved to the front and laid out seed by seed."""
    return (t.movedim(dim, 0) if dim is not None else t.expand(seeds, *t.shape)).contiguous()


def _per_seed_backward(grad, x, weight, geometry: _Geometry, has_bias: bool, needs: tuple[bool, bool]):
    """The backward of every seed's conv(x[s], weight): grad, x (G, N, ...); g_x (G, N, ...) through one
    dense dgrad, g_W (G, ...) and g_b (G, C_out, or G × 0 without bias) through one wgrad per seed.
    `needs` = (g_x, g_W and g_b): what is not needed comes back None. grad, x and weight share one
    type (SeedwiseConv2d casts before the forward; autograd gives each gradient its tensor's type)."""
    seeds = grad.shape[0]
    grad_x = geometry.backward(_fold(grad), _fold(x), weight, True, False)[0].view(x.shape) if needs[0] else None
    grad_weight = grad_bias = None
    if needs[1]:
        grad_weight = torch.stack([geometry.backward(grad[s], x[s], weight, False, True)[1] for s in range(seeds)])
        grad_bias = grad.sum((1, 3, 4)) if has_bias else grad.new_zeros(seeds, 0)
    return grad_x, grad_weight, grad_bias


def _per_seed_double_backward(ctx, u, v, w):
    """The module docstring's formulas for (grad, x, weight) of _per_seed_backward, upstream u (G, N, ...)
    of g_x, v (G, ...) of g_W, w (G, C_out) of g_b, any of them None."""
    grad, x, weight = ctx.saved_tensors
    geometry, seeds = ctx.geometry, grad.shape[0]
    d_grad = d_x = d_weight = None
    if u is not None:
        u = u.contiguous()  # folded twice below
        d_grad = geometry.forward(_fold(u), weight).view(grad.shape)
        d_weight = geometry.backward(_fold(grad), _fold(u), weight, False, True)[1]
    if v is not None:
        through_v = torch.stack([geometry.forward(x[s], v[s]) for s in range(seeds)])
        d_grad = through_v if d_grad is None else d_grad + through_v
        d_x = torch.stack([geometry.backward(grad[s], x[s], v[s], True, False)[0] for s in range(seeds)])
    if w is not None and w.shape[1]:
        through_w = w[:, None, :, None, None]
        d_grad = through_w.expand(grad.shape).clone() if d_grad is None else d_grad + through_w
    return d_grad, d_x, d_weight


class _SeedConvBackward(torch.autograd.Function):
    """(grad, x, weight) of G seeds, (G, N, ...) with the weight shared -> (g_x, g_W, g_b), per seed;
    its backward written out."""

    @staticmethod
    def forward(grad, x, weight, geometry, has_bias, needs):
        return _per_seed_backward(grad, x, weight, geometry, has_bias, needs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, x, weight, geometry, _, _ = inputs
        ctx.geometry = geometry
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad, x, weight)

    @staticmethod
    def backward(ctx, u, v, w):
        return (*_per_seed_double_backward(ctx, u, v, w), None, None, None)


class _ConvBackward(torch.autograd.Function):
    """_SeedConvBackward of one seed, (N, ...) tensors; under vmap, that of all seeds at once."""

    @staticmethod
    def forward(grad, x, weight, geometry, has_bias, needs):
        grad_x, grad_weight, grad_bias = _per_seed_backward(grad[None], x[None], weight, geometry, has_bias, needs)
        return (grad_x[0] if grad_x is not None else None, grad_weight[0] if grad_weight is not None else None,
                grad_bias[0] if grad_bias is not None else None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, x, weight, geometry, _, _ = inputs
        ctx.geometry = geometry
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad[None], x[None], weight)

    @staticmethod
    def backward(ctx, u, v, w):
        d_grad, d_x, d_weight = _per_seed_double_backward(
            ctx, *(t[None] if t is not None else None for t in (u, v, w)))
        return (d_grad[0] if d_grad is not None else None, d_x[0] if d_x is not None else None, d_weight,
                None, None, None)

    @staticmethod
    def vmap(info, in_dims, grad, x, weight, geometry, has_bias, needs):
        grad_dim, x_dim, weight_dim, *_ = in_dims
        if weight_dim is not None:
            raise NotImplementedError("the explicit convolution backward takes one weight shared by all seeds")
        seeds = info.batch_size
        out = _SeedConvBackward.apply(_seeds_first(grad, grad_dim, seeds), _seeds_first(x, x_dim, seeds), weight,
                                      geometry, has_bias, needs)
        return out, tuple(0 if t is not None else None for t in out)


class _Conv(torch.autograd.Function):
    """conv(x, W) + b; its backward is _ConvBackward, so that a second backward runs the
    written-out formulas. Under vmap with the weight shared, one convolution of all seeds' images."""

    @staticmethod
    def forward(x, weight, bias, geometry):
        y = geometry.forward(x, weight)
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, geometry = inputs
        ctx.geometry, ctx.has_bias = geometry, bias is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        x, weight = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        grad_x, grad_weight, grad_bias = _ConvBackward.apply(grad, x, weight, ctx.geometry, ctx.has_bias, needs)
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, geometry):
        x_dim, weight_dim, bias_dim, _ = in_dims
        if weight_dim is not None or bias_dim is not None:
            raise NotImplementedError("the explicit convolution takes one weight shared by all seeds")
        xs = _seeds_first(x, x_dim, info.batch_size)
        y = _Conv.apply(_fold(xs), weight, bias, geometry)
        return y.view(*xs.shape[:2], *y.shape[1:]), 0


class SeedwiseConv2d(nn.Conv2d):
    """nn.Conv2d through _Conv (zero padding given in numbers, as torchvision's models use)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        geometry = _Geometry(self.stride, self.padding, self.dilation, self.groups)
        weight, bias, device = self.weight, self.bias, x.device.type
        # As autocast runs nn.Conv2d (aten.convolution itself it leaves be). Cast before _Conv, so
        # that its backwards keep the half copies rather than the float32 tensors, as torch's do.
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None
        return _Conv.apply(x, weight, bias, geometry)


def with_explicit_conv_double_backward(model: nn.Module) -> nn.Module:
    """`model` with each nn.Conv2d (exactly that class, zero padding given in numbers) turned into
    SeedwiseConv2d, in place, and the written-out BatchNorm layers' outputs laid out as these take
    them under vmap."""
    for module in model.modules():
        if type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            module.__class__ = SeedwiseConv2d
        elif isinstance(module, TrainBatchNorm2d):
            module.seeds_major_output = True
    return model
