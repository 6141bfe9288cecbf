"""benchmarks/step_memory.py: how it follows the memory the step's tensors hold, and which
defaults it estimates."""

import json

import torch

from benchmarks.common import RESULTS
from benchmarks.step_memory import DEFAULTS, LiveStorage, defaults_on_cuda


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


def test_the_defaults_it_estimates_are_the_engines_on_cuda_as_the_results_file_recorded_them():
    """gradinv.engine.policy resolves auto on CUDA: seeds batched up to 64 images a call, the written-out
    BatchNorm with several seeds; the estimates in step_memory.json were made for the same choices."""
    assert defaults_on_cuda(8, 8) == {"bn_double_backward": "explicit", "seeds_per_chunk": 8}
    assert defaults_on_cuda(48, 8) == {"bn_double_backward": "explicit", "seeds_per_chunk": 1}
    assert defaults_on_cuda(1, 1) == {"bn_double_backward": "pytorch", "seeds_per_chunk": 1}
    recorded = json.loads((RESULTS / "step_memory.json").read_text())["rows"]
    defaults = [r for r in recorded if r["settings"] == "defaults"]
    assert [(r["batch"], r["seeds"]) for r in defaults] == DEFAULTS
    for r in defaults:
        assert defaults_on_cuda(r["batch"], r["seeds"]) == {k: r[k] for k in ("bn_double_backward", "seeds_per_chunk")}
