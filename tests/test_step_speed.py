"""benchmarks/step_speed.py: how a configuration's rounds become its row."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from step_speed import against_bound, cuda_graph_section, measure, measured_in_rounds, selected_configs  # noqa: E402


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


def test_a_timed_step_is_set_against_the_traffic_and_arithmetic_counted_for_its_variant():
    roofline = {"gpus": {"H100": {"bandwidth": 2e12, "tf32": 400e12}},
                "rows": [{"bn_double_backward": "explicit", "batch": 8, "seeds": 8, "bytes": 300e9, "flops": 4e12,
                          "paper_minutes_H100": 0.1 * 20000 / 60}], "stacked_seeds_rows": []}
    timed = {"batch": 8, "seeds": 8, "cuda_graph": True, "bn_double_backward": "explicit", "batched_seeds": "vmap",
             "seconds_per_iteration": 0.3}
    uncounted = [{**timed, "batched_seeds": "stacked"}, {**timed, "channels_last": True}, {**timed, "batch": 1},
                 {**timed, "precision": "float16"},
                 {**timed, "error": "out of GPU memory"}]
    (line,) = against_bound([timed, *uncounted, {**timed, "conv_double_backward": "explicit"}], roofline, "H100")
    assert "1.00 TB/s of the counted 300 GB (50% of the H100's 2.00 TB/s)" in line
    assert "13.3 TFLOP/s (3.3% of TF32)" in line and line.endswith("3.0x its bound")
    # a step with the convolutions written out is set against its own count, not the default's
    roofline["explicit_conv_rows"] = [{**roofline["rows"][0], "bytes": 330e9, "conv_double_backward": "explicit"},
                                      {**roofline["rows"][0], "bytes": 240e9, "conv_double_backward": "explicit-grouped"}]
    written_out = [{**timed, "conv_double_backward": mode} for mode in ("explicit", "explicit-grouped")]
    _, dense, grouped = against_bound([timed, *written_out], roofline, "H100")
    assert "seeds vmap, convolutions explicit:" in dense and "of the counted 330 GB" in dense
    assert "seeds vmap, convolutions explicit-grouped:" in grouped and "of the counted 240 GB" in grouped


def test_a_graphed_variant_timed_without_an_eager_twin_gets_a_line_of_its_own():
    step = {"batch": 8, "seeds": 8, "cuda_graph": True, "bn_double_backward": "explicit", "batched_seeds": "vmap",
            "channels_last": False, "peak_memory_bytes": 2**30}
    speed = [{**step, "cuda_graph": False, "seconds_per_iteration": 0.6}, {**step, "seconds_per_iteration": 0.3},
             {**step, "cudnn_benchmark": True, "seconds_per_iteration": 0.2},
             {**step, "conv_double_backward": "explicit", "seconds_per_iteration": 0.1}]
    section = cuda_graph_section({"machine": {}, "command": "c", "check": {"error": "none"}, "speed": speed})
    rows = [line for line in section.splitlines() if line.startswith("| 8 | 8 |")]
    assert rows == ["| 8 | 8 | explicit | vmap | 0.600 | 0.300 | 2.00x | 1024 MiB / 1024 MiB |",
                    "| 8 | 8 | explicit | vmap, cudnn.benchmark | not run | 0.200 | - | - / 1024 MiB |",
                    "| 8 | 8 | explicit | vmap, convolutions explicit | not run | 0.100 | - | - / 1024 MiB |"]
    unchecked = cuda_graph_section({"machine": {}, "command": "c --skip-check", "speed": speed})  # timed only
    assert "not run by this command (--skip-check)" in unchecked and rows[2] in unchecked.splitlines()


def test_the_baseline_spells_the_distance_as_it_reads_and_leaves_the_library_as_it_was(monkeypatch):
    import step_speed

    from gradinv import objective as objective_module
    from gradinv.config import build_section

    calls = []
    straightforward = step_speed.straightforward_layer_distance
    monkeypatch.setattr(step_speed, "straightforward_layer_distance", lambda *a, **k: calls.append(1) or straightforward(*a, **k))
    library = objective_module.gradient_distance, objective_module.bn_distance
    model, artifact, labels = step_speed.problem("resnet18", 4, 16, 2)
    config = build_section("inversion", {"seeds": 1, "device": "cpu"})
    seconds = step_speed.baseline_seconds(model, artifact, labels, config, torch.device("cpu"), iterations=1)
    layers = sum(p.requires_grad for p in model.parameters())
    assert seconds > 0 and len(calls) == 2 * layers  # warm-up and one timed step, every layer on its own
    assert (objective_module.gradient_distance, objective_module.bn_distance) == library


def test_the_gpu_suite_times_the_engine_as_shipped_at_every_batch_and_seed_count_and_can_run_it_alone():
    chosen = selected_configs("gpu", ["engine-default", "baseline"])
    assert sorted(chosen) == sorted((b, g, v) for b in (1, 8, 48) for g in (1, 4, 8) for v in ("engine-default", "baseline"))
    assert [c for c in selected_configs("gpu", None) if c[2] == "engine-default"] == [c for c in chosen if c[2] == "engine-default"]
    with pytest.raises(SystemExit, match="no variant engine-fast in the gpu suite"):
        selected_configs("gpu", ["engine-default", "engine-fast"])


def test_the_engine_as_shipped_is_timed_from_two_run_lengths(monkeypatch):
    import step_speed

    lengths = []
    honest = step_speed.invert

    def counted(model, artifact, labels, config):
        lengths.append(config.iterations)
        assert config.seed_batch == 0 and config.cuda_graph == "auto" and config.bn_double_backward == "auto"
        return honest(model, artifact, labels, config)

    monkeypatch.setattr(step_speed, "invert", counted)
    row = measure({"suite": "gpu", "device": "cpu", "arch": "resnet18", "classes": 10, "px": 16, "batch": 2, "seeds": 2,
                   "variant": "engine-default", "iterations": 3})
    assert lengths == [4, 7, 4]  # warm-up, then the difference of 4 + 3 and 4 iterations
    assert row["flops_per_iteration"] > 0 and row["tf32"] is False  # no TF32 on a CPU


def test_the_doc_shows_each_suites_own_file_first_then_other_machines_with_their_note(monkeypatch, tmp_path):
    import json
    import shutil

    import step_speed

    for name in ("step_speed-gpu.json", "step_speed-cpu.json", "step_speed-cpu-second.json"):
        shutil.copy(step_speed.RESULTS / name, tmp_path / name)
    monkeypatch.setattr(step_speed, "RESULTS", tmp_path)
    monkeypatch.setattr(step_speed, "DOC", tmp_path / "step_speed.md")
    doc = step_speed.write_doc().read_text()
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("step_speed-cpu.json", "step_speed-cpu-second.json"))
    positions = [doc.index(f"Command: `{first['command']}`"), doc.index(second["note"]),
                 doc.index(f"Command: `{second['command']}`"), doc.index("### GPU")]
    assert positions == sorted(positions)
    assert "note" not in first and doc.count(second["note"]) == 1
