"""Progress bars: tqdm when installed (it is a declared dependency), a silent range otherwise,
so that the library still runs on machines that carry torch and little else."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str, **options) -> Iterator[T]:
    try:
        from tqdm import tqdm
    except ImportError:
        return iter(items)
    return iter(tqdm(items, desc=description, mininterval=2.0, **options))
