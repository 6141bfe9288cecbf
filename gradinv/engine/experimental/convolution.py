"""Conv2d for the attacker, its double backward written out for the seeds vmapped, in one of two layouts.

The seeds share the model's weights, but each seed has its own weight gradient, and the second
derivative convolves with the upstream gradients of those: under torch.func.vmap
(gradinv.attack.objective.batched_terms) torch's batching rules run every such convolution as one
grouped convolution (groups = seeds) on the seeds folded into the channels, and every
convolution with the shared weight on the seeds folded into the batch, seed by seed. BatchNorm
under vmap folds the seeds into the channels too, so between the two layouts every layer's
activations are copied, forward and backward (about 34 GB of a step's 246 at ResNet-50, bs 8,
G 8: benchmarks/step_roofline.py). Two layouts for the seeds here (`engine.conv_double_backward`):

- `explicit`, seed by seed ((G, N, ...) in memory): a convolution with per-seed weights runs as
  one dense convolution per seed, on that seed's contiguous slice. On an H100, cuDNN ran one of
  the grouped ones (3×3, 14×14, 256 channels per seed, 15 GFLOP; matched by its count of calls)
  in 5.8 ms, at 2.6 TFLOP/s, half a percent of the card's TF32 rate
  (benchmarks/results/step_profile-cuda.json); dense, it may run faster. BatchNorm's output is
  then laid out seed by seed (one copy per layer).
- `explicit-grouped`, seeds in the channels ((N, G, ...) in memory, as BatchNorm folds them):
  a convolution with per-seed weights runs grouped over the seeds, as torch's vmap runs it, and
  one with the shared weight runs on the same memory read as the batch (N·G images, the order
  of a batch does not matter to a shared weight). No layer copies activations between layouts.

Either way the convolutions with the shared weight run once over all seeds' images.

A convolution y = conv(x, W) (+ b) is bilinear. Its backward, given g = ∂/∂y:
    g_x = conv_transpose(g, W)  (dgrad),   g_W = wgrad(x, g),   g_b = Σ g
and the backward of that, given upstream u, v, w of (g_x, g_W, g_b):
    d/dg = conv(u, W) + conv(x, v) + w,   d/dx = dgrad(g, v),   d/dW = wgrad(u, g)
(⟨u, g_x⟩ = ⟨conv(u, W), g⟩ and ⟨v, g_W⟩ = ⟨conv(x, v), g⟩). Per seed, W is shared and v is
the seed's own; d/dW sums over the seeds. Exact to float precision: tests/test_convolution.py
(gradgradcheck, and against torch's own layer under vmap). Under autocast it convolves in the half
type, as autocast runs nn.Conv2d, keeps the half copies for its backwards and runs them in that
type. A third derivative is not defined.
`engine.conv_double_backward: explicit` or `explicit-grouped` turns it on."""

from __future__ import annotations

import torch
from torch import nn

from gradinv.engine.batchnorm import TrainBatchNorm2d, seeds_first

aten = torch.ops.aten


class _Geometry:
    """A convolution's stride, padding, dilation and groups, as aten.convolution takes them."""

    def __init__(self, stride, padding, dilation, groups):
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups

    def grouped(self, seeds: int) -> _Geometry:
        """The same convolution for `seeds` seeds folded into the channels, each with its own weight."""
        return _Geometry(self.stride, self.padding, self.dilation, self.groups * seeds)

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return aten.convolution(x, weight, None, self.stride, self.padding, self.dilation, False, [0, 0], self.groups)

    def backward(self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool, weight_grad: bool):
        """(dgrad, wgrad) of conv(x, weight) given grad; None where not asked for."""
        grad_x, grad_weight, _ = aten.convolution_backward(
            grad, x, weight, None, self.stride, self.padding, self.dilation, False, [0, 0], self.groups,
            [input_grad, weight_grad, False])
        return grad_x, grad_weight


def _fold(t: torch.Tensor) -> torch.Tensor:
    """(G, N, ...) or (N, G, ...) -> one batch of G·N images (for the shared weight, in any order)."""
    return t.reshape(-1, *t.shape[2:])


class SeedsMajor:
    """(G, N, ...) in memory, each seed's images one contiguous slice: a convolution with
    per-seed weights runs as one dense convolution per seed (`explicit`)."""

    seed_dim = 0

    def arrange(self, t: torch.Tensor, dim: int | None, seeds: int) -> torch.Tensor:
        """A tensor under vmap, as (G, N, ...) in this layout (a copy only where it is not)."""
        return seeds_first(t, dim, seeds).contiguous()

    def weight_grads(self, grad, x, weight, geometry: _Geometry) -> torch.Tensor:
        """(G, ...): each seed's wgrad(x[s], grad[s])."""
        return torch.stack([geometry.backward(grad[s], x[s], weight, False, True)[1] for s in range(grad.shape[0])])

    def convolve_by_seed(self, x, weights, geometry: _Geometry) -> torch.Tensor:
        """Each seed's conv(x[s], weights[s])."""
        return torch.stack([geometry.forward(x[s], weights[s]) for s in range(x.shape[0])])

    def input_grads_by_seed(self, grad, x, weights, geometry: _Geometry) -> torch.Tensor:
        """Each seed's dgrad(grad[s]) of conv(x[s], weights[s])."""
        return torch.stack([geometry.backward(grad[s], x[s], weights[s], True, False)[0] for s in range(x.shape[0])])


