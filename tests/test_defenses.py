"""Client-side defenses at capture, their declaration in the artifact, and the attacks that know them."""

from __future__ import annotations

import math

import pytest
import torch

from gradinv.attack.labels import defense_warnings
from gradinv.attack.objective import Objective
from gradinv.client import defenses
from gradinv.client.artifacts import load_gradient, save_gradient
from gradinv.client.capture import TRUTH_FILE, capture, client_update, draw_batch
from gradinv.client.data import load_set, normalize
from gradinv.client.step import train_mode_copy
from gradinv.client.victim import load_victim
from gradinv.errors import UserError
from gradinv.io import read_tensors
from gradinv.pipeline.config import build_section
from gradinv.pipeline.stages import GRADIENT, SETS, TRUTH, VICTIM


def _grads(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return {"a": scale * torch.randn(1000, generator=g), "b": scale * torch.randn(37, 11, generator=g),
            "c": scale * torch.randn(3, generator=g)}


def test_clipping_bounds_the_global_norm_and_leaves_small_gradients_alone():
    grads = _grads()
    assert defenses.global_norm(grads) > 10
    clipped = defenses.clip(grads, 0.5)
    assert defenses.global_norm(clipped).item() <= 0.5 * (1 + 1e-6)
    assert defenses.global_norm(clipped).item() == pytest.approx(0.5, rel=1e-5)
    small = defenses.clip(_grads(scale=1e-3), 0.5)
    assert all(torch.equal(small[n], v) for n, v in _grads(scale=1e-3).items())


def test_top_k_keeps_exactly_the_requested_fraction_of_the_largest_entries():
    grads = _grads()
    for keep in (0.5, 0.1, 0.01):
        pruned = defenses.top_k(grads, keep)
        for name, g in grads.items():
            kept = pruned[name] != 0
            assert int(kept.sum()) == max(1, math.ceil(keep * g.numel()))
            assert torch.equal(pruned[name][kept], g[kept])
            if (~kept).any():
                assert g[kept].abs().min() >= g[~kept].abs().max()


def test_noise_std_is_sigma_times_the_clip_norm():
    zeros = {"w": torch.zeros(1_000_000)}
    generator = torch.Generator().manual_seed(0)
    gaussian = defenses.apply(zeros, [{"kind": "clip", "norm": 2.0}, {"kind": "gaussian", "sigma": 0.05}], generator)
    # The std of a million draws is within 0.3 % of the truth (its standard error is 0.07 %).
    assert gaussian["w"].std().item() == pytest.approx(0.1, rel=3e-3)
    assert gaussian["w"].mean().abs().item() < 1e-3
    laplace = defenses.apply(zeros, [{"kind": "laplace", "sigma": 0.05}], generator)  # no clip: C = 1
    assert laplace["w"].std().item() == pytest.approx(math.sqrt(2) * 0.05, rel=5e-3)
    assert laplace["w"].abs().mean().item() == pytest.approx(0.05, rel=5e-3)  # E|Laplace(0, b)| = b


def test_quantization_is_representable_and_close():
    grads = _grads()
    half = defenses.quantize(grads, "float16")
    assert all(torch.equal(v.half().float(), v) for v in half.values())
    int8 = defenses.quantize(grads, "int8")
    for name, g in grads.items():
        scale = g.abs().max() / 127
        assert int8[name].unique().numel() <= 255
        assert (int8[name] - g).abs().max() <= scale / 2 + 1e-6
    sign = defenses.quantize(grads, "sign")
    assert all(v.abs().unique().numel() == 1 for v in sign.values())


@pytest.mark.parametrize("bad, message", [
    ([{"kind": "blur"}], "kind is one of"),
    ([{"kind": "topk", "keep": 0}], "fraction in"),
    ([{"kind": "clip"}], "lacks 'norm'"),
    ([{"kind": "gaussian", "sigma": 0.1, "std": 1}], "unknown key 'std'"),
    ([{"kind": "quantize", "to": "int4"}], "one of float16"),
])
def test_bad_defense_params_name_the_entry(bad, message):
    with pytest.raises(UserError, match=message) as caught:
        build_section("capture", {"defenses": bad})
    assert "capture.defenses[0]" in str(caught.value)


@pytest.mark.slow
def test_secure_aggregation_is_the_mean_of_the_clients_gradients(project_copy):
    config = build_section("capture", {"batch_size": 4, "seed": 1, "aggregation_clients": 3, "bn_leak": "none"})
    capture(config, project_copy / SETS, project_copy / VICTIM, project_copy / "agg/gradient", project_copy / "agg/truth")
    model, meta = load_victim(project_copy / VICTIM)
    shared = load_gradient(project_copy / "agg/gradient", model)
    assert shared.meta["aggregation_clients"] == 3

    pool = load_set(project_copy / SETS, "pool")
    generator = torch.Generator().manual_seed(1)
    fields = {"arch": meta.arch, "num_classes": meta.num_classes, "input_shape": meta.input_shape,
              "mean": meta.mean, "std": meta.std}
    clients = []
    for _ in range(3):
        batch = draw_batch(pool, 4, True, generator)
        clients.append(client_update(model, normalize(pool.images[batch], meta.mean, meta.std), pool.labels[batch], "none", fields))
    truth = read_tensors(project_copy / "agg/truth" / TRUTH_FILE, "truth")
    assert torch.equal(truth["pool_index"], draw_batch(pool, 4, True, torch.Generator().manual_seed(1)))
    for name, g in shared.grads.items():
        expected = torch.stack([c.grads[name] for c in clients]).mean(0)
        assert torch.allclose(g, expected, atol=1e-7), name
    victim_alone = clients[0].grads["fc.weight"]
    assert not torch.allclose(shared.grads["fc.weight"], victim_alone, atol=1e-4)


def test_a_defended_artifact_round_trips_and_a_false_declaration_is_rejected(project_copy):
    model, _ = load_victim(project_copy / VICTIM)
    artifact = load_gradient(project_copy / GRADIENT, model)
    declared = [{"kind": "topk", "keep": 0.01, "known_to_attacker": True}]
    artifact.meta = {**artifact.meta, "defenses": declared, "aggregation_clients": 1}
    save_gradient(artifact, project_copy / "dense")  # dense tensors, declared pruned to 1 %
    with pytest.raises(UserError, match=r"declares top-k pruning to 0.01, but its entry '.*' has \d+ non-zero values"):
        load_gradient(project_copy / "dense", model)

    artifact.grads = defenses.top_k(artifact.grads, 0.01)
    save_gradient(artifact, project_copy / "pruned")
    back = load_gradient(project_copy / "pruned", model)
    assert back.meta["defenses"] == declared
    assert all(torch.equal(back.grads[n], g) for n, g in artifact.grads.items())


@pytest.mark.slow
def test_the_pruning_aware_attack_matches_only_the_transmitted_entries(project_copy):
    model, meta = load_victim(project_copy / VICTIM)
    truth = read_tensors(project_copy / TRUTH / TRUTH_FILE, "truth")
    images, labels = normalize(truth["images"], meta.mean, meta.std), truth["labels"]
    fields = {"arch": meta.arch, "num_classes": meta.num_classes, "input_shape": meta.input_shape,
              "mean": meta.mean, "std": meta.std}
    config = build_section("inversion", {})
    distances = {}
    for known in (True, False):
        pruned = client_update(model, images, labels, "exact", fields,
                               [{"kind": "topk", "keep": 0.1, "known_to_attacker": known}])
        objective = Objective(train_mode_copy(model), pruned, labels, config)
        distances[known] = objective.terms(images)["grad"].item()
    # At the true batch the aware attack's distance vanishes; the plain one compares the full
    # gradient with the pruned one and is far from zero.
    assert distances[True] < 1e-3 * distances[False]
    assert distances[False] > 0.1


def test_label_recovery_says_when_a_defense_breaks_its_assumptions():
    assert defense_warnings("yin", [], 1) == []
    assert defense_warnings("yin", [{"kind": "clip", "norm": 1.0, "known_to_attacker": True}], 1) == []
    noisy = defense_warnings("yin", [{"kind": "gaussian", "sigma": 0.01, "known_to_attacker": True}], 1)
    assert len(noisy) == 1 and "gaussian noise" in noisy[0]
    assert any("3 clients" in w for w in defense_warnings("counts", [], 3))
    assert any("strategy 'counts'" in w for w in defense_warnings("counts", [{"kind": "clip", "norm": 1.0, "known_to_attacker": True}], 1))


@pytest.mark.slow
def test_capture_stage_with_defenses_feeds_labels_and_inversion(project_copy):
    from gradinv.pipeline.config import load_params
    from gradinv.pipeline.stages import STAGES
    from tests.conftest import write_params

    params = load_params(write_params(project_copy / "params.yaml", {"capture": {
        "defenses": [{"kind": "clip", "norm": 1.0}, {"kind": "gaussian", "sigma": 1e-4}, {"kind": "topk", "keep": 0.5}]}}))
    for name in ("capture", "labels", "invert"):
        STAGES[name].run(params[STAGES[name].section], project_copy, None, params["engine"])
    import json

    declared = json.loads((project_copy / GRADIENT / "gradient.json").read_text())["defenses"]
    assert [d["kind"] for d in declared] == ["clip", "gaussian", "topk"]
    labels = json.loads((project_copy / "data/labels/labels.json").read_text())
    assert any("gaussian noise" in w for w in labels["assumption_warnings"])
    assert (project_copy / "data/invert/reconstruction.safetensors").is_file()


def _victim_batch(project):
    model, meta = load_victim(project / VICTIM)
    truth = read_tensors(project / TRUTH / TRUTH_FILE, "truth")
    fields = {"arch": meta.arch, "num_classes": meta.num_classes, "input_shape": meta.input_shape,
              "mean": meta.mean, "std": meta.std}
    return model, normalize(truth["images"], meta.mean, meta.std), truth["labels"], fields


def test_per_example_clipping_bounds_every_samples_gradient(tiny_project):
    from gradinv.client.capture import clip_per_example
    from gradinv.client.step import parameter_gradients, per_example_gradients

    model, images, labels, fields = _victim_batch(tiny_project)
    client = train_mode_copy(model)
    per = per_example_gradients(client, images, labels)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per.values()]).sum(0).sqrt()
    batch = parameter_gradients(client, images, labels)
    for name, g in batch.items():  # the samples' gradients average to the batch gradient (BN coupling included)
        assert torch.allclose(per[name].mean(0), g, rtol=1e-3, atol=1e-5), name
    bound = 0.5 * norms.min().item()  # every sample is clipped
    clipped = clip_per_example(per, bound)
    clipped_norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in clipped.values()]).sum(0).sqrt()
    assert (clipped_norms <= bound * (1 + 1e-5)).all() and clipped_norms.min() >= bound * (1 - 1e-5)
    coupled = {"kind": "per_example_clip", "batch_coupled": True, "known_to_attacker": True}  # BN: not DP
    shared = client_update(model, images, labels, "none", fields, [{**coupled, "norm": bound}])
    assert defenses.global_norm(shared.grads).item() <= bound * (1 + 1e-5)
    loose = client_update(model, images, labels, "none", fields, [{**coupled, "norm": 1e9}])
    assert all(torch.allclose(loose.grads[n], g, rtol=1e-3, atol=1e-5) for n, g in batch.items())


