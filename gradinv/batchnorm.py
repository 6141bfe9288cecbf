"""Train-mode BatchNorm for the attacker, with a double backward written out.

The inversion differentiates the parameter gradients, so every BatchNorm layer is differentiated
twice. PyTorch's generic double backward of batch norm runs about a hundred passes over the
layer's activations per step (benchmarks/step_roofline.py counts the traffic); the second
derivative written out below needs three per-channel reductions (the backward's own sums give
two more) and two elementwise outputs.

Per channel, with M elements, x̂ = (x − μ)·r, r = (σ² + ε)^-½ (biased σ²), and upstream gradient g:
    backward:  g_x = γ r (g − mean g − x̂ mean(g x̂)),   g_γ = Σ g x̂,   g_β = Σ g
Given upstream gradients u, p, q of (g_x, g_γ, g_β), the double backward is
    d/dg = γ r (u − ū − x̂ m_ux) + p x̂ + q
    d/dγ = r M (mean(u g) − ū ḡ − m_ux m_gx)
    d/dx = −γ r² (mean(u g) − ū ḡ − m_ux m_gx) x̂ − γ r² m_gx (u − ū − x̂ m_ux)
           + r (p − γ r m_ux)(g − ḡ − x̂ m_gx)
with m_vx = mean(v x̂). The forward and backward themselves are PyTorch's fused kernels; only
the second derivative is ours (exact to float precision: tests/test_batchnorm.py, gradgradcheck).
A third derivative is not defined (the inversion never takes one)."""

from __future__ import annotations

import torch
from torch import nn


def _channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel (C,) tensor shaped to broadcast against `like` (N, C, ...)."""
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (C,): the mean over all but the channel dimension."""
    return t.mean([d for d in range(t.dim()) if d != 1])


class _BatchNormBackward(torch.autograd.Function):
    """(g, x, γ, μ, r) -> (g_x, g_γ, g_β): the backward, and its written-out backward."""

    generate_vmap_rule = True  # the first backward of batched seeds runs it under vmap

    @staticmethod
    def forward(grad_out, x, weight, mean, rstd, eps):
        return tuple(torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, rstd, True, eps, [True, True, True]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, weight, mean, rstd, _ = inputs
        _, sum_g_xhat, sum_g = output
        ctx.save_for_backward(grad_out, x, weight, mean, rstd, sum_g_xhat, sum_g)

    @staticmethod
    def backward(ctx, u, p, q):
        """The formulas of the module docstring, each output as a·u + b·g + c·x + d with
        per-channel a, b, c, d (x̂ = r·x − r·μ): three passes per output, three reductions."""
        g, x, weight, mean, r, sum_g_xhat, sum_g = ctx.saved_tensors
        count = x.numel() // x.shape[1]
        channel = lambda t: _channel_view(t, x)  # noqa: E731
        g_mean, m_gx = sum_g / count, sum_g_xhat / count
        if u is None:
            u_mean = m_ux = m_ug = torch.zeros_like(r)
        else:
            u_mean = _channel_mean(u)
            m_ux = r * (_channel_mean(u * x) - mean * u_mean)
            m_ug = _channel_mean(u * g)
        p = torch.zeros_like(r) if p is None else p
        q = torch.zeros_like(r) if q is None else q
        cross = m_ug - u_mean * g_mean - m_ux * m_gx
        gamma_r = weight * r
        # d/dg = γ r·u + (p − γ r m_ux)·x̂ + (q − γ r ū)
        g_xhat = p - gamma_r * m_ux
        grad_g = torch.addcmul(channel(q - gamma_r * u_mean - g_xhat * r * mean), x, channel(g_xhat * r))
        # d/dx = −γ r² m_gx·u + b·g + c·x̂ + d, with b = r (p − γ r m_ux)
        b = r * g_xhat
        c = -gamma_r * r * cross + gamma_r * r * m_gx * m_ux - b * m_gx
        d = gamma_r * r * m_gx * u_mean - b * g_mean
        grad_x = torch.addcmul(torch.addcmul(channel(d - c * r * mean), x, channel(c * r)), g, channel(b))
        if u is not None:  # out of place: vmap has no batching rule for addcmul_
            grad_g = torch.addcmul(grad_g, u, channel(gamma_r))
            grad_x = torch.addcmul(grad_x, u, channel(-gamma_r * r * m_gx))
        return grad_g, grad_x, r * count * cross, None, None, None


class _BatchNormTrain(torch.autograd.Function):
    """y = BN(x) with batch statistics; its backward is _BatchNormBackward, so that a second
    backward runs the written-out formulas (the backward recomputes μ and r: one pass). Under
    torch.func.vmap (seeds batched: gradinv.objective.batched_terms) the seeds fold into the
    channels, each seed's channel normalised by its own statistics, as vmap requires; the
    result is no view of the Function's output, so that models may modify it in place
    (ReLU(inplace=True), a residual `out += identity`)."""

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps):
        x_dim, weight_dim, bias_dim, _ = in_dims
        seeds = info.batch_size
        x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(seeds, *x.shape)
        count, channels = x.shape[1], x.shape[2]

        def per_seed(t: torch.Tensor, dim: int | None) -> torch.Tensor:
            return (t.movedim(dim, 0) if dim is not None else t.expand(seeds, *t.shape)).reshape(seeds * channels)

        folded = x.transpose(0, 1).reshape(count, seeds * channels, *x.shape[3:])
        y = _BatchNormTrain.apply(folded, per_seed(weight, weight_dim), per_seed(bias, bias_dim), eps)
        return y.reshape(count, seeds, channels, *x.shape[3:]).transpose(0, 1), 0

    @staticmethod
    def forward(x, weight, bias, eps):
        return torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        var, mean = torch.var_mean(x.detach(), [d for d in range(x.dim()) if d != 1], correction=0)
        rstd = torch.rsqrt(var + ctx.eps)
        grad_x, grad_weight, grad_bias = _BatchNormBackward.apply(grad_out, x, weight, mean, rstd, ctx.eps)
        return grad_x, grad_weight, grad_bias, None


class TrainBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that, in train mode with weights, normalises with the batch's statistics
    through _BatchNormTrain (running statistics are neither used nor updated, as the attacker's
    copy keeps them fixed: gradinv.client.train_mode_copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.weight is None:
            return super().forward(x)
        return _BatchNormTrain.apply(x, self.weight, self.bias, self.eps)


def with_explicit_double_backward(model: nn.Module) -> nn.Module:
    """`model` with each nn.BatchNorm2d (exactly that class) turned into TrainBatchNorm2d, in place."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = TrainBatchNorm2d
    return model
