"""benchmarks/step_memory.py: how it follows the memory the step's tensors hold."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from step_memory import LiveStorage  # noqa: E402


def test_live_storage_counts_each_storage_once_while_it_lives_and_keeps_the_peak():
    size = 1000 * 4
    with LiveStorage() as live:
        a = torch.ones(1000)
        b = a + 1
        view = a[10:]  # a view: no storage of its own
        del a
        assert live.current == 2 * size  # the view keeps a's storage alive
        c = b * 2
        del view
        assert live.current == 2 * size
        del b
        d = torch.empty(500)
    assert (live.current, live.peak) == (size + 500 * 4, 3 * size)
    del c, d
    assert live.current == 0