class SeedsInChannels:
    """(N, G, ...) in memory: viewed as (N, G·C, ...), the seeds folded into the channels, as
    BatchNorm under vmap folds them; a convolution with per-seed weights runs as one grouped over
    the seeds (`explicit-grouped`)."""

    seed_dim = 1

    def arrange(self, t: torch.Tensor, dim: int | None, seeds: int) -> torch.Tensor:
        """A tensor under vmap, as (N, G, ...) in this layout (a copy only where it is not)."""
        return seeds_first(t, dim, seeds).transpose(0, 1).contiguous()

    def weight_grads(self, grad, x, weight, geometry: _Geometry) -> torch.Tensor:
        seeds = grad.shape[1]
        # The wgrad reads only its weight argument's shape: uninitialised memory, no copies of the weight.
        shaped_like = weight.new_empty(seeds * weight.shape[0], *weight.shape[1:])
        return geometry.grouped(seeds).backward(grad.flatten(1, 2), x.flatten(1, 2), shaped_like, False, True)[1].view(
            seeds, *weight.shape)

    def convolve_by_seed(self, x, weights, geometry: _Geometry) -> torch.Tensor:
        n, seeds = x.shape[:2]
        y = geometry.grouped(seeds).forward(x.flatten(1, 2), weights.flatten(0, 1))
        return y.view(n, seeds, -1, *y.shape[2:])

    def input_grads_by_seed(self, grad, x, weights, geometry: _Geometry) -> torch.Tensor:
        seeds = x.shape[1]
        return geometry.grouped(seeds).backward(grad.flatten(1, 2), x.flatten(1, 2), weights.flatten(0, 1), True,
                                                False)[0].view(x.shape)


LAYOUTS = {"explicit": SeedsMajor(), "explicit-grouped": SeedsInChannels()}  # by engine.conv_double_backward
_ONE_SEED = LAYOUTS["explicit"]


def _per_seed_backward(grad, x, weight, geometry: _Geometry, layout, has_bias: bool, needs: tuple[bool, bool]):
    """The backward of every seed's conv(x[s], weight), grad and x laid out by `layout`: g_x (as x) through
    one dense dgrad, g_W (G, ...) and g_b (G, C_out, or G × 0 without bias) per seed.
    `needs` = (g_x, g_W and g_b): what is not needed comes back None. grad, x and weight share one
    type (SeedwiseConv2d casts before the forward; autograd gives each gradient its tensor's type)."""
    seeds = grad.shape[layout.seed_dim]
    grad_x = geometry.backward(_fold(grad), _fold(x), weight, True, False)[0].view(x.shape) if needs[0] else None
    grad_weight = grad_bias = None
    if needs[1]:
        grad_weight = layout.weight_grads(grad, x, weight, geometry)
        summed = (1 - layout.seed_dim, 3, 4)  # all but the seeds' and the channels' dimensions
        grad_bias = grad.sum(summed) if has_bias else grad.new_zeros(seeds, 0)
    return grad_x, grad_weight, grad_bias


def _per_seed_double_backward(ctx, u, v, w):
    """The module docstring's formulas for (grad, x, weight) of _per_seed_backward, upstream u (as x)
    of g_x, v (G, ...) of g_W, w (G, C_out) of g_b, any of them None."""
    grad, x, weight = ctx.saved_tensors
    geometry, layout = ctx.geometry, ctx.layout
    # The inversion's weights are constants to the image gradient: their d/dW is rarely asked for.
    needs_grad, needs_x, needs_weight = ctx.needs_input_grad[:3]
    d_grad = d_x = d_weight = None
    if u is not None:
        u = u.contiguous()  # folded twice below
        d_grad = geometry.forward(_fold(u), weight).view(grad.shape) if needs_grad else None
        d_weight = geometry.backward(_fold(grad), _fold(u), weight, False, True)[1] if needs_weight else None
    if v is not None:
        if needs_grad:
            through_v = layout.convolve_by_seed(x, v, geometry)
            d_grad = through_v if d_grad is None else d_grad + through_v
        d_x = layout.input_grads_by_seed(grad, x, v, geometry) if needs_x else None
    if w is not None and w.shape[1] and needs_grad:
        through_w = w.unsqueeze(1 - layout.seed_dim)[..., None, None]
        d_grad = through_w.expand(grad.shape).clone() if d_grad is None else d_grad + through_w
    return d_grad, d_x, d_weight


