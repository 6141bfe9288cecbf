"""benchmarks/stacked_seeds.py: seeds stacked into the channels compute every seed's gradients."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from stacked_seeds import fold_images, per_seed, stack_seeds  # noqa: E402

from gradinv.client import parameter_gradients, train_mode_copy  # noqa: E402
from gradinv.models import build_model  # noqa: E402


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
