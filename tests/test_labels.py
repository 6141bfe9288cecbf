import pytest
import torch
import torchvision
from torch import nn

from gradinv.attack.labels import count_labels, idlg_label, recover, round_to_total, yin_labels
from gradinv.client.artifacts import GradientArtifact, gradient_meta, load_gradient
from gradinv.client.capture import client_update
from gradinv.client.victim import load_victim
from gradinv.errors import UserError
from gradinv.evaluation.metrics import label_accuracy
from gradinv.io import read_json
from gradinv.pipeline.config import build_section
from gradinv.pipeline.stages import GRADIENT, LABELS, TRUTH, VICTIM

META = dict(arch="resnet18", input_shape=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3)


def _untrained(classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=classes).eval()


def _capture(model, labels: torch.Tensor, seed: int = 0, size: int = 32) -> GradientArtifact:
    images = torch.rand(len(labels), 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    classes = model.fc.out_features
    return client_update(model, images, labels, "none", {**META, "num_classes": classes, "input_shape": [3, size, size]})


def test_pipeline_labels_match_the_truth(tiny_project):
    recovered = read_json(tiny_project / LABELS / "labels.json", "labels")["labels"]
    truth = read_json(tiny_project / TRUTH / "truth.json", "truth")["labels"]
    assert sorted(recovered) == sorted(truth)


@pytest.mark.parametrize("seed", range(4))
def test_yin_rule_recovers_distinct_labels_on_an_untrained_resnet(seed):
    model = _untrained(20, seed)
    labels = torch.randperm(20, generator=torch.Generator().manual_seed(seed))[:8]
    recovered, scores = yin_labels(model, _capture(model, labels, seed))
    assert recovered == sorted(labels.tolist()) and scores.shape == (20,)


def test_idlg_recovers_the_label_of_a_batch_of_one():
    model = _untrained(30)  # 64 px: a batch of one passes train-mode BN (last feature map 2×2)
    for label in (0, 7, 29):
        assert idlg_label(model, _capture(model, torch.tensor([label]), label, size=64))[0] == [label]


def test_idlg_refuses_a_batch_of_several():
    model = _untrained(10)
    with pytest.raises(UserError, match="'idlg' needs a batch of one"):
        idlg_label(model, _capture(model, torch.tensor([1, 2])))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_counts_recover_repeated_labels_where_yin_cannot(seed):
    model = _untrained(12, seed)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (16,), generator=generator)  # heavy repeats over 4 of 12 classes
    artifact = _capture(model, labels, seed)
    recovered, estimate = count_labels(model, artifact)
    assert len(recovered) == 16
    assert label_accuracy(recovered, labels.tolist()) >= 0.9
    assert torch.allclose(estimate[:4].sum(), torch.tensor(16.0, dtype=torch.float64), atol=1.0)
    yin_cut = yin_labels(model, GradientArtifact(artifact.grads, {**artifact.meta, "batch_size": 4}))[0]
    assert label_accuracy(yin_cut, labels.tolist()) <= 0.25  # yin can name each class only once


