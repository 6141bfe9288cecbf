"""gradinv.engine.experimental.convolution: Conv2d with its double backward written out for the seeds under vmap
(engine.conv_double_backward: explicit, explicit-grouped)."""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradinv.attack.inversion import invert
from gradinv.attack.objective import LOSS_TERMS, Objective
from gradinv.client.step import train_mode_copy
from gradinv.engine.experimental.convolution import (LAYOUTS, SeedwiseConv2d, _Conv, _Geometry,
                                                     with_explicit_conv_double_backward)
from gradinv.engine.policy import attacker_model
from gradinv.pipeline.config import build_section

CPU = torch.device("cpu")


def _objective(model, artifact, labels, engine_settings: dict, seeds: int, **inversion_settings) -> Objective:
    """The objective on the attacker's model with the engine's layers of `engine_settings` swapped in."""
    engine = build_section("engine", engine_settings)
    return Objective(attacker_model(train_mode_copy(model), engine, CPU, seeds), artifact, labels,
                     build_section("inversion", inversion_settings))


@pytest.mark.slow
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_first_and_second_derivatives_match_finite_differences(bias):
    generator = torch.Generator().manual_seed(0)
    x, weight, b = (torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
                    for shape in ((2, 4, 7, 6), (6, 2, 3, 2), (6,)))
    geometry = _Geometry((2, 1), (1, 0), (1, 2), 2)  # every argument away from its default
    inputs = (x, weight, b) if bias else (x, weight)
    conv = lambda x, weight, b=None: _Conv.apply(x, weight, b, geometry, LAYOUTS["explicit"])  # noqa: E731
    expected = torch.nn.functional.conv2d(x, weight, b if bias else None, (2, 1), (1, 0), (1, 2), 2)
    assert torch.allclose(conv(*inputs), expected)
    assert torch.autograd.gradcheck(conv, inputs)
    assert torch.autograd.gradgradcheck(conv, inputs)


def test_only_plain_zero_padded_conv2d_layers_are_replaced():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding="same"),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ConvTranspose2d(4, 4, 3))
    kinds = [type(m) for m in with_explicit_conv_double_backward(model)]
    assert kinds == [SeedwiseConv2d, nn.Conv2d, nn.Conv2d, nn.ConvTranspose2d]


EXPLICIT_MODES = ["explicit", "explicit-grouped"]


def _objectives_and_image_gradients(attack64, settings: dict, batched: bool, explicit: str):
    model, _, artifact, images, labels = attack64
    generator = torch.Generator().manual_seed(1)
    xs = torch.stack([images, torch.randn(images.shape, generator=generator, dtype=torch.float64),
                      torch.randn(images.shape, generator=generator, dtype=torch.float64)]).requires_grad_(True)
    results = {}
    for mode in ("pytorch", explicit):
        objective = _objective(model, artifact, labels, {**settings, "conv_double_backward": mode}, len(xs))
        replaced = [isinstance(m, SeedwiseConv2d) for m in objective.model.modules() if isinstance(m, nn.Conv2d)]
        assert replaced and all(replaced) == (mode != "pytorch") and any(replaced) == (mode != "pytorch")
        if batched:
            terms = objective.batched_terms(xs, xs.flip(-1))
        else:
            per_seed = [objective.terms(x, None, lambda t: t.flip(-1)) for x in xs]
            terms = {k: torch.stack([t[k] for t in per_seed]) for k in LOSS_TERMS}
        results[mode] = terms, torch.autograd.grad(terms["total"].sum(), xs)[0]
    return results["pytorch"], results[explicit]


@pytest.mark.slow
@pytest.mark.parametrize("explicit", EXPLICIT_MODES)
@pytest.mark.parametrize("batched", [False, True], ids=["seed by seed", "seeds vmapped"])
@pytest.mark.parametrize("bn", ["pytorch", "explicit"])
def test_the_objective_and_its_image_gradient_are_pytorchs_to_float64_precision(attack64, batched, bn, explicit):
    """Through the test victim (a ResNet: strided and 1×1 convolutions, residual additions, BatchNorm
    of either kind), one seed at a time and with three seeds under vmap, in float64 (the victim is
    too ill-conditioned for float32 to tell formulas apart)."""
    (terms, grad), (ours, our_grad) = _objectives_and_image_gradients(attack64, {"bn_double_backward": bn}, batched,
                                                                      explicit)
    for name in LOSS_TERMS:
        assert torch.allclose(ours[name], terms[name], rtol=1e-10, atol=1e-12), name
    assert (our_grad - grad).norm() <= 1e-10 * grad.norm()


@pytest.mark.slow
def test_an_inversion_with_seeds_vmapped_follows_the_same_path_with_either_convolution(attack):
    """Same start; later no further from torch's convolutions than float rounding alone takes two
    runs of them (seeds vmapped against one by one)."""
    model, _, artifact, _, labels = attack
    config = build_section("inversion", {"iterations": 6, "seeds": 2, "warmup": 2, "log_every": 1, "jitter": 1,
                                         "langevin": 0.1})
    labels = sorted(labels.tolist())
    run = lambda **extra: invert(model, artifact, labels, config,  # noqa: E731
                                 engine=build_section("engine", {"device": "cpu", "seed_batch": 2, **extra}))
    pytorch = run(conv_double_backward="pytorch")
    rounded_otherwise = run(seed_batch=1, seed_workers=1)
    first = lambda result: [r["total"] for r in result.log if r["iteration"] == 0]  # noqa: E731
    moved = (pytorch.images - pytorch.initial).abs().mean().item()
    apart = lambda result: (result.images - pytorch.images).abs().mean().item() / moved  # noqa: E731
    for mode in EXPLICIT_MODES:
        explicit = run(conv_double_backward=mode)
        assert first(explicit) == pytest.approx(first(pytorch), rel=1e-5), mode
        assert apart(explicit) <= 2 * apart(rounded_otherwise) + 0.01, mode


