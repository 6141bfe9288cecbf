"""benchmarks/low_precision_check.py: every path and precision compared with the float32 reference."""

import pytest
import torch

from benchmarks import low_precision_check
from benchmarks.low_precision_check import PATHS, PRECISIONS, SEEDS, compare, precisions_on, terms_and_image_gradient

pytestmark = pytest.mark.slow


def test_every_path_and_precision_gets_a_row_and_float32_paths_agree_with_the_reference(attack):
    model, _, artifact, images, labels = attack
    seeds = torch.stack([images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(g))
                         for g in range(SEEDS)])
    rows = compare(model, artifact, labels, seeds, torch.device("cpu"))
    assert [(r["precision"], r["bn_double_backward"], r["seeds"] == "vmapped") for r in rows] == [
        (precision, bn, vmapped) for precision in PRECISIONS if precision != "tf32" for bn, vmapped in PATHS]
    for row in rows:
        assert "error" in row or set(row) >= {"image_gradient_cosine", "image_gradient_relative_difference"}
        if row["precision"] == "float32":
            assert row["image_gradient_relative_difference"] < 1e-4 and row["gradient_term_relative_difference"] < 1e-5


def test_float32_runs_with_tf32_off_and_the_tf32_row_with_it_on_then_torch_settings_come_back(attack, monkeypatch):
    model, _, artifact, images, labels = attack
    seen = []
    terms = low_precision_check.Objective.terms
    monkeypatch.setattr(low_precision_check.Objective, "terms", lambda self, x: (
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)), terms(self, x))[1])
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # cuDNN's default: TF32 convolutions
    seeds = torch.stack([images] * SEEDS)
    for precision in ("float32", "tf32"):
        terms_and_image_gradient(model, artifact, labels, seeds, torch.device("cpu"), "pytorch", False, precision)
    assert seen == [(False, False)] * SEEDS + [(True, True)] * SEEDS
    assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert "tf32" in precisions_on(torch.device("cuda")) and "tf32" not in precisions_on(torch.device("cpu"))