def test_counts_use_the_exact_identity_when_the_posterior_is_known():
    model = _untrained(12)
    labels = torch.tensor([3, 3, 3, 5, 5, 9, 9, 9, 9, 11])
    artifact = _capture(model, labels)
    from gradinv.client.step import train_mode_copy

    images = torch.rand(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        true_posterior = torch.softmax(train_mode_copy(model)(images), 1).mean(0)
    recovered, estimate = count_labels(model, artifact, posterior=true_posterior)
    assert recovered == sorted(labels.tolist())
    assert torch.allclose(estimate, torch.bincount(labels, minlength=12).double(), atol=1e-4)


@pytest.mark.slow
def test_a_bn_matched_batch_estimates_the_batch_posterior_better_than_noise(tiny_project):
    """With the batch's BN statistics leaked, a surrogate batch matched to them stands in for the
    real one: its mean softmax is far closer to the real batch's than the softmax on noise
    (measured on these 4 batches, L1 error on average: 0.50 on noise; matched 0.043 at 50 steps,
    0.017 at 100, 0.0023 at 300)."""
    from gradinv.attack.labels import batch_posterior
    from gradinv.client.data import load_set, normalize
    from gradinv.client.step import train_mode_copy
    from gradinv.pipeline.stages import SETS

    model, meta = load_victim(tiny_project / VICTIM)
    pool = load_set(tiny_project / SETS, "pool")
    images_all = normalize(pool.images, meta.mean, meta.std)
    fields = {"arch": meta.arch, "num_classes": meta.num_classes, "input_shape": meta.input_shape,
              "mean": meta.mean, "std": meta.std}
    generator = torch.Generator().manual_seed(0)
    errors = {"bn_matched": [], "noise": []}
    for _ in range(4):
        index = torch.randint(len(pool.labels), (8,), generator=generator)  # labels drawn with replacement
        artifact = client_update(model, images_all[index], pool.labels[index], "exact", fields)
        with torch.no_grad():
            truth = torch.softmax(train_mode_copy(model)(images_all[index]), 1).mean(0).double()
        for steps in (50, 0):
            estimate, how = batch_posterior(model, artifact, steps)
            errors[how].append((estimate - truth).abs().sum().item())
    # Measured: 0.087 of the noise error on one 2-core CPU, 0.28 on another (the 16 px test victim
    # amplifies the rounding differences between instruction sets); every batch is better on its own.
    assert sum(errors["bn_matched"]) < 0.4 * sum(errors["noise"])
    assert all(matched < noise for matched, noise in zip(errors["bn_matched"], errors["noise"]))
    without_leak = client_update(model, images_all[index], pool.labels[index], "none", fields)
    assert batch_posterior(model, without_leak, 50)[1] == "noise"  # nothing to match: falls back


def _bn_targets(model: nn.Module, seeds: list[int]) -> tuple[dict, dict]:
    """BN statistics of random batches of 4 (one per seed), stacked per layer as (K, C)."""
    artifacts = [client_update(model, torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1,
                               torch.tensor([0, 1, 2, 3]), "exact", {**META, "num_classes": 5}) for seed in seeds]
    return ({n: torch.stack([a.bn_mean[n] for a in artifacts]) for n in artifacts[0].bn_mean},
            {n: torch.stack([a.bn_var[n] for a in artifacts]) for n in artifacts[0].bn_var})


def test_surrogate_batches_matched_together_do_not_see_each_other():
    """Each surrogate batch is normalised by its own BN statistics and moved by its own distance:
    batch 0 comes out the same whatever statistics batch 1 chases beside it."""
    from gradinv.attack.labels import match_bn_statistics

    model = _untrained(5)
    shape = [3, 32, 32]
    _, first = match_bn_statistics(model, *_bn_targets(model, [1, 2]), 4, shape, steps=8, show_progress=False)
    _, second = match_bn_statistics(model, *_bn_targets(model, [1, 3]), 4, shape, steps=8, show_progress=False)
    assert first.shape == (2, 4, 5)
    assert torch.allclose(first[0], second[0], atol=1e-6)
    assert not torch.allclose(first[1], second[1], atol=1e-2)


def test_matching_brings_the_surrogate_statistics_to_the_targets(tiny_project):
    from gradinv.attack.labels import match_bn_statistics, standardized_bn_distance
    from gradinv.client.data import load_set, normalize
    from gradinv.client.step import recorded_bn_statistics, train_mode_copy
    from gradinv.pipeline.stages import SETS

    model, meta = load_victim(tiny_project / VICTIM)
    pool = load_set(tiny_project / SETS, "pool")
    client = train_mode_copy(model)
    with torch.no_grad(), recorded_bn_statistics(client) as stats:
        client(normalize(pool.images[:8], meta.mean, meta.std))
        targets = {n: (m.clone(), v.clone()) for n, (m, v) in stats.items()}

    def distance(images):
        with torch.no_grad(), recorded_bn_statistics(client) as stats:
            client(images)
        return standardized_bn_distance(stats, targets).item()

    means, variances = ({n: t[i][None] for n, t in targets.items()} for i in (0, 1))
    noise, _ = match_bn_statistics(model, means, variances, 8, meta.input_shape, steps=0, show_progress=False)
    matched, logits = match_bn_statistics(model, means, variances, 8, meta.input_shape, steps=150, show_progress=False)
    assert logits.shape == (1, 8, meta.num_classes) and torch.isfinite(logits).all()
    assert distance(matched[0]) < 0.5 * distance(noise[0])


def test_standardized_bn_distance_weighs_every_layer_alike_whatever_its_scale():
    from gradinv.attack.labels import standardized_bn_distance

    mean, var = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 1.0])
    base = standardized_bn_distance({"a": (mean * 1.1, var * 0.9)}, {"a": (mean, var)})
    scaled = standardized_bn_distance({"a": (mean * 10 * 1.1, var * 100 * 0.9)}, {"a": (mean * 10, var * 100)})
    assert torch.isclose(base, scaled, rtol=1e-4) and base > 0.15
    assert standardized_bn_distance({"a": (mean, var)}, {"a": (mean, var)}) == 0


def test_counts_say_how_the_posterior_was_estimated(tiny_project, tmp_path):
    from gradinv.attack.labels import recover_labels

    model, _ = load_victim(tiny_project / VICTIM)
    artifact = load_gradient(tiny_project / GRADIENT, model)  # the tiny project leaks BN statistics
    config = build_section("labels", {"strategy": "counts", "posterior_steps": 20})
    info = read_json(recover_labels(config, model, artifact, tmp_path)[0], "labels")
    assert info["posterior"] == "bn_matched" and len(info["labels"]) == artifact.batch_size
    config = build_section("labels", {"strategy": "counts", "posterior_steps": 0})
    assert read_json(recover_labels(config, model, artifact, tmp_path)[0], "labels")["posterior"] == "noise"
    with pytest.raises(UserError, match="posterior_steps"):
        build_section("labels", {"posterior_steps": -1})
    with pytest.raises(UserError, match="posterior_restarts"):
        build_section("labels", {"posterior_restarts": 0})


