"""benchmarks/cuda_graph_check.py: how recorded differences become the same-path verdict."""

import json

from benchmarks.common import RESULTS
from benchmarks.cuda_graph_check import graphs_agree, judged, speed_plan
from gradinv.pipeline.config import build_section

# The shape of the differences two eager CUDA runs showed on an H100 (iteration 0, 1, 2, ...).
EAGER_NOISE = [0.0, 5e-5, 2.6e-3, 2e-2, 1.9e-2, 3.9e-2]


def pair(by_iteration, rows=True):
    return {"iteration0_total_max_rel_diff": by_iteration[0], "logged_totals_max_rel_diff": max(by_iteration),
            "images_drift_of_movement": 0.8 if max(by_iteration) else 0.0, "same_log_rows": rows,
            "by_iteration": by_iteration}


def test_a_graph_that_follows_eager_as_closely_as_eager_follows_itself_agrees():
    same = {"eager_repeated": pair(EAGER_NOISE), "graphed_vs_eager": pair([0.0, 4.8e-5, 2.7e-3, 2.2e-2, 8e-3, 3e-2]),
            "resumed_vs_uninterrupted_graphed": pair([0.0] * 6)}
    assert graphs_agree(same)


def test_a_graph_off_at_once_or_with_other_log_rows_is_caught_where_eager_is_not_exact():
    stale_view = pair([0.0, 1e-2, 2e-2, 2e-2, 2e-2, 3e-2])  # a wrongly refreshed input: far off at iteration 1
    assert not graphs_agree({"eager_repeated": pair(EAGER_NOISE), "graphed_vs_eager": stale_view})
    assert not graphs_agree({"eager_repeated": pair(EAGER_NOISE), "graphed_vs_eager": pair(EAGER_NOISE, rows=False)})


def test_where_eager_repeats_itself_exactly_a_graph_must_too():
    exact = pair([0.0] * 6)
    assert graphs_agree({"eager_repeated": exact, "graphed_vs_eager": exact})
    assert not graphs_agree({"eager_repeated": exact, "graphed_vs_eager": pair([0.0, 1e-6, 0, 0, 0, 0])})


def test_the_recorded_h100_check_passes_under_the_scripts_criteria():
    recorded = json.loads((RESULTS / "cuda_graph.json").read_text())
    check = judged(recorded["check"])
    assert check["passed"] == recorded["check"]["passed"] and not check["deterministic"]


def test_the_speed_plan_times_the_paper_preset_first_then_the_shipped_defaults_at_bs_48():
    plan = speed_plan()
    preset = [fixed for batch, seeds, fixed in plan if (batch, seeds) == (8, 8)]
    assert plan[:len(preset)] == [(8, 8, fixed) for fixed in preset] and len(preset) >= 2
    assert plan[len(preset)] == (48, 8, {})  # nothing fixed: auto seed_batch, cuda_graph, bn_double_backward
    assert all(fixed["seed_batch"] == seeds for _, seeds, fixed in plan if fixed)
    for _, _, fixed in plan:  # every row's settings an engine section takes (cudnn_benchmark is torch's own)
        build_section("engine", {k: v for k, v in fixed.items() if k != "cudnn_benchmark"})
    autotuned = [(batch, seeds) for batch, seeds, fixed in plan if fixed.get("cudnn_benchmark") and "conv_double_backward" not in fixed]
    assert autotuned == [(8, 8), (1, 8)]  # the default step with several seeds, once per configuration
    half = [(batch, seeds, fixed["precision"], fixed.get("conv_double_backward"), fixed["bn_double_backward"])
            for batch, seeds, fixed in plan if "precision" in fixed]
    assert sorted(half, key=str) == sorted([(8, 8, precision, conv, "explicit")  # the paper preset only, each convolution
                                            for precision in ("bfloat16", "float16")
                                            for conv in (None, "explicit", "explicit-grouped")]
                                           + [(8, 8, "float16", "explicit-grouped", "explicit-fused")], key=str)
    for mode in ("explicit", "explicit-grouped"):
        explicit_conv = [(batch, seeds, fixed.get("cudnn_benchmark", False), fixed.get("precision", "float32"))
                         for batch, seeds, fixed in plan if fixed.get("conv_double_backward") == mode
                         and fixed["bn_double_backward"] == "explicit"]
        assert sorted(explicit_conv, key=str) == sorted([(8, 8, False, "float32"), (8, 8, True, "float32"),
                                                         (8, 8, False, "bfloat16"), (8, 8, False, "float16")], key=str)
    fused = [(batch, seeds, fixed.get("conv_double_backward"), fixed.get("precision", "float32"))
             for batch, seeds, fixed in plan if fixed.get("bn_double_backward") == "explicit-fused"]
    assert fused == [(8, 8, "explicit-grouped", "float32"), (8, 8, None, "float32"), (8, 8, "explicit-grouped", "float16")]
    candidates = [fixed for _, _, fixed in plan if fixed.get("cudnn_benchmark") or "precision" in fixed
                  or "conv_double_backward" in fixed or fixed.get("bn_double_backward") == "explicit-fused"]
    assert all(fixed["cuda_graph"] and fixed["bn_double_backward"] in ("explicit", "explicit-fused") for fixed in candidates)


def test_the_focused_plan_is_the_paper_presets_default_step_and_its_candidates():
    default = next(fixed for batch, seeds, fixed in speed_plan() if (batch, seeds) == (8, 8) and fixed["cuda_graph"]
                   and fixed["bn_double_backward"] == "explicit")
    focused = speed_plan(focus=True)
    assert focused[0] == (8, 8, default) and all((batch, seeds) == (8, 8) for batch, seeds, _ in focused)
    as_default = lambda fixed: {**fixed, "bn_double_backward": "explicit"} if fixed["bn_double_backward"] == "explicit-fused" else fixed  # noqa: E731
    extended = [fixed for batch, seeds, fixed in speed_plan() if (batch, seeds) == (8, 8)
                and (set(fixed) > set(default) or fixed["bn_double_backward"] == "explicit-fused")
                and all(as_default(fixed)[k] == v for k, v in default.items())]
    assert [fixed for _, _, fixed in focused[1:]] == extended and len(extended) == 14  # autotuned, PRESET_CANDIDATES
    # the likeliest first: BatchNorm's fused elementwise kernel and the convolutions that copy no
    # activations between layouts, together, then each alone, then half precision
    assert [(fixed["bn_double_backward"], fixed.get("conv_double_backward")) for _, _, fixed in focused[2:5]] == [
        ("explicit-fused", "explicit-grouped"), ("explicit", "explicit-grouped"), ("explicit-fused", None)]
    assert [fixed.get("precision") for _, _, fixed in focused[4:7]] == [None, "float16", "float16"]
