"""benchmarks/step_roofline.py: what it counts as an operation's traffic and FLOPs."""

import pytest
import torch

from benchmarks.step_roofline import TrafficCount, count_step


def test_roofline_counts_data_movement_and_grouped_convolutions_per_group():
    """benchmarks/step_roofline.py: views move nothing, an add moves its inputs and output, and a
    grouped convolution's backward costs what its groups cost one by one."""
    a, b = torch.randn(64, 32), torch.randn(64, 32)
    with TrafficCount() as counter:
        a.view(32, 64).t()
        a + b
    assert [(name, moved) for name, moved, _ in counter.ops] == [("add", 3 * 64 * 32 * 4)]

    def backward_flops(x, weight, groups):
        x = x.requires_grad_(True)
        out = torch.nn.functional.conv2d(x, weight, groups=groups)
        with TrafficCount() as counter:
            torch.autograd.grad(out.sum(), (x, weight))
        return sum(flops for name, _, flops in counter.ops if name == "convolution_backward")

    x, weight = torch.randn(2, 6, 8, 8), torch.randn(4, 3, 3, 3)
    grouped = backward_flops(x, weight.clone().requires_grad_(True), 2)
    alone = sum(backward_flops(x[:, 3 * i:3 * i + 3].clone(), weight[2 * i:2 * i + 2].clone().requires_grad_(True), 1)
                for i in range(2))
    assert grouped == alone > 0


def test_roofline_counts_no_traffic_for_allocations_and_an_out_argument_as_written_only():
    a, b = torch.randn(64, 32), torch.randn(64, 32)
    size = 64 * 32 * 4
    out = torch.empty_like(a)
    with TrafficCount() as counter:
        torch.empty_like(a)
        a.new_empty((64, 32))
        a.new_empty(0).set_(a.untyped_storage(), 0, a.shape, a.stride())  # the same memory, nothing moved
        torch.add(a, b, out=out)  # reads a and b, writes out
        a.add_(b)  # reads a and b, writes a
        a.new_zeros((64, 32))  # writes its output, reads nothing of a
    assert [(name, moved) for name, moved, _ in counter.ops] == [("add", 3 * size), ("add_", 3 * size),
                                                                   ("new_zeros", size)]


def test_roofline_counts_what_a_convolution_backward_reads_for_what_it_computes():
    """An input gradient (dgrad) reads the upstream gradient and the weight, a weight gradient (wgrad)
    the upstream gradient and the input; each takes the other tensor for its shape only."""
    x, weight, grad = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(2, 4, 6, 6)
    size = lambda t: t.numel() * 4  # noqa: E731
    with TrafficCount() as counter:
        for mask in ([True, False, False], [False, True, False], [True, True, False]):
            torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask)
    assert [moved for _, moved, _ in counter.ops] == [
        size(grad) + size(weight) + size(x), size(grad) + size(x) + size(weight),
        size(grad) + size(weight) + size(x) + size(x) + size(weight)]


def test_roofline_counts_batch_norms_backward_writing_only_the_gradients_its_mask_asks_for():
    """Fake tensors (which the step is counted on) get all three gradients from batch norm's
    backward whatever its output mask; the kernel writes only those asked for."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        g, x, per_channel = torch.randn(8, 64, 32, 32), torch.randn(8, 64, 32, 32), torch.ones(64)
        with TrafficCount() as counter:
            for mask in ([True, True, True], [False, True, True]):
                torch.ops.aten.native_batch_norm_backward(g, x, per_channel, None, None, per_channel, per_channel,
                                                          True, 0.0, mask)
    size, channels = g.numel() * 4, 64 * 4
    assert [moved for _, moved, _ in counter.ops] == [3 * size + 5 * channels, 2 * size + 5 * channels]


@pytest.mark.slow
def test_the_step_under_half_precision_moves_less_for_the_same_arithmetic():
    """The engine's step counted under engine.precision: the convolutions' outputs and what follows
    them stored in two bytes, the FLOPs unchanged, a few casts more (ResNet-50, 224 px, bs 1, G 2)."""
    full, half = (count_step(1, 2, "explicit", precision=p) for p in ("float32", "bfloat16"))
    assert half["flops"] == full["flops"] and half["ops"] > full["ops"]
    assert 0.45 * full["bytes"] < half["bytes"] < 0.75 * full["bytes"]  # measured at bs 8 G 8: 160 of 267 GB