@pytest.mark.slow
def test_the_attackers_fedavg_replay_reproduces_the_clients_update(tiny_project):
    from gradinv.client.step import local_update

    model, images, labels, fields = _victim_batch(tiny_project)
    fedavg = {"kind": "fedavg", "steps": 2, "lr": 0.01, "batch_size": 2}
    shared = client_update(model, images, labels, "none", fields, [{**fedavg, "known_to_attacker": True}])
    replay = local_update(train_mode_copy(model), images.clone().requires_grad_(True), labels, 2, 0.01, 2, create_graph=True)
    for name, update in shared.grads.items():
        assert torch.allclose(replay[name].detach(), update, rtol=1e-5, atol=1e-7), name
    config = build_section("inversion", {"bn_prior": "none"})
    aware = Objective(train_mode_copy(model), shared, labels, config).terms(images)["grad"].item()
    plain_artifact = client_update(model, images, labels, "none", fields, [{**fedavg, "known_to_attacker": False}])
    plain = Objective(train_mode_copy(model), plain_artifact, labels, config).terms(images)["grad"].item()
    assert aware < 1e-4 * plain  # the aware attack's objective vanishes at the true batch; the plain one does not
    with pytest.raises(UserError, match="FedAvg"):  # the replay cannot run under vmap: one clear sentence
        Objective(train_mode_copy(model), shared, labels, config).batched_terms(images.unsqueeze(0).repeat(2, 1, 1, 1, 1))
    from gradinv.attack.inversion import invert

    config = build_section("inversion", {"bn_prior": "none", "iterations": 2, "seeds": 2})
    eager = invert(model, shared, labels.tolist(), config, engine=build_section("engine", {"device": "cpu"}))
    graphed = invert(model, shared, labels.tolist(), config, engine=build_section("engine", {"device": "cpu", "cuda_graph": True}))
    assert torch.equal(graphed.images, eager.images)  # a speed setting: the replay runs eagerly, as seed_batch's auto does


def test_labels_are_read_from_a_fedavg_update(tiny_project):
    from gradinv.attack.labels import yin_labels

    model, images, labels, fields = _victim_batch(tiny_project)
    update = client_update(model, images, labels, "none", fields,
                           [{"kind": "fedavg", "steps": 1, "lr": 0.05, "batch_size": len(labels), "known_to_attacker": True}])
    assert yin_labels(model, update)[0] == sorted(labels.tolist())


@pytest.mark.parametrize("capture_params, message", [
    ({"defenses": [{"kind": "clip", "norm": 1.0}, {"kind": "fedavg", "steps": 1, "lr": 0.1, "batch_size": 4}]},
     "must come first"),
    ({"defenses": [{"kind": "fedavg", "steps": 1, "lr": 0.1, "batch_size": 4}], "bn_leak": "exact"},
     "not defined under fedavg"),
    ({"defenses": [{"kind": "fedavg", "steps": 0, "lr": 0.1, "batch_size": 4}]}, "'steps' must be a positive"),
])
def test_fedavg_declarations_are_checked(capture_params, message):
    with pytest.raises(UserError, match=message):
        build_section("capture", capture_params)
