"""benchmarks/out_of_memory_check.py, run where nothing runs out of memory: a simulated limit."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_check_halves_the_seeds_per_call_to_the_limit_and_matches_a_run_set_to_that(tmp_path):
    out = tmp_path / "out_of_memory.json"
    command = [sys.executable, str(REPO / "benchmarks" / "out_of_memory_check.py"), "--device", "cpu", "--arch", "resnet18",
               "--px", "16", "--batch", "2", "--iterations", "2", "--simulate-images", "4", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, "TQDM_DISABLE": "1"}, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["halvings"] == [[8, 4], [4, 2]]  # 16 images, then 8, then 4 fit
    assert result["seeds_per_call_at_the_end"] == 2 and result["passed"]
    assert result["images_apart_relative_to_their_movement"] < 0.05
