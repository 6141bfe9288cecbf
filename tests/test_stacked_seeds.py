"""gradinv.stacked_seeds (`inversion.batched_seeds: stacked`): seeds stacked into the channels
compute every seed's gradients, and the objective and inversion they give are vmap's."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradinv.client import parameter_gradients, train_mode_copy
from gradinv.config import build_section
from gradinv.errors import UserError
from gradinv.inversion import invert
from gradinv.models import build_model
from gradinv.objective import LOSS_TERMS, Objective
from gradinv.stacked_seeds import fold_images, per_seed, stack_seeds


def test_one_backward_of_the_stacked_model_gives_each_seeds_parameter_gradients():
    """In float64: a ResNet's train-mode gradients at bs 4 amplify float32 rounding to ~1e-4."""
    torch.manual_seed(0)
    model = train_mode_copy(build_model("resnet18", 10)).double()
    seeds, batch = 3, 4
    xs = torch.randn(seeds, batch, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([1, 7, 3, 3])
    stacked = stack_seeds(model, seeds)
    logits = stacked(fold_images(xs))
    assert logits.shape == (batch, seeds, 10)
    loss = sum(F.cross_entropy(logits[:, g], labels) for g in range(seeds))
    names, params = zip(*stacked.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, params)))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert set(grads) == set(shapes)
    for g in range(seeds):
        expected = parameter_gradients(model, xs[g], labels)
        for name, grad in grads.items():
            ours = per_seed(grad, seeds, shapes[name])[g]
            assert torch.allclose(ours, expected[name], rtol=1e-9, atol=1e-12), (name, g)


def test_a_layer_without_a_stacked_form_is_refused():
    with pytest.raises(ValueError, match="LayerNorm"):
        stack_seeds(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4)), 2)


@pytest.mark.parametrize("bn_double_backward", ["pytorch", "explicit"])
def test_the_batched_objective_and_its_image_gradient_are_vmaps(attack, bn_double_backward):
    model, _, artifact, images, labels = attack
    generator = torch.Generator().manual_seed(1)
    xs = torch.randn(3, *images.shape, generator=generator).requires_grad_(True)  # away from the distance's kink
    consensus = torch.randn(images.shape, generator=generator)
    results = {}
    for layout in ("vmap", "stacked"):
        config = build_section("inversion", {"bn_double_backward": bn_double_backward, "batched_seeds": layout,
                                             "alpha_group": 0.1})
        terms = Objective(train_mode_copy(model), artifact, labels, config).batched_terms(xs, xs.flip(-1), consensus)
        results[layout] = terms, *torch.autograd.grad(terms["total"].sum(), xs)
    (terms, grad), (ours, our_grad) = results["vmap"], results["stacked"]
    for name in LOSS_TERMS:
        assert torch.allclose(ours[name], terms[name], rtol=1e-4, atol=1e-6), name
    assert (our_grad - grad).norm() <= 1e-3 * grad.norm()  # float32 through a train-mode ResNet at bs 4


def test_an_inversion_follows_the_same_path_stacked_or_vmapped(attack):
    """As close as float noise lets two runs of the same step stay: Adam turns float32
    differences into steps of size lr where a pixel's gradient is ~0, so the seeds run one by
    one against vmapped are the yardstick."""
    model, _, artifact, _, labels = attack
    settings = {"iterations": 6, "seeds": 2, "seed_batch": 2, "warmup": 2, "log_every": 1, "device": "cpu",
                "jitter": 1, "langevin": 0.1}
    labels = sorted(labels.tolist())
    runs = {layout: invert(model, artifact, labels, build_section("inversion", {**settings, "batched_seeds": layout}))
            for layout in ("vmap", "stacked")}
    one_by_one = invert(model, artifact, labels, build_section("inversion", {**settings, "seed_batch": 1, "seed_workers": 1}))
    first = lambda result: [r["total"] for r in result.log if r["iteration"] == 0]  # noqa: E731
    assert first(runs["stacked"]) == pytest.approx(first(runs["vmap"]), rel=1e-5)
    moved = (runs["vmap"].images - runs["vmap"].initial).abs().mean().item()
    drift = lambda result: (result.images - runs["vmap"].images).abs().mean().item() / moved  # noqa: E731
    assert drift(runs["stacked"]) <= max(2 * drift(one_by_one), 0.05)


def test_a_model_without_a_stacked_form_gets_one_sentence(attack):
    model, _, artifact, images, labels = attack
    model = train_mode_copy(model)
    model.fc = nn.Sequential(nn.LayerNorm(model.fc.in_features), model.fc)
    config = build_section("inversion", {"batched_seeds": "stacked", "bn_prior": "none"})
    with pytest.raises(UserError, match="batched_seeds 'stacked' cannot serve this model.*LayerNorm"):
        Objective(model, artifact, labels, config).batched_terms(torch.stack([images, images]))


class ChannelsReversed(nn.Module):
    """`inner`, its output's channels reversed: harmless for one seed, mixes the seeds when they
    are stacked, and made of layers that all have a stacked form."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).flip(1)


def test_a_forward_that_mixes_channels_is_caught_before_it_mixes_seeds(attack):
    model, _, artifact, images, labels = attack
    model = train_mode_copy(model)
    model.layer1 = ChannelsReversed(model.layer1)
    config = build_section("inversion", {"batched_seeds": "stacked", "bn_prior": "none"})
    with pytest.raises(UserError, match="logits differ from its own by .*mixes channels"):
        Objective(model, artifact, labels, config).batched_terms(torch.stack([images, images.flip(-1)]))


def test_linear_layers_without_bias_and_in_a_stack_keep_each_seeds_logits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 5)).double().train()
    xs = torch.randn(3, 4, 3, 9, 9, dtype=torch.float64)
    logits = stack_seeds(model, 3)(fold_images(xs))
    assert torch.allclose(logits, torch.stack([model(x) for x in xs], 1))


def test_stacked_seeds_in_channels_last_compute_the_contiguous_objective(attack):
    model, _, artifact, images, labels = attack
    # not the batch itself: there the (unsquared) gradient distance is at its kink, and float
    # rounding alone picks the direction of its gradient
    xs = torch.randn(2, *images.shape, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    results = []
    for layout, nhwc in (("vmap", False), ("stacked", True)):
        config = build_section("inversion", {"batched_seeds": layout, "channels_last": nhwc, "seed_batch": 2})
        attacker = train_mode_copy(model).to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        terms = Objective(attacker, artifact, labels, config).batched_terms(xs)
        results.append((terms["total"], *torch.autograd.grad(terms["total"].sum(), xs)))
    (total, grad), (ours, our_grad) = results
    assert torch.allclose(ours, total, rtol=1e-4)
    assert (our_grad - grad).norm() <= 1e-3 * grad.norm()
