"""DP-SGD through Opacus: per-sample gradients as torch.func computes them, every sample clipped
to C, noise of std σC over the batch, ε from Opacus's accountant, and a BatchNorm model refused."""

import math

import pytest
import torch
from torch import nn

from gradinv.client.capture import client_update
from gradinv.client.defenses import validate
from gradinv.client.dp import dp_sgd_gradient, epsilon, noise_for
from gradinv.client.models import build_model
from gradinv.client.step import per_example_gradients
from gradinv.errors import UserError

pytest.importorskip("opacus", reason="the privacy extra (Opacus) is not installed")
FIELDS = {"arch": "tiny", "num_classes": 3, "input_shape": [3, 8, 8], "mean": [0.5] * 3, "std": [0.25] * 3}


def tiny_model(norm: str = "group") -> nn.Module:
    torch.manual_seed(0)
    layer = nn.GroupNorm(2, 4) if norm == "group" else nn.BatchNorm2d(4)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layer, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).train()


def batch(size: int = 4):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 3, 8, 8, generator=generator), torch.arange(size) % 3


def test_opacus_per_sample_gradients_equal_torch_funcs_on_a_groupnorm_model():
    from opacus import GradSampleModule

    model, (images, labels) = tiny_model(), batch()
    reference = per_example_gradients(model, images, labels)
    wrapped = GradSampleModule(model, loss_reduction="mean")
    nn.functional.cross_entropy(wrapped(images), labels).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad_sample, reference[name], atol=1e-6), name
    wrapped._close()


def test_every_sample_is_clipped_to_c_and_the_batch_is_their_mean():
    model, (images, labels) = tiny_model(), batch()
    bound = 0.05
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    alone = [dp_sgd_gradient(model, images[i:i + 1], labels[i:i + 1], 0.0, bound) for i in range(len(labels))]
    unclipped = [flat(per_example_gradients(model, images[i:i + 1], labels[i:i + 1])) for i in range(len(labels))]
    for clipped, raw in zip(alone, unclipped):
        assert raw.norm() > bound  # the bound binds
        assert flat(clipped).norm() <= bound * (1 + 1e-5)
        assert torch.allclose(flat(clipped), raw * bound / raw.norm(), atol=1e-6)
    together = flat(dp_sgd_gradient(model, images, labels, 0.0, bound))
    assert torch.allclose(together, torch.stack([flat(c) for c in alone]).mean(0), atol=1e-7)


def test_the_noise_has_std_sigma_c_over_the_batch_size():
    model, (images, labels) = tiny_model(), batch()
    clean = dp_sgd_gradient(model, images, labels, 0.0, 1.0)
    noisy = dp_sgd_gradient(model, images, labels, 2.0, 1.0, torch.Generator().manual_seed(3))
    noise = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    assert noise.std().item() == pytest.approx(2.0 * 1.0 / len(labels), rel=0.1)
    assert abs(noise.mean().item()) < 0.1


