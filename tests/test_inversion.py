import dataclasses

import pytest
import torch

from gradinv.artifacts import load_gradient
from gradinv.capture import TRUTH_FILE
from gradinv.client import train_mode_copy
from gradinv.config import build_section
from gradinv.data import normalize
from gradinv.errors import UserError
from gradinv.inversion import Objective, invert, learning_rate, pixel_box
from gradinv.io import read_tensors
from gradinv.stages import GRADIENT, TRUTH, VICTIM
from gradinv.victim import load_victim


@pytest.fixture
def attack(tiny_project):
    model, meta = load_victim(tiny_project / VICTIM)
    artifact = load_gradient(tiny_project / GRADIENT, model)
    truth = read_tensors(tiny_project / TRUTH / TRUTH_FILE, "truth")
    return model, meta, artifact, normalize(truth["images"], meta.mean, meta.std), truth["labels"]


def test_attackers_gradient_of_the_true_batch_reproduces_the_capture(attack):
    model, _, artifact, images, labels = attack
    objective = Objective(train_mode_copy(model), artifact, labels, build_section("inversion", {}))
    terms = objective.terms(images)
    target_norm = sum(torch.linalg.vector_norm(g) for g in artifact.grads.values())
    assert terms["grad"].item() < 1e-5 * target_norm.item()
    assert terms["bn"].item() < 1e-4  # BN_exact: the true batch has exactly the leaked statistics
    noise = objective.terms(torch.randn_like(images))
    assert noise["grad"].item() > 1e-2 * target_norm.item()


def test_learning_rate_warms_up_then_decays_to_zero():
    config = build_section("inversion", {"iterations": 100, "warmup": 10, "lr": 0.1})
    rates = [learning_rate(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(0.01) and rates[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] < 1e-3


def test_inversion_is_deterministic_lowers_the_loss_and_stays_in_the_pixel_box(attack):
    model, meta, artifact, _, labels = attack
    config = build_section("inversion", {"iterations": 12, "seeds": 2, "warmup": 2, "log_every": 1, "device": "cpu"})
    first = invert(model, artifact, sorted(labels.tolist()), config)
    second = invert(model, artifact, sorted(labels.tolist()), config)
    assert torch.equal(first.images, second.images)
    assert first.images.shape == (2, 4, 3, 16, 16)
    assert not torch.equal(first.images[0], first.images[1])  # seeds start from different noise
    for seed in range(2):
        totals = [row["total"] for row in first.log if row["seed"] == seed]
        assert totals[-1] < totals[0]
    low, high = pixel_box(meta.mean, meta.std, "cpu")
    assert (first.images >= low - 1e-6).all() and (first.images <= high + 1e-6).all()
    assert first.chosen_seed == min(range(2), key=lambda g: first.final_grad_loss[g])


def test_exact_bn_prior_needs_leaked_statistics(attack):
    model, _, artifact, _, labels = attack
    artifact = dataclasses.replace(artifact, meta={**artifact.meta, "bn_leak": "none"}, bn_mean={}, bn_var={})
    with pytest.raises(UserError, match="bn_prior 'exact' needs the batch's BN statistics"):
        invert(model, artifact, sorted(labels.tolist()), build_section("inversion", {"iterations": 1}))


def test_wrong_number_of_labels_is_refused(attack):
    model, _, artifact, _, _ = attack
    with pytest.raises(UserError, match="3 labels were given for a gradient of batch size 4"):
        invert(model, artifact, [0, 1, 2], build_section("inversion", {"iterations": 1}))
