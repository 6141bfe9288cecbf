"""benchmarks/low_precision_check.py: every path and precision compared with the float32 reference."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from low_precision_check import PATHS, PRECISIONS, SEEDS, compare  # noqa: E402


def test_every_path_and_precision_gets_a_row_and_float32_paths_agree_with_the_reference(attack):
    model, _, artifact, images, labels = attack
    seeds = torch.stack([images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(g))
                         for g in range(SEEDS)])
    rows = compare(model, artifact, labels, seeds, torch.device("cpu"))
    assert [(r["precision"], r["bn_double_backward"], r["seeds"] == "vmapped") for r in rows] == [
        (precision, bn, vmapped) for precision in PRECISIONS for bn, vmapped in PATHS]
    for row in rows:
        assert "error" in row or set(row) >= {"image_gradient_cosine", "image_gradient_relative_difference"}
        if row["precision"] == "float32":
            assert row["image_gradient_relative_difference"] < 1e-4 and row["gradient_term_relative_difference"] < 1e-5
