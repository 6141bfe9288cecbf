"""gradinv.convolution: Conv2d with each seed's convolutions dense (inversion.conv_double_backward: explicit)."""

import pytest
import torch
from torch import nn

from gradinv.client import train_mode_copy
from gradinv.config import build_section
from gradinv.convolution import SeedwiseConv2d, _Conv, _Geometry, with_explicit_conv_double_backward
from gradinv.errors import UserError
from gradinv.inversion import invert
from gradinv.objective import LOSS_TERMS, Objective


@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_first_and_second_derivatives_match_finite_differences(bias):
    generator = torch.Generator().manual_seed(0)
    x, weight, b = (torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
                    for shape in ((2, 4, 7, 6), (6, 2, 3, 2), (6,)))
    geometry = _Geometry((2, 1), (1, 0), (1, 2), 2)  # every argument away from its default
    inputs = (x, weight, b) if bias else (x, weight)
    conv = lambda x, weight, b=None: _Conv.apply(x, weight, b, geometry)  # noqa: E731
    expected = torch.nn.functional.conv2d(x, weight, b if bias else None, (2, 1), (1, 0), (1, 2), 2)
    assert torch.allclose(conv(*inputs), expected)
    assert torch.autograd.gradcheck(conv, inputs)
    assert torch.autograd.gradgradcheck(conv, inputs)


def test_only_plain_zero_padded_conv2d_layers_are_replaced():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding="same"),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ConvTranspose2d(4, 4, 3))
    kinds = [type(m) for m in with_explicit_conv_double_backward(model)]
    assert kinds == [SeedwiseConv2d, nn.Conv2d, nn.Conv2d, nn.ConvTranspose2d]


def _objectives_and_image_gradients(attack64, settings: dict, batched: bool):
    model, _, artifact, images, labels = attack64
    generator = torch.Generator().manual_seed(1)
    xs = torch.stack([images, torch.randn(images.shape, generator=generator, dtype=torch.float64),
                      torch.randn(images.shape, generator=generator, dtype=torch.float64)]).requires_grad_(True)
    results = {}
    for mode in ("pytorch", "explicit"):
        config = build_section("inversion", {**settings, "conv_double_backward": mode})
        objective = Objective(train_mode_copy(model), artifact, labels, config)
        replaced = [isinstance(m, SeedwiseConv2d) for m in objective.model.modules() if isinstance(m, nn.Conv2d)]
        assert replaced and all(replaced) == (mode == "explicit") and any(replaced) == (mode == "explicit")
        if batched:
            terms = objective.batched_terms(xs, xs.flip(-1))
        else:
            per_seed = [objective.terms(x, None, lambda t: t.flip(-1)) for x in xs]
            terms = {k: torch.stack([t[k] for t in per_seed]) for k in LOSS_TERMS}
        results[mode] = terms, torch.autograd.grad(terms["total"].sum(), xs)[0]
    return results["pytorch"], results["explicit"]


@pytest.mark.parametrize("batched", [False, True], ids=["seed by seed", "seeds vmapped"])
@pytest.mark.parametrize("bn", ["pytorch", "explicit"])
def test_the_objective_and_its_image_gradient_are_pytorchs_to_float64_precision(attack64, batched, bn):
    """Through the test victim (a ResNet: strided and 1×1 convolutions, residual additions, BatchNorm
    of either kind), one seed at a time and with three seeds under vmap, in float64 (the victim is
    too ill-conditioned for float32 to tell formulas apart)."""
    (terms, grad), (ours, our_grad) = _objectives_and_image_gradients(attack64, {"bn_double_backward": bn}, batched)
    for name in LOSS_TERMS:
        assert torch.allclose(ours[name], terms[name], rtol=1e-10, atol=1e-12), name
    assert (our_grad - grad).norm() <= 1e-10 * grad.norm()


