"""Checks of the metadata that travels with a model or a gradient (model.json, gradient.json).

`where` names the file in the one-sentence UserError, e.g. "gradient metadata data/capture/gradient/gradient.json".
"""

from __future__ import annotations

import math
import os

from gradinv.errors import UserError


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_normalisation(mean, std, where: str) -> None:
    """mean: 3 finite numbers; std: 3 finite positive numbers (one per RGB channel)."""
    if not isinstance(mean, list) or len(mean) != 3 or not all(_number(m) for m in mean):
        raise UserError(f"{where} has 'mean' {mean!r}; it must be a list of 3 finite numbers, one per RGB channel.")
    if not isinstance(std, list) or len(std) != 3 or not all(_number(s) and s > 0 for s in std):
        raise UserError(f"{where} has 'std' {std!r}; it must be a list of 3 finite positive numbers, "
                        "one per RGB channel.")


def check_positive_int(value, key: str, where: str) -> None:
    if not _whole(value) or value < 1:
        raise UserError(f"{where} has '{key}' {value!r}; it must be a whole number of at least 1.")


def check_input_shape(shape, where: str) -> None:
    """[3, height, width]: RGB images, as the per-channel normalisation (3 values) describes."""
    if (not isinstance(shape, list) or len(shape) != 3 or not all(_whole(n) and n > 0 for n in shape)
            or shape[0] != 3):
        raise UserError(f"{where} has 'input_shape' {shape!r}; it must be [3, height, width] with positive whole "
                        "numbers (RGB images, one normalisation value per channel).")


def physical_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_batch_memory(batch_size: int, input_shape: list[int], where: str) -> None:
    """One float32 batch of `batch_size` images of `input_shape` must fit in physical memory."""
    need = batch_size * math.prod(input_shape) * 4
    have = physical_memory()
    if need > have:
        raise UserError(f"{where} declares a batch of {batch_size} images of shape {input_shape}, whose float32 batch "
                        f"alone needs {need / 2**30:.1f} GiB, more than this machine's {have / 2**30:.1f} GiB "
                        "of memory; check its 'batch_size'.")
