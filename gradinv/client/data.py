"""Labelled image sets: the embedded `photos` set (made offline from photos bundled with
scikit-image, scikit-learn and matplotlib) and a user's own `imagefolder` tree.

A set is stored as uint8 images (N, 3, R, R) plus int64 labels; normalisation lives in the
metadata and is applied by whoever feeds a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from gradinv import __version__
from gradinv.commit import commits
from gradinv.errors import UserError
from gradinv.io import read_json, read_tensors, write_json, write_tensors
from gradinv.pipeline.config import DataConfig, as_dict

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff", ".JPEG"}
POOL_FRACTION = 0.3  # right-hand share of each photo that only the pool draws from


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # uint8 (N, 3, R, R)
    labels: torch.Tensor  # int64 (N,)


@dataclass(frozen=True)
class SetsMeta:
    classes: list[str]
    resolution: int
    mean: list[float]
    std: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _skimage_photo(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[0] if isinstance(image, tuple) else image  # stereo pairs: left view

    return load


def _sklearn_photo(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    **{name: _skimage_photo(name) for name in (
        "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
        "immunohistochemistry", "retina", "stereo_motorcycle", "colorwheel")},
    "china": _sklearn_photo("china.jpg"),
    "flower": _sklearn_photo("flower.jpg"),
    "grace_hopper": _grace_hopper,
}


def _random_crops(photo: torch.Tensor, count: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random square crops (a quarter to two thirds of the short side), resized."""
    _, height, width = photo.shape
    short = min(height, width)
    crops = []
    for _ in range(count):
        side = int(short * (0.25 + torch.rand((), generator=generator).item() * (2 / 3 - 0.25)))
        side = max(side, 8)
        top = int(torch.randint(0, height - side + 1, (), generator=generator))
        left = int(torch.randint(0, width - side + 1, (), generator=generator))
        crop = photo[:, top:top + side, left:left + side].float().unsqueeze(0)
        crop = F.interpolate(crop, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
        if torch.rand((), generator=generator).item() < 0.5:
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.cat(crops).round().clamp(0, 255).to(torch.uint8)


def make_photos(config: DataConfig) -> tuple[ImageSet, ImageSet, list[str]]:
    """Training and pool sets from the bundled photos; train and pool crops never share a pixel."""
    generator = torch.Generator().manual_seed(config.seed)
    train_parts, pool_parts, train_labels, pool_labels = [], [], [], []
    classes = sorted(PHOTOS)
    for label, name in enumerate(classes):
        photo = torch.from_numpy(np.array(PHOTOS[name]()[..., :3])).permute(2, 0, 1)
        split = int(photo.shape[2] * (1 - POOL_FRACTION))
        train_parts.append(_random_crops(photo[:, :, :split], config.train_per_class, config.resolution, generator))
        pool_parts.append(_random_crops(photo[:, :, split:], config.pool_per_class, config.resolution, generator))
        train_labels += [label] * config.train_per_class
        pool_labels += [label] * config.pool_per_class
    train = ImageSet(torch.cat(train_parts), torch.tensor(train_labels, dtype=torch.int64))
    pool = ImageSet(torch.cat(pool_parts), torch.tensor(pool_labels, dtype=torch.int64))
    return train, pool, classes


def _load_folder(root: Path, classes: list[str], per_class: int, resolution: int, generator: torch.Generator) -> ImageSet:
    from PIL import Image, UnidentifiedImageError

    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES or p.suffix in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"image folder {root / name} holds no images.")
        order = torch.randperm(len(files), generator=generator)[:per_class].tolist()
        for index in sorted(order):
            try:
                image = Image.open(files[index]).convert("RGB")
            except (UnidentifiedImageError, OSError) as err:
                raise UserError(f"image {files[index]} cannot be read ({err}).") from None
            images.append(_resize_center_crop(image, resolution))
            labels.append(label)
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def _resize_center_crop(image, resolution: int) -> torch.Tensor:
    """Shorter side to `resolution`, then the central square (the usual ImageNet evaluation crop)."""
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    image = image.resize((max(resolution, round(width * scale)), max(resolution, round(height * scale))), Image.BICUBIC)
    width, height = image.size
    left, top = (width - resolution) // 2, (height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def make_imagefolder(config: DataConfig) -> tuple[ImageSet, ImageSet, list[str]]:
    """A user's labelled tree: train_dir/<class>/*.jpg and pool_dir/<class>/*.jpg (ImageNet layout)."""
    train_dir, pool_dir = Path(config.train_dir), Path(config.pool_dir)
    for key, folder in (("data.train_dir", train_dir), ("data.pool_dir", pool_dir)):
        if not folder.is_dir():
            raise UserError(f"params: '{key}' folder {folder} does not exist.")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise UserError(f"image folder {train_dir} must hold at least two class sub-folders.")
    missing = [c for c in classes if not (pool_dir / c).is_dir()]
    if missing:
        raise UserError(f"pool folder {pool_dir} lacks the class folder '{missing[0]}' that {train_dir} has.")
    generator = torch.Generator().manual_seed(config.seed)
    train = _load_folder(train_dir, classes, config.train_per_class, config.resolution, generator)
    pool = _load_folder(pool_dir, classes, config.pool_per_class, config.resolution, generator)
    return train, pool, classes


@commits("out_dir")
def prepare(config: DataConfig, out_dir: str | Path) -> list[Path]:
    """Stage `prepare`: write train.safetensors, pool.safetensors and sets.json to out_dir."""
    out_dir = Path(out_dir)
    make = make_photos if config.source == "photos" else make_imagefolder
    train, pool, classes = make(config)
    written = [
        write_tensors(out_dir / "train.safetensors", {"images": train.images, "labels": train.labels}),
        write_tensors(out_dir / "pool.safetensors", {"images": pool.images, "labels": pool.labels}),
    ]
    meta = {"classes": classes, "resolution": config.resolution, "mean": list(config.mean),
            "std": list(config.std), "source": config.source, "params": as_dict(config),
            "train_size": len(train.labels), "pool_size": len(pool.labels), "gradinv_version": __version__}
    written.append(write_json(out_dir / "sets.json", meta))
    return written


def load_set(sets_dir: str | Path, split: str) -> ImageSet:
    tensors = read_tensors(Path(sets_dir) / f"{split}.safetensors", f"{split} set")
    images, labels = tensors.get("images"), tensors.get("labels")
    if images is None or labels is None or images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise UserError(f"{split} set in {sets_dir} is malformed (expected uint8 images (N,3,R,R) and N labels).")
    return ImageSet(images, labels)


def load_meta(sets_dir: str | Path) -> SetsMeta:
    meta = read_json(Path(sets_dir) / "sets.json", "data set metadata")
    return SetsMeta(meta["classes"], meta["resolution"], meta["mean"], meta["std"])


def normalize(images_uint8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return standardize(images_uint8.float() / 255, mean, std)


def standardize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Images in [0, 1] to the model's normalised space."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def denormalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Normalised images back to [0, 1] pixel space."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images * std_t + mean_t
