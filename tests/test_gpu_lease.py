"""benchmarks/gpu_lease.sh: the most needed measurement first, the whole within its BUDGET."""

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_each_step_gets_at_most_what_is_left_of_the_budget_and_the_rest_is_skipped(tmp_path):
    calls = tmp_path / "calls.txt"
    fake_python = tmp_path / "python"  # the GPU scripts' stand-in: records its arguments, takes a while
    fake_python.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                           'case "$1" in *tf32_quality*) sleep 3 ;; *) sleep 1 ;; esac\n')
    fake_python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake_python), "OUT": str(tmp_path / "out"), "BUDGET": "33"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_lease.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ran = calls.read_text().splitlines()
    assert [line.split()[0] for line in ran] == ["benchmarks/bn_elementwise_check.py", "benchmarks/cuda_graph_check.py",
                                                 "benchmarks/tf32_quality.py"]
    assert f"--out {tmp_path / 'out'}/cuda_graph-focus.json" in ran[1]
    limits = [int(s) for s in re.findall(r"\(at most (\d+) s\)", done.stdout)]
    assert len(limits) == 3 and all(limit <= 33 for limit in limits)  # capped by the budget, not 60, 360 and 200
    skipped = [line for line in done.stdout.splitlines() if line.startswith("== skipped")]
    assert len(skipped) == 1 and "step_profile.py --conv-double-backward explicit-grouped" in skipped[0]
