"""Train-mode BatchNorm for the attacker, with a double backward written out.

The inversion differentiates the parameter gradients, so every BatchNorm layer is differentiated
twice. PyTorch's generic double backward of batch norm runs about a hundred passes over the
layer's activations per step (benchmarks/step_roofline.py counts the traffic); the second
derivative written out below needs three per-channel reductions (two reads of the upstream
gradient through BatchNorm's own fused reduction kernel; the backward's own sums give two more)
and two elementwise outputs.

Per channel, with M elements, x̂ = (x − μ)·r, r = (σ² + ε)^-½ (biased σ²), and upstream gradient g:
    backward:  g_x = γ r (g − mean g − x̂ mean(g x̂)),   g_γ = Σ g x̂,   g_β = Σ g
Given upstream gradients u, p, q of (g_x, g_γ, g_β), the double backward is
    d/dg = γ r (u − ū − x̂ m_ux) + p x̂ + q
    d/dγ = r M (mean(u g) − ū ḡ − m_ux m_gx)
    d/dx = −γ r² (mean(u g) − ū ḡ − m_ux m_gx) x̂ − γ r² m_gx (u − ū − x̂ m_ux)
           + r (p − γ r m_ux)(g − ḡ − x̂ m_gx)
with m_vx = mean(v x̂). The forward and backward themselves are PyTorch's fused kernels; only
the second derivative is ours (exact to float precision: tests/test_batchnorm.py, gradgradcheck).
A third derivative is not defined (the inversion never takes one). Its elementwise outputs are
per-channel affine combinations of u, x and g (gradinv.engine.bn_elementwise: one Triton kernel on
CUDA under `engine.bn_double_backward: explicit-fused`, as is the backward's input gradient
with the BN prior's statistics term, below).

The layer also hands the BN prior (gradinv.attack.objective.bn_distance) the batch statistics its fused
forward computed anyway, differentiable, instead of a pass of its own over the activations:
their gradient (μ' = 1/M, σ²' = 2 (x − μ)/M), per channel s·x + t, joins the layer's input
gradient inside its backward: the backward's sums, then g_x + s·x + t as one per-channel affine
combination of g and x, where the prior's own statistics took about a dozen passes (forward and
backward) and adding the term after PyTorch's backward kernel five."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gradinv.client.step import batch_statistics
from gradinv.engine.bn_elementwise import channel_view, first_order_terms, second_order_terms


def _channel_sums(v: torch.Tensor, t: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    """(Σ v·(t − μ)·r, Σ v) per channel, in one read of v and t: the reductions of BatchNorm's
    backward kernel, its input gradient not computed. The kernel's weight argument only has to be
    defined (CUDA allocates the weight gradient like it; without the input gradient its values are
    never read): `rstd` stands in for it."""
    _, sum_v_t, sum_v = torch.ops.aten.native_batch_norm_backward(
        v, t, rstd, None, None, mean, rstd, True, 0.0, [False, True, True])
    return sum_v_t, sum_v


def seeds_first(t: torch.Tensor, dim: int | None, seeds: int) -> torch.Tensor:
    """A tensor under vmap, its seed dimension `dim` (None: shared by all seeds) moved to the front."""
    return t.movedim(dim, 0) if dim is not None else t.expand(seeds, *t.shape)


def _fold_seeds(t: torch.Tensor, dim: int | None, seeds: int) -> torch.Tensor:
    """(N, C, ...) per seed -> (N, G·C, ...): each seed's channels become channels of one batch."""
    t = seeds_first(t, dim, seeds)
    return t.transpose(0, 1).reshape(t.shape[1], seeds * t.shape[2], *t.shape[3:])


