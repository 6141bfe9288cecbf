"""benchmarks/step_profile.py on a CPU: the operator table says which shapes an operator's time goes to."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_profile_lists_operators_by_input_shapes_beside_the_kernels(tmp_path):
    out = tmp_path / "profile.json"
    command = [sys.executable, str(REPO / "benchmarks" / "step_profile.py"), "--device", "cpu", "--arch", "resnet18",
               "--px", "16", "--batch", "2", "--seeds", "2", "--steps", "1", "--top", "40", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, "TQDM_DISABLE": "1"},
                              timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["kernels"] and report["operators"]
    times = [r["ms_per_step"] for r in report["operators"]]
    assert times == sorted(times, reverse=True) and sum(r["share"] for r in report["operators"]) <= 1.0 + 1e-9
    convolutions = [r for r in report["operators"] if r["name"] == "aten::mkldnn_convolution"]
    # the same operator appears once per input shape: ResNet-18's last stage (512 channels, 3x3) among them
    assert len(convolutions) >= 2 and len({r["input_shapes"] for r in convolutions}) == len(convolutions)
    assert any("[512, 512, 3, 3]" in r["input_shapes"] for r in convolutions)
    assert all(r["ms_per_step"] > 0 and r["calls_per_step"] >= 1 for r in report["operators"])




def test_with_explicit_convolutions_the_profile_shows_no_convolution_grouped_over_the_seeds(tmp_path):
    """--conv-double-backward reaches the step: torch's vmap rules would group ResNet-18's last 3×3
    convolutions over the 2 seeds (weights 1024×512: tests/test_convolution.py shows the grouping),
    the explicit convolution runs them per seed (512×512)."""
    out = tmp_path / "explicit.json"
    command = [sys.executable, str(REPO / "benchmarks" / "step_profile.py"), "--device", "cpu", "--arch", "resnet18",
               "--px", "16", "--batch", "2", "--seeds", "2", "--steps", "1", "--top", "60",
               "--conv-double-backward", "explicit", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, "TQDM_DISABLE": "1"},
                              timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["conv_double_backward"] == "explicit"
    shapes = [r["input_shapes"] for r in report["operators"] if "conv" in r["name"]]
    assert any("[512, 512, 3, 3]" in s for s in shapes) and not any("[1024, 512, 3, 3]" in s for s in shapes)
