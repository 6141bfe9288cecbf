"""benchmarks/step_speed.py: how a configuration's rounds become its row."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from step_speed import measured_in_rounds  # noqa: E402


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
