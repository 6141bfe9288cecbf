"""gradinv.engine.bn_elementwise's operations as Triton kernels: each element of u, x and g read once,
each output written once, arithmetic in float32 whatever the tensors' type. Imported
only on CUDA (Triton compiles for the GPU; tests/test_bn_elementwise.py runs the kernel on the
CPU through Triton's interpreter). Its annotations stay objects, not strings (no `from __future__
import annotations`): Triton reads `tl.constexpr` from them."""

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _second_order_terms(u_ptr, x_ptr, g_ptr, c_ptr, grad_g_ptr, grad_x_ptr, numel, channel_stride, channels,
                        HAS_U: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    channel = (offsets // channel_stride) % channels
    x = tl.load(x_ptr + offsets, mask=inside).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=inside).to(tl.float32)
    c1 = tl.load(c_ptr + 1 * channels + channel, mask=inside)
    c2 = tl.load(c_ptr + 2 * channels + channel, mask=inside)
    c4 = tl.load(c_ptr + 4 * channels + channel, mask=inside)
    c5 = tl.load(c_ptr + 5 * channels + channel, mask=inside)
    c6 = tl.load(c_ptr + 6 * channels + channel, mask=inside)
    grad_g = c1 * x + c2
    grad_x = c4 * g + c5 * x + c6
    if HAS_U:
        u = tl.load(u_ptr + offsets, mask=inside).to(tl.float32)
        grad_g += tl.load(c_ptr + channel, mask=inside) * u
        grad_x += tl.load(c_ptr + 3 * channels + channel, mask=inside) * u
    tl.store(grad_g_ptr + offsets, grad_g.to(grad_g_ptr.dtype.element_ty), mask=inside)
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _first_order_terms(x_ptr, g_ptr, c_ptr, out_ptr, numel, channel_stride, channels, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    channel = (offsets // channel_stride) % channels
    x = tl.load(x_ptr + offsets, mask=inside).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=inside).to(tl.float32)
    a = tl.load(c_ptr + channel, mask=inside)
    b = tl.load(c_ptr + channels + channel, mask=inside)
    c = tl.load(c_ptr + 2 * channels + channel, mask=inside)
    tl.store(out_ptr + offsets, (a * g + b * x + c).to(out_ptr.dtype.element_ty), mask=inside)


def second_order_terms_triton(u: Optional[torch.Tensor], x: torch.Tensor, g: torch.Tensor, coefficients: torch.Tensor,
                              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x, g (and u) of one shape and one gap-free layout (gradinv.engine.bn_elementwise.fusable): the
    outputs share it, and the channel of each element follows from its offset in memory."""
    grad_g, grad_x = torch.empty_like(x, dtype=dtype), torch.empty_like(x, dtype=dtype)
    if x.numel() == 0:
        return grad_g, grad_x
    c = coefficients.to(torch.float32).contiguous()
    grid = (triton.cdiv(x.numel(), BLOCK),)
    _second_order_terms[grid](u if u is not None else x, x, g, c, grad_g, grad_x, x.numel(), max(x.stride(1), 1), x.shape[1],
                              HAS_U=u is not None, BLOCK=BLOCK)
    return grad_g, grad_x


def first_order_terms_triton(x: torch.Tensor, g: torch.Tensor, coefficients: torch.Tensor,
                             dtype: torch.dtype) -> torch.Tensor:
    """a·g + b·x + c (coefficients (3, C)), x and g as for second_order_terms_triton."""
    out = torch.empty_like(x, dtype=dtype)
    if x.numel():
        c = coefficients.to(torch.float32).contiguous()
        _first_order_terms[(triton.cdiv(x.numel(), BLOCK),)](x, g, c, out, x.numel(), max(x.stride(1), 1), x.shape[1],
                                                             BLOCK=BLOCK)
    return out
