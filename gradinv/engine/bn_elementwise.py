"""The elementwise parts of BatchNorm's written-out derivatives (gradinv.engine.batchnorm), each as one
operation. The double backward's two outputs, with per-channel coefficients c₀ … c₆ (each (C,)):

    grad_g = c₀·u + c₁·x + c₂                grad_x = c₃·u + c₄·g + c₅·x + c₆

(u may be None: its terms drop out). Composed of aten operations, these are five `addcmul`s
that read and write activation-sized tensors 13 times; on CUDA with Triton
(`engine.bn_double_backward: explicit-fused`) one kernel reads u, x and g once and writes the
two outputs: 5 passes (gradinv.engine.experimental.bn_elementwise_triton). And the input gradient of the backward
that also carries the BN prior's statistics, a·g + b·x + c: 5 passes composed, 3 fused. Every
other device runs the composed operations. They are custom operators
(`gradinv::bn_second_order_terms`, `gradinv::bn_first_order_terms`) so that what they move shows
as one operation to a dispatch mode (benchmarks/step_roofline.py counts each as its kernel runs
it) and fake tensors know their outputs' shapes."""

import functools
from collections.abc import Sequence
from typing import Optional

import torch

# No `from __future__ import annotations` here: torch.library reads the operator's schema from its
# annotations, and older torch releases do not read them as strings.


def channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel (C,) tensor shaped to broadcast against `like` (N, C, ...)."""
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def output_type(u: Optional[torch.Tensor], x: torch.Tensor, g: torch.Tensor, coefficients: torch.Tensor) -> torch.dtype:
    """The type the composed operations give (type promotion over all four; coefficients (7, C))."""
    tensors = [coefficients, x, g] + ([u] if u is not None else [])
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def second_order_terms_composed(u: Optional[torch.Tensor], x: torch.Tensor, g: torch.Tensor,
                                coefficients: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_g, grad_x) of the module docstring in aten operations (out of place: vmap has no
    batching rule for addcmul_); `coefficients` the seven (C,) tensors, or their (7, C) stack."""
    c = [channel_view(row, x) for row in coefficients]
    grad_g = torch.addcmul(c[2], x, c[1])
    grad_x = torch.addcmul(torch.addcmul(c[6], x, c[5]), g, c[4])
    if u is not None:
        grad_g = torch.addcmul(grad_g, u, c[0])
        grad_x = torch.addcmul(grad_x, u, c[3])
    return grad_g, grad_x


def fusable(u: Optional[torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the one-pass kernel takes these tensors: x, g (and u) of one shape and one memory
    layout without gaps (the layer's tensors are; anything else runs composed)."""
    tensors = [x, g] + ([u] if u is not None else [])
    return (x.dim() >= 2 and all(t.shape == x.shape and t.stride() == x.stride() for t in tensors)
            and _dense(x))


def _dense(t: torch.Tensor) -> bool:
    """No gaps and no overlaps in t's memory, whatever the order of its dimensions."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


@torch.library.custom_op("gradinv::bn_second_order_terms", mutates_args=())
def bn_second_order_terms(u: Optional[torch.Tensor], x: torch.Tensor, g: torch.Tensor,
                          coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return second_order_terms_composed(u, x, g, coefficients)


@bn_second_order_terms.register_kernel("cuda")
def _on_cuda(u, x, g, coefficients):
    try:
        from gradinv.engine.experimental.bn_elementwise_triton import second_order_terms_triton
    except ImportError:  # no Triton: the composed operations, the same results
        return second_order_terms_composed(u, x, g, coefficients)
    return second_order_terms_triton(u, x, g, coefficients, output_type(u, x, g, coefficients))


@bn_second_order_terms.register_fake
def _shapes(u, x, g, coefficients):
    dtype = output_type(u, x, g, coefficients)
    return torch.empty_like(x, dtype=dtype), torch.empty_like(x, dtype=dtype)


def second_order_terms(u: Optional[torch.Tensor], x: torch.Tensor, g: torch.Tensor,
                       coefficients: Sequence[torch.Tensor], fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_g, grad_x): through the custom operator where `fused` and the tensors allow it (the
    coefficients stacked for it; composed, they need no stacking)."""
    if fused and fusable(u, x, g):
        return bn_second_order_terms(u, x, g, torch.stack(list(coefficients)))
    return second_order_terms_composed(u, x, g, coefficients)


def first_order_terms_composed(x: torch.Tensor, g: torch.Tensor, coefficients: Sequence[torch.Tensor]) -> torch.Tensor:
    """a·g + b·x + c, coefficients (a, b, c) per channel, in aten operations (5 passes)."""
    a, b, c = (channel_view(row, x) for row in coefficients)
    return torch.addcmul(torch.addcmul(c, x, b), g, a)


@torch.library.custom_op("gradinv::bn_first_order_terms", mutates_args=())
def bn_first_order_terms(x: torch.Tensor, g: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    return first_order_terms_composed(x, g, coefficients)


@bn_first_order_terms.register_kernel("cuda")
def _first_order_on_cuda(x, g, coefficients):
    try:
        from gradinv.engine.experimental.bn_elementwise_triton import first_order_terms_triton
    except ImportError:
        return first_order_terms_composed(x, g, coefficients)
    return first_order_terms_triton(x, g, coefficients, output_type(None, x, g, coefficients))


@bn_first_order_terms.register_fake
def _first_order_shape(x, g, coefficients):
    return torch.empty_like(x, dtype=output_type(None, x, g, coefficients))


def first_order_terms(x: torch.Tensor, g: torch.Tensor, coefficients: Sequence[torch.Tensor], fused: bool) -> torch.Tensor:
    """a·g + b·x + c (BatchNorm's input gradient with the BN prior's statistics term): in one pass
    over x and g where `fused` and the tensors allow it (3 passes in all)."""
    if fused and fusable(None, x, g):
        return bn_first_order_terms(x, g, torch.stack(list(coefficients)))
    return first_order_terms_composed(x, g, coefficients)
