"""benchmarks/out_of_memory_check.py, run where nothing runs out of memory: a simulated limit."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from out_of_memory_check import main  # noqa: E402


def test_the_check_halves_the_seeds_per_call_to_the_limit_and_matches_a_run_set_to_that(tmp_path):
    out = tmp_path / "out_of_memory.json"
    assert main(["--device", "cpu", "--arch", "resnet18", "--px", "16", "--batch", "2", "--iterations", "2",
                 "--simulate-images", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["halvings"] == [[8, 4], [4, 2]]  # 16 images, then 8, then 4 fit
    assert result["seeds_per_call_at_the_end"] == 2 and result["passed"]
    # the retried first iteration computes what the run set by hand computes, and the two end where
    # two runs set by hand end (on a CPU the same bits: nothing is left to float noise)
    assert result["iteration0_totals_max_rel_diff"] < 1e-6
    assert result["float_noise_two_runs_set_by_hand"] == 0.0
    assert result["images_apart_relative_to_their_movement"] < 1e-5