def test_round_to_total_keeps_the_sum_and_the_minimum():
    counts = round_to_total(torch.tensor([2.6, 0.2, 0.1, 4.9]), 8, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert counts.sum() == 8 and counts[1] >= 1 and counts.tolist() == [2, 1, 0, 5]  # largest remainders: 4.9 before 2.6


def test_yin_rule_refuses_a_batch_larger_than_the_class_count(tiny_project):
    model, _ = load_victim(tiny_project / VICTIM)
    artifact = load_gradient(tiny_project / GRADIENT, model)
    artifact.meta = {**artifact.meta, "batch_size": 13}
    with pytest.raises(UserError, match="'yin' assumes distinct labels"):
        yin_labels(model, artifact)


def test_label_recovery_needs_a_final_linear_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    artifact = GradientArtifact(grads={}, meta=gradient_meta("x", 4, [3, 8, 8], [0] * 3, [1] * 3, 2, "none"))
    with pytest.raises(UserError, match="needs a final nn.Linear layer"):
        yin_labels(model, artifact)


def _linear_model(bias: bool, negative_features: bool) -> nn.Module:
    layers = [nn.Flatten(), nn.Linear(12, 6)]
    if not negative_features:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers, nn.Linear(6, 5, bias=bias))


def _plain_artifact(model, labels):
    grads = dict(zip([n for n, _ in model.named_parameters()],
                     torch.autograd.grad(nn.functional.cross_entropy(model(torch.randn(len(labels), 3, 2, 2)), labels),
                                         list(model.parameters()))))
    return GradientArtifact(grads, gradient_meta("custom", 5, [3, 2, 2], [0] * 3, [1] * 3, len(labels), "none"))


def test_yin_refuses_features_that_can_be_negative():
    torch.manual_seed(0)
    model = _linear_model(bias=True, negative_features=True)
    with pytest.raises(UserError, match="'yin' needs non-negative features"):
        yin_labels(model, _plain_artifact(model, torch.tensor([0, 1])))
    relu_model = _linear_model(bias=True, negative_features=False)
    assert len(yin_labels(relu_model, _plain_artifact(relu_model, torch.tensor([0, 1])))[0]) == 2


@pytest.mark.parametrize("strategy", ["idlg", "counts"])
def test_bias_strategies_need_a_bias(strategy):
    torch.manual_seed(0)
    model = _linear_model(bias=False, negative_features=False)
    labels = torch.tensor([2]) if strategy == "idlg" else torch.tensor([2, 2, 4])
    with pytest.raises(UserError, match=f"'{strategy}' needs a bias in the final Linear layer"):
        recover(strategy, model, _plain_artifact(model, labels))


def test_strategy_is_a_validated_param():
    assert build_section("labels", {"strategy": "counts"}).strategy == "counts"
    with pytest.raises(UserError, match="'labels.strategy' must be one of"):
        build_section("labels", {"strategy": "guess"})


def test_benchmarks_head_only_gradient_equals_the_full_capture():
    from benchmarks.label_accuracy import head_artifact

    model = _untrained(12)
    labels = torch.tensor([1, 1, 4, 7])
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    full = client_update(model, images, labels, "none", {**META, "num_classes": 12})
    head = head_artifact(model, images, labels, "resnet18", META["mean"], META["std"])
    assert set(head.grads) == {"fc.weight", "fc.bias"}
    for name in head.grads:
        assert torch.allclose(head.grads[name], full.grads[name], atol=1e-7)


def test_benchmark_rerun_of_some_settings_keeps_the_others(tmp_path):
    """A partial rerun (or one cut short) replaces the settings it measured, row for row, and
    keeps every other setting's rows from the earlier results file, with their machine."""
    from benchmarks.label_accuracy import earlier_rows, write_results

    row = {"setting": "a", "arch": "resnet18", "batch_size": 2, "strategy": "yin", "accuracy": 0.5}
    device = torch.device("cpu")
    write_results([row, {**row, "setting": "b"}], [], tmp_path, device, "first run")
    earlier = earlier_rows(tmp_path / "label_accuracy.parquet")
    write_results([{**row, "accuracy": 1.0}], earlier, tmp_path, device, "second run")
    rows = {r["setting"]: r for r in earlier_rows(tmp_path / "label_accuracy.parquet")}
    assert rows["a"]["accuracy"] == 1.0 and rows["a"]["command"] == "second run"
    assert rows["b"]["accuracy"] == 0.5 and rows["b"]["command"] == "first run"
    assert len(rows) == 2 and "threads" in rows["b"]["machine"]
