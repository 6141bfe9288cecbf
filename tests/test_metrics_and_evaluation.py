import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gradinv.evaluation.metrics import label_accuracy, match, psnr, ssim
from gradinv.pipeline.stages import EVAL


def test_psnr_and_ssim_agree_with_scikit_image():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 16, 16, generator=generator)
    b = (a + 0.1 * torch.randn(3, 3, 16, 16, generator=generator)).clamp(0, 1)
    for i in range(3):
        x, y = a[i].permute(1, 2, 0).double().numpy(), b[i].permute(1, 2, 0).double().numpy()
        assert psnr(a, b)[i].item() == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0), abs=1e-4)
        assert ssim(a, b)[i].item() == pytest.approx(structural_similarity(x, y, channel_axis=2, data_range=1.0), abs=1e-4)


def test_hungarian_matching_recovers_a_known_permutation():
    generator = torch.Generator().manual_seed(1)
    originals = torch.rand(6, 3, 8, 8, generator=generator)
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = (originals[permutation] + 0.01 * torch.randn(6, 3, 8, 8, generator=generator)).clamp(0, 1)
    order = match(shuffled, originals)
    assert np.array_equal(permutation[order].numpy(), np.arange(6))


def test_label_accuracy_is_multiset_overlap():
    assert label_accuracy([1, 2, 3, 4], [4, 3, 2, 1]) == 1.0
    assert label_accuracy([1, 1, 2, 5], [1, 2, 2, 3]) == 0.5


def test_evaluation_outputs(tiny_project):
    summary = json.loads((tiny_project / EVAL / "metrics.json").read_text())
    table = pq.read_table(tiny_project / EVAL / "per_image.parquet").to_pydict()
    assert summary["label_accuracy"] == 1.0
    assert len(table["psnr"]) == 4 and summary["psnr"] == pytest.approx(np.mean(table["psnr"]))
    assert sorted(table["matched_reconstruction"]) == [0, 1, 2, 3]
    assert len(summary["per_seed"]["psnr"]) == 2
    assert (tiny_project / EVAL / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(table) >= {"lpips", "fft2d", "registered_psnr", "iip_hit", "consensus_psnr"}
