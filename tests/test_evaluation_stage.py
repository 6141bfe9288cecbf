"""Evaluation against independent references: IIP, FFT2D, registered PSNR, LPIPS, the report."""

import json
import re

import pytest
import torch
import torchvision

from gradinv.client.capture import TRUTH_FILE
from gradinv.client.data import load_set, normalize
from gradinv.client.models import penultimate_features
from gradinv.client.victim import load_victim
from gradinv.errors import UserError
from gradinv.evaluation.evaluate import LPIPS_MISSING, Scorer
from gradinv.evaluation.metrics import fft2d_distance, iip_hits, match, psnr, registered_psnr
from gradinv.evaluation.perceptual import load_lpips, pairwise
from gradinv.io import read_tensors, write_tensors
from gradinv.pipeline.config import build_section
from gradinv.pipeline.stages import EVAL, SETS, TRUTH, VICTIM


@pytest.fixture(scope="module")
def gallery(tiny_project):
    model, meta = load_victim(tiny_project / VICTIM)
    pool = load_set(tiny_project / SETS, "pool")
    features = penultimate_features(model, normalize(pool.images, meta.mean, meta.std))
    return model, meta, pool, features


def _features(model, meta, images_uint8_or_float):
    images = images_uint8_or_float if images_uint8_or_float.dtype == torch.uint8 else images_uint8_or_float * 255
    return penultimate_features(model, normalize(images, meta.mean, meta.std))


def test_iip_is_one_for_exact_reconstructions_and_falls_for_shuffled_or_noisy(gallery):
    model, meta, pool, gallery_features = gallery
    index = torch.tensor([0, 5, 11, 17, 23, 30])
    exact = pool.images[index].float() / 255
    hits, nearest = iip_hits(_features(model, meta, exact), gallery_features, index)
    assert hits.all() and torch.equal(nearest, index)

    shuffled = exact[torch.tensor([1, 2, 3, 4, 5, 0])]
    assert iip_hits(_features(model, meta, shuffled), gallery_features, index)[0].float().mean() == 0.0

    noisy = (exact + 0.8 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert iip_hits(_features(model, meta, noisy), gallery_features, index)[0].float().mean() < 1.0


def test_fft2d_is_zero_for_identical_images_and_grows_with_noise():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 16, generator=generator)
    assert torch.allclose(fft2d_distance(a, a), torch.zeros(2, dtype=torch.float64))
    small = (a + 0.05 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
    large = (a + 0.3 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
    assert (fft2d_distance(small, a) > 0).all() and (fft2d_distance(large, a) > fft2d_distance(small, a)).all()


def test_registered_psnr_forgives_a_small_shift_and_never_lowers_psnr():
    image = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    shifted = torch.roll(image, shifts=(1, -2), dims=(2, 3))
    plain, registered = psnr(shifted, image).item(), registered_psnr(shifted, image, 2).item()
    assert registered > 100 > plain  # exact on the overlap
    assert registered_psnr(shifted, image, 0).item() == pytest.approx(plain)


def _random_alexnet_file(tmp_path, seed):
    torch.manual_seed(seed)
    path = tmp_path / f"alexnet-{seed}.safetensors"
    write_tensors(path, torchvision.models.alexnet(weights=None).state_dict())
    return path


def test_lpips_uses_the_given_backbone_weights_and_is_zero_for_identical_images(tmp_path):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 32, 32, generator=generator), torch.rand(3, 3, 32, 32, generator=generator)
    first = load_lpips("alex", str(_random_alexnet_file(tmp_path, 0)))
    second = load_lpips("alex", str(_random_alexnet_file(tmp_path, 1)))
    assert torch.allclose(first(a, a), torch.zeros(3, dtype=torch.float64), atol=1e-7)
    assert (first(a, b) > 0).all()
    assert not torch.allclose(first(a, b), second(a, b))  # the weights file matters: never random weights
    permutation = torch.tensor([2, 0, 1])
    noisy = (a[permutation] + 0.02 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
    order = match(noisy, a, pairwise(first, noisy, a))
    assert torch.equal(permutation[order], torch.arange(3))


def test_lpips_with_a_weights_file_that_does_not_fit_is_one_clear_error(tmp_path):
    path = tmp_path / "wrong.safetensors"
    write_tensors(path, {"something": torch.zeros(2)})
    with pytest.raises(UserError, match="does not fit the model"):
        load_lpips("alex", str(path))


def test_lpips_matching_needs_weights_and_named_feature_models_need_weights():
    with pytest.raises(UserError, match="lpips_weights"):
        build_section("evaluation", {"match_distance": "lpips"})
    with pytest.raises(UserError, match="iip_weights"):
        build_section("evaluation", {"iip_model": "resnet50"})


def test_scorer_of_the_originals_themselves_is_perfect(tiny_project, gallery):
    model, meta, pool, gallery_features = gallery
    truth = read_tensors(tiny_project / TRUTH / TRUTH_FILE, "truth")
    originals = truth["images"].float() / 255
    scorer = Scorer(originals, build_section("evaluation", {}), None, model, meta.mean, meta.std,
                    gallery_features, truth["pool_index"])
    scores = scorer.score(originals.flip(0))
    assert scores["iip_hit"].all() and (scores["fft2d"] == 0).all() and (scores["psnr"] > 100).all()
    assert torch.equal(scores["order"], torch.arange(len(originals)).flip(0))


def test_stage_outputs_report_lpips_as_not_computed_and_a_self_contained_html(tiny_project):
    summary = json.loads((tiny_project / EVAL / "metrics.json").read_text())
    assert summary["lpips"] is None and summary["lpips_status"] == LPIPS_MISSING
    assert 0.0 <= summary["iip"] <= 1.0 and summary["registered_psnr"] >= summary["psnr"]
    assert set(summary["consensus"]) >= {"psnr", "ssim", "iip", "fft2d", "registered_psnr"}
    page = (tiny_project / EVAL / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 * summary["batch_size"] + 1  # tiles, loss curves
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: opens with no server
    assert f"{summary['psnr']:.4g}" in page


def test_gallery_subset_keeps_the_batchs_originals(tiny_project):
    from gradinv.evaluation.evaluate import _gallery

    pool_index = read_tensors(tiny_project / TRUTH / TRUTH_FILE, "truth")["pool_index"]
    pool_size = len(load_set(tiny_project / SETS, "pool").labels)
    rows, position = _gallery(build_section("evaluation", {"gallery_size": 10}), pool_size, pool_index)
    assert len(rows) == 10 and torch.equal(rows[position], pool_index)