class _SeedConvBackward(torch.autograd.Function):
    """(grad, x, weight) of G seeds, laid out by `layout`, with the weight shared -> (g_x, g_W, g_b),
    per seed; its backward written out."""

    @staticmethod
    def forward(grad, x, weight, geometry, layout, has_bias, needs):
        return _per_seed_backward(grad, x, weight, geometry, layout, has_bias, needs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, x, weight, geometry, layout, _, _ = inputs
        ctx.geometry, ctx.layout = geometry, layout
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad, x, weight)

    @staticmethod
    def backward(ctx, u, v, w):
        return (*_per_seed_double_backward(ctx, u, v, w), None, None, None, None)


class _ConvBackward(torch.autograd.Function):
    """_SeedConvBackward of one seed, (N, ...) tensors; under vmap, that of all seeds at once, laid out
    by `layout`."""

    @staticmethod
    def forward(grad, x, weight, geometry, layout, has_bias, needs):
        grad_x, grad_weight, grad_bias = _per_seed_backward(grad[None], x[None], weight, geometry, _ONE_SEED,
                                                            has_bias, needs)
        return (grad_x[0] if grad_x is not None else None, grad_weight[0] if grad_weight is not None else None,
                grad_bias[0] if grad_bias is not None else None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, x, weight, geometry, _, _, _ = inputs
        ctx.geometry, ctx.layout = geometry, _ONE_SEED
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad[None], x[None], weight)

    @staticmethod
    def backward(ctx, u, v, w):
        d_grad, d_x, d_weight = _per_seed_double_backward(
            ctx, *(t[None] if t is not None else None for t in (u, v, w)))
        return (d_grad[0] if d_grad is not None else None, d_x[0] if d_x is not None else None, d_weight,
                None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, grad, x, weight, geometry, layout, has_bias, needs):
        grad_dim, x_dim, weight_dim, *_ = in_dims
        if weight_dim is not None:
            raise NotImplementedError("the explicit convolution backward takes one weight shared by all seeds")
        seeds = info.batch_size
        grad_x, grad_weight, grad_bias = _SeedConvBackward.apply(
            layout.arrange(grad, grad_dim, seeds), layout.arrange(x, x_dim, seeds), weight, geometry, layout, has_bias,
            needs)
        out_dims = (layout.seed_dim if grad_x is not None else None, *(0 if t is not None else None
                                                                      for t in (grad_weight, grad_bias)))
        return (grad_x, grad_weight, grad_bias), out_dims


class _Conv(torch.autograd.Function):
    """conv(x, W) + b; its backward is _ConvBackward, so that a second backward runs the
    written-out formulas. Under vmap with the weight shared, one convolution of all seeds' images,
    laid out by `layout`."""

    @staticmethod
    def forward(x, weight, bias, geometry, layout):
        y = geometry.forward(x, weight)
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, geometry, layout = inputs
        ctx.geometry, ctx.layout, ctx.has_bias = geometry, layout, bias is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None, None
        x, weight = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        grad_x, grad_weight, grad_bias = _ConvBackward.apply(grad, x, weight, ctx.geometry, ctx.layout, ctx.has_bias,
                                                             needs)
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, geometry, layout):
        x_dim, weight_dim, bias_dim, _, _ = in_dims
        if weight_dim is not None or bias_dim is not None:
            raise NotImplementedError("the explicit convolution takes one weight shared by all seeds")
        xs = layout.arrange(x, x_dim, info.batch_size)
        y = _Conv.apply(_fold(xs), weight, bias, geometry, layout)
        return y.view(*xs.shape[:2], *y.shape[1:]), layout.seed_dim


class SeedwiseConv2d(nn.Conv2d):
    """nn.Conv2d through _Conv (zero padding given in numbers, as torchvision's models use), the seeds
    under vmap laid out by `seed_layout`."""

    seed_layout: SeedsMajor | SeedsInChannels = LAYOUTS["explicit"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        geometry = _Geometry(self.stride, self.padding, self.dilation, self.groups)
        weight, bias, device = self.weight, self.bias, x.device.type
        # As autocast runs nn.Conv2d (aten.convolution itself it leaves be). Cast before _Conv, so
        # that its backwards keep the half copies rather than the float32 tensors, as torch's do.
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None
        return _Conv.apply(x, weight, bias, geometry, self.seed_layout)


def with_explicit_conv_double_backward(model: nn.Module, mode: str = "explicit") -> nn.Module:
    """`model` with each nn.Conv2d (exactly that class, zero padding given in numbers) turned into
    SeedwiseConv2d with the seeds laid out as `mode` (`engine.conv_double_backward`: explicit,
    explicit-grouped) says, in place, and the written-out BatchNorm layers' outputs laid out as
    these take them under vmap."""
    layout = LAYOUTS[mode]
    for module in model.modules():
        if type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            module.__class__ = SeedwiseConv2d
            module.seed_layout = layout
        elif isinstance(module, TrainBatchNorm2d):
            module.seeds_major_output = layout.seed_dim == 0
    return model
