"""How much memory the inversion step holds at its peak, estimated on fake tensors, on any machine.

    python -m benchmarks.step_memory           # counts on the CPU, in about a minute

Builds the engine's step for ResNet-50 at 224 px as CUDA runs it by default (`engine.seed_batch: 0`:
chunks of gradinv.engine.policy.BATCHED_IMAGES images, seeds under vmap; `bn_double_backward: auto`,
both resolved by gradinv.engine.policy as for CUDA) on fake tensors (shapes only:
benchmarks.common.fake_step), and follows every
storage the step creates from the operation that makes it until it is freed: the peak of their
sum during one step, plus what stays (the attacker's models, the target gradient, the images,
Adam's state). Not counted: what a GPU adds beyond tensors (cuDNN's and cuBLAS's workspaces,
the allocator's rounding) and the set-up's own peak. A few configurations whose peak a GPU has
measured are estimated as well, set as they were measured, so that the two can be set side by
side (docs/performance.md), and a few with `engine.conv_double_backward: explicit-grouped`. Writes
benchmarks/results/step_memory.json.
"""

from __future__ import annotations

import json
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.common import RESULTS, argument_parser, command, fake_step, machine, write_result
from gradinv.engine.policy import explicit_bn_double_backward, plan_step
from gradinv.pipeline.config import build_section

CUDA = torch.device("cuda")  # the defaults are resolved as for CUDA; nothing runs there
DEFAULTS = [(1, 1), (1, 8), (8, 8), (48, 1), (48, 8)]  # (bs, G); bs 8 G 8 is the paper preset, bs 48 G 8 its largest batch
# (bs, G, bn_double_backward, seeds per vmapped chunk) as benchmarks/results/ recorded their measured peaks.
AS_MEASURED = [(8, 8, "pytorch", 8), (48, 8, "pytorch", 2), (48, 8, "pytorch", 4), (48, 4, "pytorch", 4), (48, 8, "explicit", 4)]
# (bs, G, seeds per vmapped chunk) with `engine.conv_double_backward: explicit-grouped`, a candidate for CUDA's
# default: the paper preset, and its largest batch as the defaults chunk it and with twice the seeds per chunk.
GROUPED_CONVOLUTIONS = [(8, 8, 8), (48, 8, 1), (48, 8, 2)]


class LiveStorage(TorchDispatchMode):
    """Bytes of the storages that operations create, while they live: `current` and its `peak`."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._follow(tensor.untyped_storage())
        return out

    def _follow(self, storage) -> None:
        key = id(storage)
        if key in self._alive:
            return
        size = storage.nbytes()

        def freed(_, key=key, size=size):
            self._alive.pop(key, None)
            self.current -= size

        self._alive[key] = weakref.ref(storage, freed)
        self.current += size
        self.peak = max(self.peak, self.current)


def real_bytes(objective) -> int:
    """What the objective holds in real tensors, made before the fake ones: the attacker's model and
    its functional copy, the target gradient, the BN targets (each storage once)."""
    model, _ = objective._functional_model()
    tensors = [*objective.model.parameters(), *objective.model.buffers(), *model.parameters(), *model.buffers(),
               *objective.target.values(), *(t for pair in objective.bn_targets.values() for t in pair)]
    return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}.values())


def estimate(batch: int, seeds: int, bn_double_backward: str, chunk: int, conv_double_backward: str = "pytorch") -> dict:
    """Peak bytes of one step (the second: the first creates Adam's state), and what stays between steps."""
    live = LiveStorage()
    with fake_step(batch, seeds, bn_double_backward, chunk=chunk, watch=live,
                   conv_double_backward=conv_double_backward) as (step, objective):
        held = live.current
        live.peak = held
        step.step(False, None)
    real = real_bytes(objective)
    return {"held_bytes": held + real, "peak_bytes": live.peak + real}


def defaults_on_cuda(batch: int, seeds: int) -> dict:
    """The BatchNorm double backward and seeds per vmapped chunk that the engine's defaults take on CUDA."""
    engine = build_section("engine", {"device": "cuda"})
    bn = "explicit" if explicit_bn_double_backward(engine, CUDA, seeds) else "pytorch"
    return {"bn_double_backward": bn, "seeds_per_chunk": plan_step(engine, seeds, batch, fedavg=False).seeds_per_call}


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("step_memory", __doc__)
    parser.add_argument("--out", default=str(RESULTS / "step_memory.json"))
    args = parser.parse_args(argv)
    rows = [{"settings": "defaults", "batch": batch, "seeds": seeds, **defaults_on_cuda(batch, seeds)}
            for batch, seeds in DEFAULTS]
    rows += [{"settings": "as measured", "batch": b, "seeds": g, "bn_double_backward": bn, "seeds_per_chunk": chunk}
             for b, g, bn, chunk in AS_MEASURED]
    rows += [{"settings": "conv_double_backward: explicit-grouped", "batch": b, "seeds": g, "bn_double_backward": "explicit",
              "seeds_per_chunk": chunk, "conv_double_backward": "explicit-grouped"} for b, g, chunk in GROUPED_CONVOLUTIONS]
    for row in rows:
        row.update(estimate(row["batch"], row["seeds"], row["bn_double_backward"], row["seeds_per_chunk"],
                            row.get("conv_double_backward", "pytorch")))
        print(json.dumps(row), flush=True)
    result = {"machine": machine(torch.device("cpu")), "command": command("step_memory", sys.argv[1:] if argv is None else argv),
              "rows": rows}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
