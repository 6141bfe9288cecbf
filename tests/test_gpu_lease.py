"""benchmarks/gpu_lease.sh: the most needed measurement first, the whole within its BUDGET."""

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_each_step_gets_at_most_what_is_left_of_the_budget_and_the_rest_is_skipped(tmp_path):
    calls = tmp_path / "calls.txt"
    fake_python = tmp_path / "python"  # the GPU scripts' stand-in: records its arguments, takes a while
    fake_python.write_text(f'#!/bin/sh\necho "$@" >> {calls}\npwd >> {tmp_path / "folders.txt"}\n'
                           'case "$2" in *tf32_quality*) sleep 3 ;; *) sleep 1 ;; esac\n')
    fake_python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake_python), "OUT": "out", "BUDGET": "33"}  # OUT as given from the caller's folder
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_lease.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ran = calls.read_text().splitlines()
    # each as a module of the benchmarks package, run from the repository root whatever the caller's folder
    assert [line.split()[:2] for line in ran] == [["-m", "benchmarks.bn_elementwise_check"],
                                                  ["-m", "benchmarks.cuda_graph_check"], ["-m", "benchmarks.tf32_quality"]]
    assert set((tmp_path / "folders.txt").read_text().split()) == {str(REPO)}
    assert (tmp_path / "out").is_dir() and all("--out " + str(tmp_path / "out") + "/" in line for line in ran)
    assert f"--out {tmp_path / 'out'}/cuda_graph-focus.json" in ran[1]
    limits = [int(s) for s in re.findall(r"\(at most (\d+) s\)", done.stdout)]
    assert len(limits) == 3 and all(limit <= 33 for limit in limits)  # capped by the budget, not 60, 360 and 200
    skipped = [line for line in done.stdout.splitlines() if line.startswith("== skipped")]
    assert len(skipped) == 1 and "benchmarks.step_profile --conv-double-backward explicit-grouped" in skipped[0]
