"""gradinv.engine.relu: the attacker's ReLU, its mask a constant to the second derivative."""

import pytest
import torch
from torch import nn

from gradinv.attack.objective import LOSS_TERMS, Objective
from gradinv.client.step import train_mode_copy
from gradinv.engine.policy import attacker_model
from gradinv.engine.relu import DetachedMaskReLU, _ReLU
from gradinv.pipeline.config import build_section


def test_first_and_second_derivatives_match_finite_differences():
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    assert torch.equal(_ReLU.apply(x), torch.relu(x))
    assert torch.autograd.gradcheck(_ReLU.apply, (x,))
    assert torch.autograd.gradgradcheck(_ReLU.apply, (x,))


@pytest.mark.parametrize("batched", [False, True], ids=["seed by seed", "seeds batched"])
def test_the_objective_and_its_image_gradient_are_those_of_torchs_relu(attack, batched):
    model, _, artifact, images, labels = attack
    xs = torch.stack([images, torch.randn(images.shape, generator=torch.Generator().manual_seed(1))]).requires_grad_(True)
    config = build_section("inversion", {})
    attacker = attacker_model(train_mode_copy(model), build_section("engine", {}), torch.device("cpu"), len(xs))
    ours = Objective(attacker, artifact, labels, config)
    reference = Objective(train_mode_copy(model), artifact, labels, config)  # as it is: torch's ReLU
    assert any(type(m) is DetachedMaskReLU for m in ours.model.modules())  # the attacker's model uses ours
    assert not any(type(m) is DetachedMaskReLU for m in reference.model.modules())
    assert any(type(m) is nn.ReLU for m in reference.model.modules())
    results = []
    for objective in (ours, reference):
        if batched:
            terms = objective.batched_terms(xs)
        else:
            per_seed = [objective.terms(x) for x in xs]
            terms = {k: torch.stack([t[k] for t in per_seed]) for k in LOSS_TERMS}
        results.append((terms, *torch.autograd.grad(terms["total"].sum(), xs)))
    (terms, grad), (expected, expected_grad) = results
    for name in LOSS_TERMS:
        assert torch.allclose(terms[name], expected[name], rtol=1e-6, atol=1e-7), name
    assert (grad - expected_grad).norm() <= 1e-5 * expected_grad.norm()