def test_the_recorded_epsilon_is_opacuss_accountant_for_the_same_budget():
    from opacus.accountants import PRVAccountant, RDPAccountant

    [entry] = validate([{"kind": "dp_sgd", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "sample_rate": 0.01,
                         "steps": 500, "accountant": "rdp"}])
    accountant = RDPAccountant()
    for _ in range(500):
        accountant.step(noise_multiplier=1.1, sample_rate=0.01)
    assert entry["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    [prv] = validate([{"kind": "dp_sgd", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "sample_rate": 0.01,
                       "steps": 500}])
    reference = PRVAccountant()
    reference.history = [(1.1, 0.01, 500)]
    assert prv["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6) and prv["accountant"] == "prv"


@pytest.mark.parametrize("target", [50.0, 8.0, 3.0, 1.0])
def test_the_noise_for_an_epsilon_target_reaches_it_within_the_accountants_tolerance(target):
    sigma = noise_for(target, 0.01, 1000, 1e-5, "prv")
    spent = epsilon(sigma, 0.01, 1000, 1e-5, "prv")
    assert target - 0.05 <= spent <= target * (1 + 1e-3)
    assert noise_for(math.inf, 0.01, 1000, 1e-5, "prv") == 0 and epsilon(0.0, 0.01, 1000, 1e-5, "prv") == math.inf


def test_a_batchnorm_model_is_refused_per_sample_clipping_unless_the_user_opts_in():
    images, labels = batch()
    for defense in ({"kind": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.01},
                    {"kind": "per_example_clip", "norm": 1.0}):
        with pytest.raises(UserError, match="BatchNorm layers .* couple the samples .* 'victim.norm: group'"):
            client_update(tiny_model("batch"), images, labels, "none", FIELDS, validate([defense]))
    coupled = client_update(tiny_model("batch"), images, labels, "none", FIELDS,
                            validate([{"kind": "per_example_clip", "norm": 1.0, "batch_coupled": True}]))
    assert torch.cat([g.flatten() for g in coupled.grads.values()]).norm() <= 1.0 + 1e-5


def test_a_dp_sgd_capture_records_sigma_c_q_steps_delta_and_epsilon():
    images, labels = batch()
    defenses = validate([{"kind": "dp_sgd", "epsilon": 8.0, "max_grad_norm": 1.0, "sample_rate": 0.05, "steps": 20}])
    artifact = client_update(tiny_model(), images, labels, "none", FIELDS, defenses, torch.Generator().manual_seed(0))
    [recorded] = artifact.meta["defenses"]
    assert {"noise_multiplier", "max_grad_norm", "sample_rate", "steps", "delta", "epsilon"} <= set(recorded)
    assert recorded["epsilon"] <= 8.0 and recorded["epsilon_target"] == 8.0 and recorded["noise_multiplier"] > 0
    assert validate(artifact.meta["defenses"]) == defenses  # read back from metadata as written


def test_victim_norm_group_builds_groupnorm_layers_and_refuses_what_it_cannot_build():
    model = build_model("resnet18", 5, norm="group")
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(UserError, match="takes no norm_layer"):
        build_model("vgg11", 5, norm="group")
    with pytest.raises(UserError, match="your own code"):
        build_model("tests.test_dp:tiny_model", 5, norm="group")


def test_the_update_of_several_dp_sgd_steps_is_their_descent_and_reads_back_as_their_mean_gradient():
    from gradinv.client.defenses import as_gradient
    from gradinv.client.dp import dp_sgd_update

    model, (images, labels) = tiny_model(), batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    update = dp_sgd_update(model, images, labels, 0.0, 0.5, 2, 0.1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model is left as it was
    first = dp_sgd_gradient(model, images, labels, 0.0, 0.5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p -= 0.1 * first[n]
    second = dp_sgd_gradient(model, images, labels, 0.0, 0.5)
    for n in update:
        assert torch.allclose(update[n], -0.1 * (first[n] + second[n]), atol=1e-7), n
    [defense] = validate([{"kind": "dp_sgd", "noise_multiplier": 0.0, "max_grad_norm": 0.5, "sample_rate": 0.1,
                           "local_steps": 2, "lr": 0.1}])
    mean = as_gradient(update["5.bias"], [defense], len(labels))
    assert torch.allclose(mean, (first["5.bias"] + second["5.bias"]) / 2, atol=1e-6)
    with pytest.raises(UserError, match="needs a positive learning rate 'lr'"):
        validate([{"kind": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.1, "local_steps": 3}])


def test_the_report_says_not_dp_for_batch_coupled_clipping_and_names_the_epsilon_spent():
    from gradinv.evaluation.context import describe_defenses

    coupled = describe_defenses(validate([{"kind": "per_example_clip", "norm": 1.0, "batch_coupled": True}]), 1)
    assert "not DP" in coupled
    assert "not DP" not in describe_defenses(validate([{"kind": "per_example_clip", "norm": 1.0}]), 1)
    private = describe_defenses(validate([{"kind": "dp_sgd", "noise_multiplier": 1.1, "max_grad_norm": 1.0,
                                           "sample_rate": 0.01, "steps": 500, "accountant": "rdp"}]), 1)
    assert "dp_sgd" in private and "epsilon " in private and "noise_multiplier 1.1" in private