def _unfold_seeds(t: torch.Tensor, seeds: int) -> torch.Tensor:
    """(N, G·C, ...) -> (G, N, C, ...): _fold_seeds undone, the seed dimension first."""
    return t.reshape(t.shape[0], seeds, t.shape[1] // seeds, *t.shape[2:]).transpose(0, 1)


def _same_memory_no_view(t: torch.Tensor) -> torch.Tensor:
    """A tensor over t's memory, with t's shape and strides, that autograd does not take for a view of t
    (detach makes a view that no gradient passes through, and autograd keeps no record of those)."""
    return t.detach()


def _per_seed_channels(t: torch.Tensor, dim: int | None, seeds: int) -> torch.Tensor:
    """A per-channel (C,) tensor under vmap -> (G·C,), matching _fold_seeds."""
    return seeds_first(t, dim, seeds).reshape(-1)


class _BatchNormBackward(torch.autograd.Function):
    """(g, x, γ, μ, r, s, t) -> (g_x + s·x + t, g_γ, g_β): the backward, the BN prior's
    statistics term s·x + t (s, t per channel, None without it; see _BatchNormTrain.backward)
    joined to its input gradient, and its written-out backward. Under vmap the seeds fold into
    the channels, as in _BatchNormTrain: one fused kernel for all three outputs, where torch's
    batching rule spells the weight's gradient out in passes of its own."""

    @staticmethod
    def vmap(info, in_dims, grad_out, x, weight, mean, rstd, eps, fused, slope, shift):
        seeds = info.batch_size
        (g_dim, x_dim, weight_dim, mean_dim, rstd_dim, _, _, slope_dim, shift_dim) = in_dims
        channels = lambda t, dim: None if t is None else _per_seed_channels(t, dim, seeds)  # noqa: E731
        grad_x, grad_weight, grad_bias = _BatchNormBackward.apply(
            _fold_seeds(grad_out, g_dim, seeds), _fold_seeds(x, x_dim, seeds), channels(weight, weight_dim),
            channels(mean, mean_dim), channels(rstd, rstd_dim), eps, fused, channels(slope, slope_dim),
            channels(shift, shift_dim))
        return (_unfold_seeds(grad_x, seeds), grad_weight.view(seeds, -1), grad_bias.view(seeds, -1)), (0, 0, 0)

    @staticmethod
    def forward(grad_out, x, weight, mean, rstd, eps, fused, slope, shift):
        """BatchNorm's fused backward kernel (two reads of g and x for the sums, one pass for g_x),
        the statistics term added after it (five passes). Where `fused`, with the term: the same
        sums, then g_x + s·x + t as one per-channel affine combination of g and x in one pass
        (gradinv.engine.bn_elementwise). Composed (two `addcmul`s after the sums), it would save a pass
        in float32 but cost one more cast under autocast (each `addcmul` casts its half-precision
        tensor): `explicit` keeps the kernel and the term as they were."""
        if slope is None or not fused:
            grad_x, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, weight, None, None, mean, rstd, True, eps, [True, True, True])
            if slope is not None:
                grad_x = torch.addcmul(grad_x + channel_view(shift, x), x, channel_view(slope, x))
            return grad_x, sum_g_xhat, sum_g
        sum_g_xhat, sum_g = _channel_sums(grad_out, x, mean, rstd)
        count = x.numel() // x.shape[1]
        gamma_r = weight * rstd
        # γ r (g − ḡ − x̂ m_gx) + s·x + t, with x̂ = r·x − r·μ
        x_coefficient = slope - gamma_r * rstd * sum_g_xhat / count
        constant = shift - gamma_r * sum_g / count + gamma_r * rstd * mean * sum_g_xhat / count
        grad_x = first_order_terms(x, grad_out, (gamma_r, x_coefficient, constant), fused)
        return grad_x, sum_g_xhat, sum_g

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, weight, mean, rstd, _, fused, slope, _ = inputs
        _, sum_g_xhat, sum_g = output
        ctx.fused, ctx.statistics_term = fused, slope is not None
        ctx.save_for_backward(grad_out, x, weight, mean, rstd, sum_g_xhat, sum_g, slope)

    @staticmethod
    def backward(ctx, u, p, q):
        """The formulas of the module docstring, each output as a·u + b·g + c·x + d with
        per-channel a, b, c, d (x̂ = r·x − r·μ), computed by gradinv.engine.bn_elementwise (in one pass
        where `fused`); the three means of u read u, x and g once each, through BatchNorm's own
        fused reductions."""
        g, x, weight, mean, r, sum_g_xhat, sum_g, slope = ctx.saved_tensors
        count = x.numel() // x.shape[1]
        g_mean, m_gx = sum_g / count, sum_g_xhat / count
        if u is None:
            u_mean = m_ux = m_ug = torch.zeros_like(r)
        else:
            sum_u_xhat, sum_u = _channel_sums(u, x, mean, r)
            sum_u_g, _ = _channel_sums(u, g, torch.zeros_like(mean), torch.ones_like(r))
            u_mean, m_ux, m_ug = sum_u / count, sum_u_xhat / count, sum_u_g / count
        p = torch.zeros_like(r) if p is None else p
        q = torch.zeros_like(r) if q is None else q
        cross = m_ug - u_mean * g_mean - m_ux * m_gx
        gamma_r = weight * r
        # d/dg = γ r·u + (p − γ r m_ux)·x̂ + (q − γ r ū)
        g_xhat = p - gamma_r * m_ux
        # d/dx = −γ r² m_gx·u + b·g + c·x̂ + d, with b = r (p − γ r m_ux)
        b = r * g_xhat
        c = -gamma_r * r * cross + gamma_r * r * m_gx * m_ux - b * m_gx
        d = gamma_r * r * m_gx * u_mean - b * g_mean
        u_coefficient = -gamma_r * r * m_gx if slope is None else slope - gamma_r * r * m_gx  # d(s·x)/dx = s
        coefficients = (gamma_r, g_xhat * r, q - gamma_r * u_mean - g_xhat * r * mean,
                        u_coefficient, b, c * r, d - c * r * mean)
        grad_g, grad_x = second_order_terms(u, x, g, coefficients, ctx.fused)
        grad_slope = grad_shift = None
        if ctx.statistics_term and u is not None:  # Σ u·x and Σ u
            grad_slope, grad_shift = sum_u_xhat / r + mean * sum_u, sum_u
        return grad_g, grad_x, r * count * cross, None, None, None, None, grad_slope, grad_shift


