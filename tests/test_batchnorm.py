"""gradinv.engine.batchnorm: BatchNorm with its second derivative written out (engine.bn_double_backward: explicit)."""

import pytest
import torch
import torch.nn.functional as F

from gradinv.attack.inversion import invert
from gradinv.attack.objective import LOSS_TERMS, Objective
from gradinv.client.step import batch_statistics, recorded_bn_statistics, train_mode_copy
from gradinv.engine.batchnorm import TrainBatchNorm2d, _BatchNormTrain, with_explicit_double_backward
from gradinv.engine.policy import attacker_model
from gradinv.pipeline.config import build_section

CPU = torch.device("cpu")


@pytest.mark.slow
def test_first_and_second_derivatives_match_finite_differences():
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
              for shape in ((3, 4, 5, 5), (4,), (4,))]
    batch_norm = lambda x, weight, bias: _BatchNormTrain.apply(x, weight, bias, 1e-5, False, 0, False)  # noqa: E731
    y, mean, var = batch_norm(*inputs)
    assert torch.allclose(y, F.batch_norm(*inputs[:1], None, None, *inputs[1:], True, 0.0, 1e-5))
    expected_mean, expected_var = batch_statistics(inputs[0])
    assert torch.allclose(mean, expected_mean) and torch.allclose(var, expected_var)
    assert torch.autograd.gradcheck(batch_norm, inputs)
    assert torch.autograd.gradgradcheck(batch_norm, inputs)


def _terms_and_image_gradient(attack64, bn_double_backward: str, batched: bool):
    """Two seeds' terms and image gradients in float64, the model seeing flipped images."""
    model, _, artifact, images, labels = attack64
    generator = torch.Generator().manual_seed(1)
    xs = torch.stack([images, torch.randn(images.shape, generator=generator, dtype=torch.float64)]).requires_grad_(True)
    engine = build_section("engine", {"bn_double_backward": bn_double_backward})
    objective = Objective(attacker_model(train_mode_copy(model), engine, CPU, len(xs)), artifact, labels,
                          build_section("inversion", {}))
    if batched:
        terms = objective.batched_terms(xs, xs.flip(-1))
    else:
        per_seed = [objective.terms(x, None, lambda t: t.flip(-1)) for x in xs]
        terms = {k: torch.stack([t[k] for t in per_seed]) for k in LOSS_TERMS}
    return terms, torch.autograd.grad(terms["total"].sum(), xs)[0]


@pytest.mark.parametrize("batched", [False, True], ids=["seed by seed", "seeds batched"])
def test_the_objective_and_its_image_gradient_are_pytorchs_seed_by_seed_to_float64_precision(attack64, batched):
    """Through a ResNet with residual additions and in-place ReLUs after BatchNorm, one seed at a
    time and under vmap (where the seeds fold into the channels), against PyTorch's BatchNorm
    seed by seed. (PyTorch's own BatchNorm under vmap is the one that is off: on this victim its
    image gradient lies ~2e-4 from its seed-by-seed self, in float64.)"""
    terms, grad = _terms_and_image_gradient(attack64, "pytorch", batched=False)
    ours, our_grad = _terms_and_image_gradient(attack64, "explicit", batched)
    for name in LOSS_TERMS:
        assert torch.allclose(ours[name], terms[name], rtol=1e-10, atol=1e-12), name
    assert (our_grad - grad).norm() <= 1e-10 * grad.norm()  # measured: ~5e-15


@pytest.mark.slow
def test_an_inversion_follows_the_same_path_with_either_double_backward(attack):
    """Same start; later no further from PyTorch's BatchNorm than float rounding alone takes two
    runs of it (seeds on threads against one by one: on this ill-conditioned victim, ~5 % of how
    far the images moved after 6 iterations)."""
    model, _, artifact, _, labels = attack
    config = build_section("inversion", {"iterations": 6, "seeds": 2, "warmup": 2, "log_every": 1, "jitter": 1, "langevin": 0.1})
    labels = sorted(labels.tolist())
    run = lambda **extra: invert(model, artifact, labels, config,  # noqa: E731
                                 engine=build_section("engine", {"device": "cpu", **extra}))
    pytorch, explicit = run(bn_double_backward="pytorch"), run(bn_double_backward="explicit")
    rounded_otherwise = run(bn_double_backward="pytorch", seed_workers=1)
    first = lambda result: [r["total"] for r in result.log if r["iteration"] == 0]  # noqa: E731
    assert first(explicit) == pytest.approx(first(pytorch), rel=1e-5)
    moved = (pytorch.images - pytorch.initial).abs().mean().item()
    apart = lambda result: (result.images - pytorch.images).abs().mean().item() / moved  # noqa: E731
    assert apart(explicit) <= 2 * apart(rounded_otherwise) + 0.01


