"""One inversion iteration captured as a CUDA graph and replayed (`engine.cuda_graph`).

A graph replays the kernels of one captured call with the same tensors, without Python or
kernel-launch overhead: the step must read everything that changes (learning rate, views, noise,
consensus) from tensors it keeps, which the caller refills before each call, and must not read
values back to the host. The first calls of each kind run eagerly on a side stream (cuDNN and
cuBLAS set themselves up, Adam creates its state), as capture requires; a call of a new kind
(the consensus appears) recaptures. A step that cannot be captured is an error when graphs were
asked for (`cuda_graph: true`) and runs eagerly from then on under `auto`."""

from __future__ import annotations

import sys
from typing import Callable, Hashable

import torch

from gradinv.errors import UserError

WARMUP_CALLS = 2


def capture_cuda_graph(step: Callable[[], dict], device: torch.device) -> Callable[[], dict]:
    """`step` captured; the returned function replays it and returns the captured call's outputs,
    whose tensors each replay rewrites."""
    torch.cuda.empty_cache()  # the warm-up's cached blocks go back, so that the graph's own pool fits beside them
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    def replay() -> dict:
        graph.replay()
        return outputs

    return replay


class GraphedStep:
    """Calls `step(kind)`: eagerly for its first WARMUP_CALLS calls of a kind, then replays a
    capture of it. Only one capture is kept: a new kind replaces it (the kinds of an inversion
    follow each other and never come back). With `eager_if_uncapturable`, a failed capture
    is reported once and every later call runs eagerly."""

    def __init__(self, step: Callable[[Hashable], dict], device: torch.device,
                 capture: Callable[[Callable[[], dict], torch.device], Callable[[], dict]] = capture_cuda_graph,
                 eager_if_uncapturable: bool = False):
        self.step, self.device, self.capture = step, device, capture
        self.eager_if_uncapturable, self.uncapturable = eager_if_uncapturable, False
        self.kind: Hashable = None
        self.eager_calls = 0
        self.replay: Callable[[], dict] | None = None

    def __call__(self, kind: Hashable) -> dict:
        if kind != self.kind:
            self.kind, self.eager_calls, self.replay = kind, 0, None
        if self.replay is not None:
            return self.replay()
        if self.eager_calls < WARMUP_CALLS or self.uncapturable:
            self.eager_calls += 1
            return self._eager(kind)
        try:
            self.replay = self.capture(lambda: self.step(kind), self.device)
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if not self.eager_if_uncapturable:
                raise UserError(f"engine.cuda_graph: the step could not be captured as a CUDA graph ({reason}); "
                                "set engine.cuda_graph: false.") from err
            print(f"gradinv: warning: the step could not be captured as a CUDA graph ({reason}); it runs eagerly "
                  "(engine.cuda_graph: auto).", file=sys.stderr)
            self.uncapturable = True
            return self._eager(kind)
        return self.replay()

    def _eager(self, kind: Hashable) -> dict:
        if self.device.type != "cuda":
            return self.step(kind)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            outputs = self.step(kind)
        current.wait_stream(side)
        return outputs
