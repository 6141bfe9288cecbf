"""Progress bars: tqdm when installed (it is a declared dependency), a silent range otherwise,
so that the library still runs on machines that carry torch and little else."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class _Silent:
    def __init__(self, items: Iterable[T]):
        self._items = items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def set_postfix(self, *args, **kwargs) -> None:
        pass


def progress(items: Iterable[T], description: str, **options):
    """An iterable over `items` with `set_postfix(name=value, ...)` for running figures."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent(items)
    return tqdm(items, desc=description, mininterval=2.0, **options)
