"""benchmarks/out_of_memory_check.py, run where nothing runs out of memory: a simulated limit."""

import json

import pytest
import torch

from benchmarks.out_of_memory_check import main
from gradinv.engine import policy

pytestmark = pytest.mark.slow


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


def test_the_check_leaves_the_engine_as_it_was_and_needs_cuda_without_a_simulated_limit(tmp_path, monkeypatch):
    before = policy.BATCHED_IMAGES, policy.plan_step
    out = tmp_path / "out_of_memory.json"
    assert main(["--device", "cpu", "--arch", "resnet18", "--px", "16", "--batch", "2", "--iterations", "1",
                 "--simulate-images", "8", "--out", str(out)]) == 0
    assert (policy.BATCHED_IMAGES, policy.plan_step) == before
    from gradinv.attack import inversion
    assert inversion.plan_step is policy.plan_step
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--out", str(tmp_path / "none.json")]) == 2 and not (tmp_path / "none.json").exists()
