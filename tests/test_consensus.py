import pytest
import torch
import torch.nn.functional as F

from gradinv.attack.consensus import REGISTRATIONS, consensus, register
from gradinv.evaluation.metrics import psnr


def _smooth_image(seed: int, size: int = 32) -> torch.Tensor:
    noise = torch.rand(1, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)


@pytest.mark.parametrize("method", ["translation", "ilk", "tvl1"])
def test_registration_undoes_a_small_shift(method):
    reference = _smooth_image(0)
    moved = torch.roll(reference, shifts=(2, -1), dims=(1, 2))
    inner = (slice(None), slice(4, -4), slice(4, -4))  # away from the wrapped border
    before = psnr(moved[inner][None], reference[inner][None]).item()
    after = psnr(register(reference, moved, method)[inner][None], reference[inner][None]).item()
    assert after > before + 10


def test_consensus_of_identical_seeds_is_the_seed_and_none_is_the_mean():
    image = torch.stack([_smooth_image(1), _smooth_image(2)])
    same = image.expand(3, -1, -1, -1, -1)
    for method in REGISTRATIONS:
        assert torch.allclose(consensus(same, method), image, atol=1e-5)
    different = torch.stack([image, image.flip(-1)])
    assert torch.allclose(consensus(different, "none"), different.mean(0))


def test_registered_consensus_of_shifted_seeds_is_sharper_than_their_mean():
    truth = _smooth_image(3)[None]
    seeds = torch.stack([torch.roll(truth, shifts=(dy, dx), dims=(2, 3)) for dy, dx in [(0, 0), (2, 0), (0, -2), (-1, 1)]])
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    lazy = psnr(consensus(seeds, "none")[inner], truth[inner]).item()
    registered = psnr(consensus(seeds, "tvl1")[inner], truth[inner]).item()
    assert registered > lazy + 3