class _BatchNormTrain(torch.autograd.Function):
    """(x, γ, β) -> (y, μ, σ²): y = BN(x) with the batch statistics μ, σ² (biased), all three
    differentiable; the backward of y is _BatchNormBackward, so that a second backward runs the
    written-out formulas (those of μ and σ² are plain operations autograd differentiates). Under
    torch.func.vmap (seeds batched: gradinv.attack.objective.batched_terms) the seeds fold into the
    channels, each seed's channel normalised by its own statistics, as vmap requires, and y
    comes back seed by seed, (G, N, C, ...), as the Function's own output, no view of one: a
    model may modify it in place (ReLU(inplace=True), a residual `out += identity`) without
    autograd's copies for an in-place write into a view (a copy of the whole output, twice, in
    every backward)."""

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps, seeds_major, _, fused):
        x_dim, weight_dim, bias_dim, *_ = in_dims
        seeds = info.batch_size
        channels = lambda t, dim: _per_seed_channels(t, dim, seeds)  # noqa: E731
        y, mean, var = _BatchNormTrain.apply(_fold_seeds(x, x_dim, seeds), channels(weight, weight_dim),
                                             channels(bias, bias_dim), eps, seeds_major, seeds, fused)
        return (y, mean.view(seeds, -1), var.view(seeds, -1)), (0, 0, 0)

    @staticmethod
    def forward(x, weight, bias, eps, seeds_major, seeds, fused):
        """`seeds` > 0: x has that many seeds folded into its channels, and y comes back (G, N, C, ...),
        laid out seed by seed if `seeds_major`, else over y's own memory. `fused`: the double
        backward's elementwise outputs in one pass (gradinv.engine.bn_elementwise)."""
        y, mean, rstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        if seeds:
            y = _unfold_seeds(y, seeds)
            y = y.contiguous() if seeds_major else _same_memory_no_view(y)
        return y, mean, rstd.pow(-2) - eps

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps, _, seeds, fused = inputs
        _, mean, var = output
        ctx.eps, ctx.seeds, ctx.fused = eps, seeds, fused
        ctx.set_materialize_grads(False)  # most layers' μ, σ² get no gradient: no zero tensors for them
        ctx.save_for_backward(x, weight, mean, var)

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_var):
        """y's gradient through _BatchNormBackward; μ's and σ²'s (μ' = 1/M, σ²' = 2 (x − μ)/M)
        as s·x + t per channel, s = 2 g_σ² / M, t = g_μ / M − s·μ (μ not detached: a second
        backward differentiates it through x), joined to the input gradient inside it."""
        x, weight, mean, var = ctx.saved_tensors
        slope = shift = None
        if grad_mean is not None or grad_var is not None:
            count = x.numel() // x.shape[1]
            grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
            slope = torch.zeros_like(mean) if grad_var is None else 2 * grad_var / count
            shift = grad_mean / count - slope * mean
        if grad_out is None:
            grad_x = None if slope is None else torch.addcmul(channel_view(shift, x), x, channel_view(slope, x))
            return grad_x, None, None, None, None, None, None
        if ctx.seeds:
            grad_out = _fold_seeds(grad_out, 0, ctx.seeds)
        rstd = torch.rsqrt(var.detach() + ctx.eps)  # _BatchNormBackward's formulas differentiate μ and r through x
        grad_x, grad_weight, grad_bias = _BatchNormBackward.apply(grad_out, x, weight, mean.detach(), rstd, ctx.eps,
                                                                  ctx.fused, slope, shift)
        return grad_x, grad_weight, grad_bias, None, None, None, None


StatisticsSink = Callable[[torch.Tensor, torch.Tensor], None]


class TrainBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that, in train mode with weights, normalises with the batch's statistics
    through _BatchNormTrain (running statistics are neither used nor updated, as the attacker's
    copy keeps them fixed: gradinv.client.step.train_mode_copy). While `statistics_sink` is set, each
    forward hands it the input's batch (mean, biased variance), differentiable."""

    statistics_sink: StatisticsSink | None = None
    # Under vmap, the output laid out seed by seed (G, N, C, ...) rather than as a view of the seeds
    # folded into the channels: for convolutions that take each seed's images as one slice
    # (gradinv.engine.experimental.convolution), one copy here instead of one in their forward and one in their backward.
    seeds_major_output: bool = False
    # The derivatives' elementwise parts in Triton kernels on CUDA (gradinv.engine.bn_elementwise).
    fused_second_order: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.weight is None:
            if self.statistics_sink is not None:
                self.statistics_sink(*batch_statistics(x))
            return super().forward(x)
        y, mean, var = _BatchNormTrain.apply(x, self.weight, self.bias, self.eps, self.seeds_major_output, 0,
                                             self.fused_second_order)
        if self.statistics_sink is not None:
            self.statistics_sink(mean, var)
        return y


def with_explicit_double_backward(model: nn.Module, fused: bool = False) -> nn.Module:
    """`model` with each nn.BatchNorm2d (exactly that class) turned into TrainBatchNorm2d, in place;
    `fused`: their double backwards' elementwise outputs in one kernel where a GPU runs Triton."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = TrainBatchNorm2d
            module.fused_second_order = fused
    return model