def test_an_inversion_with_seeds_vmapped_follows_the_same_path_with_either_convolution(attack):
    """Same start; later no further from torch's convolutions than float rounding alone takes two
    runs of them (seeds vmapped against one by one)."""
    model, _, artifact, _, labels = attack
    settings = {"iterations": 6, "seeds": 2, "seed_batch": 2, "warmup": 2, "log_every": 1, "device": "cpu",
                "jitter": 1, "langevin": 0.1}
    labels = sorted(labels.tolist())
    run = lambda **extra: invert(model, artifact, labels, build_section("inversion", {**settings, **extra}))  # noqa: E731
    pytorch, explicit = run(conv_double_backward="pytorch"), run(conv_double_backward="explicit")
    rounded_otherwise = run(seed_batch=1, seed_workers=1)
    first = lambda result: [r["total"] for r in result.log if r["iteration"] == 0]  # noqa: E731
    assert first(explicit) == pytest.approx(first(pytorch), rel=1e-5)
    moved = (pytorch.images - pytorch.initial).abs().mean().item()
    apart = lambda result: (result.images - pytorch.images).abs().mean().item() / moved  # noqa: E731
    assert apart(explicit) <= 2 * apart(rounded_otherwise) + 0.01


def test_the_config_refuses_stacked_seeds_with_it():
    with pytest.raises(UserError, match="not 'inversion.batched_seeds' stacked"):
        build_section("inversion", {"batched_seeds": "stacked", "conv_double_backward": "explicit"})


def test_under_autocast_it_convolves_in_the_half_type_and_adds_no_error_of_its_own(attack):
    """As autocast runs torch's convolutions (in bfloat16; each backward in the type its forward
    ran in), so that the image gradient is torch's under the same autocast, far closer to it than
    either is to float32's."""
    model, _, artifact, images, labels = attack
    xs = torch.stack([images, torch.randn(images.shape, generator=torch.Generator().manual_seed(1))]).requires_grad_(True)
    convolved_in = set()

    def recorded(module, args, out):
        convolved_in.add(out.dtype)

    grads = {}
    for precision, mode in (("float32", "pytorch"), ("bfloat16", "pytorch"), ("bfloat16", "explicit")):
        config = build_section("inversion", {"precision": precision, "conv_double_backward": mode, "seed_batch": 2})
        objective = Objective(train_mode_copy(model), artifact, labels, config)
        model_copy, _ = objective._functional_model()
        hooks = [m.register_forward_hook(recorded) for m in model_copy.modules() if isinstance(m, SeedwiseConv2d)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float32", cache_enabled=False):
            terms = objective.batched_terms(xs, xs.flip(-1))
        grads[precision, mode] = torch.autograd.grad(terms["total"].sum(), xs)[0]
        for hook in hooks:
            hook.remove()
    assert convolved_in == {torch.bfloat16}
    half_error = (grads["bfloat16", "pytorch"] - grads["float32", "pytorch"]).norm()
    assert half_error > 0 and (grads["bfloat16", "explicit"] - grads["bfloat16", "pytorch"]).norm() <= 0.05 * half_error


def test_under_autocast_the_backwards_keep_the_half_copies():
    """As torch's autocast convolution does: what the backward reads is the half-type input and
    weight (half the bytes), not the float32 tensors cast again in every backward."""
    conv = with_explicit_conv_double_backward(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)))[0]
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    assert [t.dtype for t in y.grad_fn.saved_tensors] == [torch.bfloat16, torch.bfloat16]
    grad_x, = torch.autograd.grad(y.float().square().sum(), x, create_graph=True)
    assert grad_x.dtype == torch.float32
    assert [t.dtype for t in grad_x.grad_fn.next_functions[0][0].saved_tensors] == [torch.bfloat16] * 3


def test_under_vmap_no_convolution_is_grouped_over_the_seeds(attack):
    """What the explicit convolution is for: torch's batching rules run each seed's own weight
    gradient (and the second derivative's convolutions with its upstream gradient) as one
    convolution grouped over the seeds; here every convolution keeps the model's own groups."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Groups(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket is torch.ops.aten.convolution:
                self.seen.add(args[8])
            elif func._overloadpacket is torch.ops.aten.convolution_backward:
                self.seen.add(args[9])
            return func(*args, **(kwargs or {}))

    model, _, artifact, images, labels = attack
    assert {m.groups for m in model.modules() if isinstance(m, nn.Conv2d)} == {1}
    xs = torch.stack([images] * 3).requires_grad_(True)
    seen = {}
    for mode in ("pytorch", "explicit"):
        objective = Objective(train_mode_copy(model), artifact, labels,
                              build_section("inversion", {"conv_double_backward": mode}))
        with Groups() as groups:
            torch.autograd.grad(objective.batched_terms(xs)["total"].sum(), xs)
        seen[mode] = groups.seen
    assert seen == {"pytorch": {1, 3}, "explicit": {1}}