@pytest.mark.slow
@pytest.mark.parametrize("option", ["bn_double_backward", "conv_double_backward"])
def test_a_fedavg_replay_differentiates_the_same_with_either_double_backward(attack, option):
    """The FedAvg replay (SGD steps on mini-batches, create_graph) runs through the module
    forward too, BatchNorm's and (gradinv.engine.experimental.convolution) the convolutions'. In float64 and one epoch: BatchNorm over mini-batches of two images on 1×1 maps
    is so ill-conditioned that float32 runs of the *same* formula land 40 % from the float64
    loss, and a second epoch is chaotic (a 1e-13 change of the images moves the update by 100 %)."""
    from gradinv.client.capture import client_update

    model, meta, _, images, labels = attack
    model, images = model.double(), images.double()
    fields = {"arch": meta.arch, "num_classes": meta.num_classes, "input_shape": meta.input_shape,
              "mean": meta.mean, "std": meta.std}
    fedavg = [{"kind": "fedavg", "steps": 1, "lr": 0.01, "batch_size": 2, "known_to_attacker": True}]
    shared = client_update(model, images, labels, "none", fields, fedavg)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = (images + 0.1 * noise).requires_grad_(True)  # near the batch: from noise, SGD steps blow up (chaotic)
    results = []
    for mode in ("pytorch", "explicit"):
        attacker = attacker_model(train_mode_copy(model), build_section("engine", {option: mode}), CPU, 1)
        total = Objective(attacker, shared, labels, build_section("inversion", {"bn_prior": "none"})).terms(x)["total"]
        results.append((total, *torch.autograd.grad(total, x)))
    (total, grad), (our_total, our_grad) = results
    assert our_total.item() == pytest.approx(total.item(), rel=1e-7)  # measured: 4e-10 (BatchNorm)
    assert (our_grad - grad).norm() <= 1e-6 * grad.norm()  # measured: 2e-9 (BatchNorm)


def test_recorded_statistics_come_from_the_layers_forward_and_the_layer_forgets_its_recorder(attack):
    model = with_explicit_double_backward(train_mode_copy(attack[0]))
    images = attack[3]
    layers = [m for m in model.modules() if isinstance(m, TrainBatchNorm2d)]
    inputs = []
    hooks = [m.register_forward_hook(lambda _m, args, _out: inputs.append(args[0])) for m in layers]
    with recorded_bn_statistics(model) as stats:
        model(images)
    for hook in hooks:
        hook.remove()
    assert len(stats) == len(layers) == len(inputs) > 0
    for (mean, var), x in zip(stats.values(), inputs):
        assert mean.grad_fn is not None and var.grad_fn is not None  # the BN prior differentiates them
        expected_mean, expected_var = batch_statistics(x)
        assert torch.allclose(mean, expected_mean, atol=1e-6) and torch.allclose(var, expected_var, rtol=1e-5, atol=1e-6)
    assert all(m.statistics_sink is None for m in layers)  # no graph is kept alive past the forward


@pytest.mark.slow
def test_with_the_seeds_vmapped_pytorchs_batchnorm_is_the_one_off(attack64):
    """What README, Speed, says of PyTorch's BatchNorm under vmap (seen with torch 2.14): its image
    gradient lies ~2e-4 from its seed-by-seed self in float64, where the written-out one lies
    ~5e-15 from it. Should a torch release mend it, this fails and that sentence must go."""
    _, grad = _terms_and_image_gradient(attack64, "pytorch", batched=False)
    _, vmapped = _terms_and_image_gradient(attack64, "pytorch", batched=True)
    assert (vmapped - grad).norm() >= 1e-5 * grad.norm()


class _Residual(torch.nn.Module):
    """BatchNorm's output added to in place, as torchvision's residual blocks do (`out += identity`)."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place
        self.conv, self.bn = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.bn(self.conv(x))
        if self.in_place:
            out += x
            return out
        return out + x


def test_under_vmap_an_in_place_add_to_its_output_copies_nothing_more_than_an_add(attack):
    """The written-out BatchNorm under vmap hands back its own output, no view of it: autograd
    writes into a view in place by copying the whole of what it views, twice, every backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_):
                self.bytes += out.numel() * out.element_size()
            return out

    xs = torch.randn(3, 2, 4, 5, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    results = {}
    for in_place in (False, True):
        torch.manual_seed(0)
        model = with_explicit_double_backward(_Residual(in_place))
        params = {n: p.detach() for n, p in model.named_parameters()}

        def one_seed(x):
            grads = torch.func.grad(lambda w: torch.func.functional_call(model, w, (x,)).square().sum())(params)
            return sum(g.square().sum() for g in grads.values())

        with Copies() as copies:
            grad = torch.autograd.grad(torch.func.vmap(one_seed)(xs).sum(), xs)[0]
        results[in_place] = copies.bytes, grad
    assert results[True][0] == results[False][0]
    assert torch.allclose(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)
