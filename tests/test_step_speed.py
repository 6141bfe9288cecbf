"""benchmarks/step_speed.py: how a configuration's rounds become its row, what each variant sets,
and that the straightforward baseline computes the library's objective without touching the library."""

import pytest
import torch

from benchmarks import step_speed
from benchmarks.step_speed import engine_settings, measure, measured_in_rounds, selected_configs, suite_configs
from gradinv.pipeline.config import build_section


def test_rounds_take_the_variants_in_turn_and_a_row_keeps_the_median_and_the_largest_peak():
    order = []
    times = {"baseline": iter([0.30, 0.10, 0.20]), "engine": iter([0.05, 0.09, 0.07])}

    def measure(spec):
        order.append(spec["variant"])
        seconds = next(times[spec["variant"]])
        return {**spec, "seconds_per_iteration": seconds, "flops_per_iteration": 10.0,
                "achieved_flops": 10.0 / seconds, "peak_memory_bytes": int(seconds * 1000)}

    baseline, engine = measured_in_rounds([{"variant": "baseline"}, {"variant": "engine"}], 3, measure)
    assert order == ["baseline", "engine"] * 3  # a slow spell of the machine falls on both alike
    assert baseline["seconds_per_iteration"] == 0.20 and baseline["seconds_per_iteration_rounds"] == [0.30, 0.10, 0.20]
    assert baseline["peak_memory_bytes"] == 300 and baseline["achieved_flops"] == 10.0 / 0.20
    assert engine["seconds_per_iteration"] == 0.07 and engine["rounds"] == 3


def test_a_failed_round_makes_the_row_a_failure():
    runs = iter([{"variant": "engine", "seconds_per_iteration": 0.1, "flops_per_iteration": 1.0, "peak_memory_bytes": 1},
                 {"variant": "engine", "error": "out of GPU memory"}])
    (row,) = measured_in_rounds([{"variant": "engine"}], 2, lambda spec: next(runs))
    assert row["error"] == "out of GPU memory"


def test_every_engine_variant_is_a_valid_engine_section_and_says_what_it_sets():
    for suite in ("cpu", "gpu"):
        for _, seeds, variant in suite_configs(suite):
            assert "channels" not in variant and "stacked" not in variant  # settings the engine no longer has
            if variant.startswith("engine-") and variant != "engine-default":
                engine = build_section("engine", engine_settings(variant, seeds))
                assert engine.cuda_graph is False  # eager: cuda_graph_check.py times graphed steps
    assert engine_settings("engine-loop", 8) == {"seed_workers": 1, "seed_batch": 1, "tf32": False, "bn_double_backward": "pytorch",
                                                 "cuda_graph": False, "keep_freed_memory": True}
    auto = engine_settings("engine-auto-bn-explicit", 4)
    assert (auto["seed_workers"], auto["seed_batch"], auto["bn_double_backward"]) == (0, 0, "explicit")
    assert engine_settings("engine-vmap4-tf32", 8)["seed_batch"] == 4 and engine_settings("engine-vmap", 8)["seed_batch"] == 8
    assert engine_settings("engine-auto-default-malloc", 1)["keep_freed_memory"] is False


def test_the_gpu_suite_times_the_engine_as_shipped_at_every_batch_and_seed_count_and_can_run_it_alone():
    chosen = selected_configs("gpu", ["engine-default", "baseline"])
    assert sorted(chosen) == sorted((b, g, v) for b in (1, 8, 48) for g in (1, 4, 8) for v in ("engine-default", "baseline"))
    assert [c for c in selected_configs("gpu", None) if c[2] == "engine-default"] == [c for c in chosen if c[2] == "engine-default"]
    with pytest.raises(SystemExit, match="no variant engine-fast in the gpu suite"):
        selected_configs("gpu", ["engine-default", "engine-fast"])


@pytest.mark.slow
def test_the_baseline_computes_the_librarys_objective_layer_by_layer_and_leaves_the_library_alone(monkeypatch):
    """The straightforward step's total equals the library's objective on the same images (so the
    speed-up compares the same computation), each layer's distance computed on its own; the
    library's own distances are never called, and the model keeps torch's layers."""
    from gradinv.attack import objective as objective_module
    from gradinv.attack.objective import Objective
    from gradinv.client.step import train_mode_copy

    model, artifact, labels = step_speed.problem("resnet18", 4, 16, 2)
    config = build_section("inversion", {"seeds": 1})
    objective = Objective(train_mode_copy(model), artifact, torch.tensor(labels), config)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = objective.terms(x)["total"].item()

    calls, models = [], []
    straightforward, terms = step_speed.straightforward_layer_distance, step_speed.straightforward_terms
    monkeypatch.setattr(step_speed, "straightforward_layer_distance", lambda *a, **k: calls.append(1) or straightforward(*a, **k))
    monkeypatch.setattr(step_speed, "straightforward_terms", lambda o, *a: models.append(o.model) or terms(o, *a))
    assert step_speed.straightforward_terms(objective, x, lambda t: t).item() == pytest.approx(expected, rel=1e-5)
    layers = sum(p.requires_grad for p in model.parameters())
    assert len(calls) == layers
    for name in ("gradient_distance", "bn_distance", "layer_distance"):
        monkeypatch.setattr(objective_module, name, lambda *a, **k: pytest.fail("the baseline used the library's distance"))
    seconds = step_speed.baseline_seconds(model, artifact, labels, config, torch.device("cpu"), iterations=1)
    assert seconds > 0 and len(calls) == 3 * layers  # warm-up and one timed step, every layer on its own
    relus = [type(m) for m in models[-1].modules() if isinstance(m, torch.nn.ReLU)]
    assert relus and set(relus) == {torch.nn.ReLU}  # torch's own layers, not the engine's


@pytest.mark.slow
def test_the_engine_as_shipped_is_timed_from_two_run_lengths(monkeypatch):
    lengths = []
    honest = step_speed.invert

    def counted(model, artifact, labels, config, engine):
        lengths.append(config.iterations)
        assert engine.seed_batch == 0 and engine.cuda_graph == "auto" and engine.bn_double_backward == "auto"
        return honest(model, artifact, labels, config, engine=engine)

    monkeypatch.setattr(step_speed, "invert", lambda *a, engine: counted(*a, engine))
    row = measure({"suite": "gpu", "device": "cpu", "arch": "resnet18", "classes": 10, "px": 16, "batch": 2, "seeds": 2,
                   "variant": "engine-default", "iterations": 3})
    assert lengths == [4, 7, 4]  # warm-up, then the difference of 4 + 3 and 4 iterations
    assert row["flops_per_iteration"] > 0 and row["tf32"] is False  # no TF32 on a CPU