@pytest.mark.parametrize("mode", EXPLICIT_MODES)
def test_under_vmap_biases_strides_and_the_models_own_groups_differentiate_as_torchs(mode):
    """What the test victim lacks (its convolutions have no bias and one group): a second
    derivative through the seeds' parameter gradients, three seeds vmapped, in float64."""
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.Tanh(), nn.Conv2d(6, 5, 1)).double()
    targets = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) for n, p in model.named_parameters()}
    xs = torch.randn(3, 2, 4, 9, 7, generator=generator, dtype=torch.float64, requires_grad=True)

    def image_gradient(net: nn.Module) -> torch.Tensor:
        params = dict(net.named_parameters())

        def one_seed(x):
            grads = torch.func.grad(lambda w: torch.func.functional_call(net, w, (x,)).square().sum())(params)
            return sum((grads[n] - targets[n]).square().sum() for n in grads)

        return torch.autograd.grad(torch.func.vmap(one_seed)(xs).sum(), xs)[0]

    expected = image_gradient(model)
    ours = image_gradient(with_explicit_conv_double_backward(copy.deepcopy(model), mode))
    assert (ours - expected).norm() <= 1e-10 * expected.norm()


@pytest.mark.slow
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
    for precision, mode in (("float32", "pytorch"), ("bfloat16", "pytorch"), *(("bfloat16", m) for m in EXPLICIT_MODES)):
        objective = _objective(model, artifact, labels,
                               {"precision": precision, "conv_double_backward": mode, "seed_batch": 2}, len(xs))
        model_copy, _ = objective._functional_model()
        hooks = [m.register_forward_hook(recorded) for m in model_copy.modules() if isinstance(m, SeedwiseConv2d)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float32", cache_enabled=False):
            terms = objective.batched_terms(xs, xs.flip(-1))
        grads[precision, mode] = torch.autograd.grad(terms["total"].sum(), xs)[0]
        for hook in hooks:
            hook.remove()
    assert convolved_in == {torch.bfloat16}
    half_error = (grads["bfloat16", "pytorch"] - grads["float32", "pytorch"]).norm()
    assert half_error > 0
    for mode in EXPLICIT_MODES:
        # Repeated identical bfloat16 calls on a CPU differ by up to ~0.09 of the half error (oneDNN's
        # bfloat16 kernels are not bit-reproducible), so the bound leaves room for that.
        assert (grads["bfloat16", mode] - grads["bfloat16", "pytorch"]).norm() <= 0.25 * half_error, mode


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


class _Convolutions(TorchDispatchMode):
    """The groups of every convolution, the bytes every copy writes (clone, copy_) and the channels
    of every copied activation (5-D: seeds, batch, channels, height, width)."""

    def __init__(self):
        super().__init__()
        self.groups, self.copied, self.copied_channels = set(), 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket is torch.ops.aten.convolution:
            self.groups.add(args[8])
        elif func._overloadpacket is torch.ops.aten.convolution_backward:
            self.groups.add(args[9])
        elif func._overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_):
            self.copied += out.numel() * out.element_size()
            if out.dim() == 5:
                self.copied_channels.add(out.shape[2])
        return out


def _seeds_vmapped_step(attack, **settings) -> _Convolutions:
    """What the convolutions and copies of three seeds' batched objective and image gradient were."""
    model, _, artifact, images, labels = attack
    xs = torch.stack([images] * 3).requires_grad_(True)
    objective = _objective(model, artifact, labels, settings, len(xs))
    objective.batched_terms(xs)  # the model's functional copy made outside the count
    with _Convolutions() as seen:
        torch.autograd.grad(objective.batched_terms(xs)["total"].sum(), xs)
    return seen


@pytest.mark.slow
def test_under_vmap_explicit_runs_no_convolution_grouped_over_the_seeds_and_grouped_runs_torchs(attack):
    """What `explicit` is for: torch's batching rules run each seed's own weight gradient (and the
    second derivative's convolutions with its upstream gradient) as one convolution grouped over
    the seeds; with `explicit` every convolution keeps the model's own groups, and
    `explicit-grouped` groups them over the seeds as torch does."""
    assert {m.groups for m in attack[0].modules() if isinstance(m, nn.Conv2d)} == {1}
    seen = {mode: _seeds_vmapped_step(attack, conv_double_backward=mode).groups
            for mode in ("pytorch", *EXPLICIT_MODES)}
    assert seen == {"pytorch": {1, 3}, "explicit": {1}, "explicit-grouped": {1, 3}}


@pytest.mark.slow
def test_under_vmap_grouped_copies_no_activations_between_layouts(attack):
    """What `explicit-grouped` is for: with the written-out BatchNorm (which folds the seeds into the
    channels), the convolutions take the seeds where BatchNorm left them. What it still copies is
    the images (3 channels) and the stem's 64 channels around the max-pooling, whose batching rule
    folds the seeds into the batch; torch's convolutions copy the activations of every stage."""
    seen = {mode: _seeds_vmapped_step(attack, conv_double_backward=mode, bn_double_backward="explicit")
            for mode in ("pytorch", "explicit-grouped")}
    assert {channels for channels in seen["pytorch"].copied_channels if channels > 64} == {128, 256, 512}
    assert seen["explicit-grouped"].copied_channels == {3, 64}
    assert seen["explicit-grouped"].copied <= 0.3 * seen["pytorch"].copied  # measured: 1.1 against 4.6 MB
