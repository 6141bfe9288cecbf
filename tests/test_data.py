import numpy as np
import pytest
import torch
from PIL import Image

from gradinv.client.data import (PHOTOS, denormalize, load_meta, load_set, make_imagefolder, make_photos, normalize,
                                 prepare)
from gradinv.errors import UserError
from gradinv.pipeline.config import build_section


def test_photos_are_deterministic_and_labelled_one_class_per_photo():
    config = build_section("data", {"resolution": 16, "train_per_class": 5, "pool_per_class": 3, "seed": 3})
    train_a, pool_a, classes = make_photos(config)
    train_b, pool_b, _ = make_photos(config)
    assert torch.equal(train_a.images, train_b.images) and torch.equal(pool_a.images, pool_b.images)
    assert classes == sorted(PHOTOS) and len(classes) == 12
    assert train_a.images.shape == (5 * 12, 3, 16, 16) and train_a.images.dtype == torch.uint8
    assert torch.equal(torch.bincount(pool_a.labels), torch.full((12,), 3))
    other, _, _ = make_photos(build_section("data", {"resolution": 16, "train_per_class": 5, "pool_per_class": 3, "seed": 4}))
    assert not torch.equal(other.images, train_a.images)


def test_pool_never_repeats_a_training_image():
    train, pool, _ = make_photos(build_section("data", {"resolution": 16, "train_per_class": 20, "pool_per_class": 5}))
    distances = torch.cdist(pool.images.flatten(1).float(), train.images.flatten(1).float())
    assert distances.min() > 0


def test_larger_resolution_is_supported():
    train, _, _ = make_photos(build_section("data", {"resolution": 64, "train_per_class": 1, "pool_per_class": 1}))
    assert train.images.shape[-2:] == (64, 64)


def test_prepare_writes_sets_that_load_back(tmp_path):
    config = build_section("data", {"resolution": 16, "train_per_class": 2, "pool_per_class": 2})
    prepare(config, tmp_path)
    meta = load_meta(tmp_path)
    assert meta.num_classes == 12 and meta.resolution == 16
    assert len(load_set(tmp_path, "pool").labels) == 24


def test_normalize_round_trips():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    back = denormalize(normalize(images, mean, std), mean, std)
    assert torch.allclose(back, images.float() / 255, atol=1e-6)


def _write_tree(root, classes, per_class, size=(40, 30)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_imagefolder_source_reads_an_imagenet_style_tree(tmp_path):
    _write_tree(tmp_path / "train", ["cat", "dog", "eel"], 3)
    _write_tree(tmp_path / "val", ["cat", "dog", "eel"], 2)
    config = build_section("data", {"source": "imagefolder", "train_dir": str(tmp_path / "train"),
                                    "pool_dir": str(tmp_path / "val"), "resolution": 16,
                                    "train_per_class": 2, "pool_per_class": 5})
    train, pool, classes = make_imagefolder(config)
    assert classes == ["cat", "dog", "eel"]
    assert train.images.shape == (6, 3, 16, 16)
    assert pool.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagefolder_missing_folder_is_one_clear_error(tmp_path):
    config = build_section("data", {"source": "imagefolder", "train_dir": str(tmp_path / "nope"),
                                    "pool_dir": str(tmp_path / "nope2")})
    with pytest.raises(UserError, match="'data.train_dir' folder .* does not exist"):
        make_imagefolder(config)
