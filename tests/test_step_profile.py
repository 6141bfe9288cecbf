"""benchmarks/step_profile.py on a CPU: the operator table says which shapes an operator's time goes to."""

import json

import pytest

from benchmarks.step_profile import main

pytestmark = pytest.mark.slow

# --top 400 lists every operator of the small step: which appear does not hang on the machine's timing.
SMALL = ["--device", "cpu", "--arch", "resnet18", "--px", "16", "--batch", "2", "--seeds", "2", "--steps", "1"]


def test_the_profile_lists_operators_by_input_shapes_beside_the_kernels(tmp_path):
    out = tmp_path / "profile.json"
    assert main([*SMALL, "--top", "400", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["command"].endswith("--top 400 --out " + str(out))
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
    assert main([*SMALL, "--top", "400", "--conv-double-backward", "explicit", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["conv_double_backward"] == "explicit"
    shapes = [r["input_shapes"] for r in report["operators"] if "conv" in r["name"]]
    assert any("[512, 512, 3, 3]" in s for s in shapes) and not any("[1024, 512, 3, 3]" in s for s in shapes)
