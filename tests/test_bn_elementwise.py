"""gradinv.engine.bn_elementwise: BatchNorm's double backward, its elementwise outputs in one operation
(`engine.bn_double_backward: explicit-fused`), and the Triton kernel that runs it on CUDA,
here through Triton's interpreter on the CPU."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.step_roofline import TrafficCount
from gradinv.attack.objective import Objective
from gradinv.client.step import train_mode_copy
from gradinv.engine import attacker_model
from gradinv.engine.bn_elementwise import (first_order_terms, first_order_terms_composed, fusable, second_order_terms,
                                           second_order_terms_composed)
from gradinv.pipeline.config import build_section

REPO = Path(__file__).resolve().parents[1]


def _names(counter: TrafficCount) -> list[str]:
    return [name for name, _, _ in counter.ops]


def _moved(counter: TrafficCount) -> int:
    return sum(moved for _, moved, _ in counter.ops)


def _tensors(shape=(3, 5, 4, 6), seed=0, dtype=torch.float32, memory_format=torch.contiguous_format):
    generator = torch.Generator().manual_seed(seed)
    u, x, g = (torch.randn(shape, generator=generator).to(dtype=dtype, memory_format=memory_format) for _ in range(3))
    return u, x, g, torch.randn(7, shape[1], generator=generator)


def test_the_composed_operations_give_the_documented_affine_combinations():
    u, x, g, c = (t.double() for t in _tensors())
    grad_g, grad_x = second_order_terms_composed(u, x, g, c)
    k = [row.view(1, -1, 1, 1) for row in c]
    assert torch.allclose(grad_g, k[0] * u + k[1] * x + k[2], rtol=1e-12)
    assert torch.allclose(grad_x, k[3] * u + k[4] * g + k[5] * x + k[6], rtol=1e-12)
    without_u = second_order_terms_composed(None, x, g, c)
    assert torch.allclose(without_u[0], k[1] * x + k[2]) and torch.allclose(without_u[1], k[4] * g + k[5] * x + k[6])
    assert torch.allclose(first_order_terms_composed(x, g, c[:3]), k[0] * g + k[1] * x + k[2], rtol=1e-12)


def test_only_tensors_of_one_gap_free_layout_are_fused():
    u, x, g, _ = _tensors()
    assert fusable(u, x, g) and fusable(None, x, g)
    last = [t.contiguous(memory_format=torch.channels_last) for t in (u, x, g)]
    assert fusable(*last)
    assert not fusable(last[0], x, g)  # layouts differ
    assert not fusable(u, x[:, :, :, :3], g[:, :, :, :3])  # shapes differ
    assert not fusable(u[:, :, :, ::2], x[:, :, :, ::2], g[:, :, :, ::2])  # gaps in memory
    assert not fusable(None, x[:, :1].expand_as(x), g[:, :1].expand_as(g))  # overlapping


def test_fused_the_two_outputs_are_one_operation_moving_five_passes_instead_of_thirteen():
    u, x, g, c = _tensors(shape=(4, 8, 16, 16))
    c = tuple(c)  # as gradinv.engine.batchnorm hands them over
    size = x.numel() * x.element_size()
    with TrafficCount() as composed:
        expected = second_order_terms(u, x, g, c, fused=False)
    with TrafficCount() as fused:
        got = second_order_terms(u, x, g, c, fused=True)
    assert _names(fused) == ["stack", "bn_second_order_terms"] and _names(composed).count("addcmul") == 5
    kernel = fused.ops[-1][1]
    assert kernel == 5 * size + 7 * 8 * 4  # u, x, g read, two outputs written, and the 7 × 8 coefficients
    assert _moved(composed) >= 13 * size and "stack" not in _names(composed)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))  # on the CPU the operator runs the composed ones
    with TrafficCount() as first_order:
        got = first_order_terms(x, g, c[:3], fused=True)
    assert _names(first_order) == ["stack", "bn_first_order_terms"]
    assert first_order.ops[-1][1] == 3 * size + 3 * 8 * 4  # x and g read, one output written, 3 × 8 coefficients
    assert torch.equal(got, first_order_terms(x, g, c[:3], fused=False))
    with FakeTensorMode():
        u, x, g, c = _tensors(memory_format=torch.channels_last)
        fake = [*second_order_terms(u, x, g, c, fused=True), first_order_terms(x, g, c[:3], fused=True)]
    assert all(t.shape == (3, 5, 4, 6) and t.is_contiguous(memory_format=torch.channels_last) for t in fake)


def test_the_objective_and_image_gradient_are_the_same_with_the_elementwise_part_fused(attack64):
    """Seeds vmapped, in float64: bn_double_backward explicit-fused runs the custom operators in every
    layer (the double backward's, and the input gradient's with the BN prior's statistics) and lands
    where explicit does: the same objective, and the image gradient within float64 rounding (the
    CPU runs the double backward's operations as explicit does, and the statistics term as the
    backward's sums and then a·g + b·x + c, another order of the same arithmetic)."""
    model, _, artifact, images, labels = attack64
    xs = torch.stack([images, torch.randn(images.shape, generator=torch.Generator().manual_seed(1),
                                          dtype=torch.float64)]).requires_grad_(True)
    results = {}
    for mode in ("explicit", "explicit-fused"):
        engine = build_section("engine", {"device": "cpu", "bn_double_backward": mode})
        attacker = attacker_model(train_mode_copy(model), engine, torch.device("cpu"), seeds=2)
        objective = Objective(attacker, artifact, labels, build_section("inversion", {"seeds": 2}))
        with TrafficCount() as operations:
            terms = objective.batched_terms(xs, xs)
            grad = torch.autograd.grad(terms["total"].sum(), xs)[0]
        results[mode] = terms["total"], grad, [_names(operations).count(f"bn_{order}_order_terms")
                                               for order in ("first", "second")]
    layers = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert results["explicit"][2] == [0, 0] and results["explicit-fused"][2] == [layers, layers] and layers > 0
    assert torch.equal(results["explicit"][0], results["explicit-fused"][0])
    grad, fused_grad = results["explicit"][1], results["explicit-fused"][1]
    assert (fused_grad - grad).norm() <= 1e-12 * grad.norm()  # measured: 5e-16


_INTERPRETED = textwrap.dedent("""
    import torch
    from gradinv.engine.bn_elementwise import first_order_terms_composed, second_order_terms_composed, output_type
    from gradinv.engine.experimental.bn_elementwise_triton import BLOCK, first_order_terms_triton, second_order_terms_triton
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    shape = (3, 5, 7, 11)  # 1155 elements: a block and a part of one
    assert torch.Size(shape).numel() % BLOCK
    for layout in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.float16):
            for with_u in (True, False):
                u, x, g = (torch.randn(shape, generator=generator).to(dtype=dtype, memory_format=layout) for _ in range(3))
                c = torch.randn(7, shape[1], generator=generator)
                u = u if with_u else None
                expected = second_order_terms_composed(u, x, g, c)
                got = second_order_terms_triton(u, x, g, c, output_type(u, x, g, c))
                expected += (first_order_terms_composed(x, g, c[:3]),)
                got += (first_order_terms_triton(x, g, c[:3], output_type(None, x, g, c)),)
                for e, o in zip(expected, got):
                    assert o.dtype == e.dtype and o.stride() == e.stride(), (o.dtype, o.stride(), e.stride())
                    worst = max(worst, ((o - e).abs() / (e.abs() + 1)).max().item())
    print(worst)
""")


def test_the_triton_kernel_gives_the_composed_results_in_either_layout_and_type():
    """Triton's interpreter runs the CUDA kernel on CPU tensors (it must be set before Triton
    compiles: its own process). float16 tensors with float32 coefficients give float32 outputs,
    as type promotion does for the composed operations."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-6  # float32 arithmetic, another order of rounding


def test_the_cuda_benchmark_says_in_one_sentence_that_it_needs_a_gpu(tmp_path):
    out = tmp_path / "bn_elementwise.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "benchmarks.bn_elementwise_check", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stdout and not out.exists()
    assert len(done.stdout.strip().splitlines()) == 1 and not done.stderr.strip()


def test_the_triton_kernel_compiles_for_an_h100_without_one():
    """Triton compiles ahead of time for a target it is told of (here sm_90, an H100's), down to the
    GPU's binary: the compiled path, which the interpreter does not take, at least builds."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gradinv.engine.experimental.bn_elementwise_triton import BLOCK, _first_order_terms, _second_order_terms

    for tensors, has_u in (("fp32", True), ("fp16", False)):
        signature = {"u_ptr": f"*{tensors}", "x_ptr": f"*{tensors}", "g_ptr": f"*{tensors}", "c_ptr": "*fp32",
                     "grad_g_ptr": "*fp32", "grad_x_ptr": "*fp32", "numel": "i64", "channel_stride": "i64",
                     "channels": "i32", "HAS_U": "constexpr", "BLOCK": "constexpr"}
        source = ASTSource(fn=_second_order_terms, signature=signature, constexprs={"HAS_U": has_u, "BLOCK": BLOCK})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
        signature = {"x_ptr": f"*{tensors}", "g_ptr": f"*{tensors}", "c_ptr": "*fp32", "out_ptr": "*fp32",
                     "numel": "i64", "channel_stride": "i64", "channels": "i32", "BLOCK": "constexpr"}
        source = ASTSource(fn=_first_order_terms, signature=signature, constexprs={"BLOCK": BLOCK})
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]


@pytest.mark.slow
def test_an_inversion_with_the_elementwise_part_fused_is_explicits_on_the_cpu(attack, monkeypatch):
    """Seeds on threads, each seed's step alone (no vmap): the operator runs in every step, and the
    images stay closer to explicit's than float rounding alone takes two runs of explicit (seeds on
    threads of one torch thread each against one by one on all threads: other reduction orders).
    Two iterations: measured 4.6e-6 of their movement against the yardstick's 3.5e-5. From the third
    on, Adam's ±lr steps on gradients near zero amplify either difference by orders (1.4e-3 against
    4.4e-4 at iteration 3 on this test's victim, with fb08d0d's library as with this one)."""
    import gradinv.engine.bn_elementwise as bn_elementwise
    from gradinv.attack.inversion import invert

    calls = []
    operator = bn_elementwise.bn_second_order_terms
    monkeypatch.setattr(bn_elementwise, "bn_second_order_terms", lambda *args: calls.append(1) or operator(*args))
    model, _, artifact, _, labels = attack
    config = build_section("inversion", {"iterations": 2, "seeds": 2, "warmup": 1, "log_every": 1, "registration": "none"})
    results = {}
    for mode, workers in (("explicit", 0), ("explicit-fused", 0), ("explicit", 1)):
        engine = build_section("engine", {"device": "cpu", "bn_double_backward": mode, "seed_workers": workers})
        before = len(calls)
        result = invert(model, artifact, sorted(labels.tolist()), config, engine=engine)
        results[mode, workers] = (result.images, result.initial), len(calls) - before
    layers = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert results["explicit", 0][1] == 0 and results["explicit-fused", 0][1] >= 2 * 2 * layers  # every iteration, seed, layer
    (images, initial), (fused_images, _), (one_by_one, _) = (results[k][0] for k in (("explicit", 0), ("explicit-fused", 0),
                                                                                     ("explicit", 1)))
    moved = (images - initial).abs().mean()
    noise = (one_by_one - images).abs().mean()
    assert noise > 0 and (fused_images - images).abs().mean() <= max(noise, 1e-6 * moved)
