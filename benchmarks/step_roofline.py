"""The physical limit of the inversion step: what one step must move and compute, and how fast a GPU could do it.

    python -m benchmarks.step_roofline           # on any machine (counts on the CPU, a few minutes)

Runs the engine's step (gradinv.engine.seed_step: the seeds batched as `engine.cuda_graph` runs them;
forward, parameter gradients with create_graph, objective, gradient to the images, Adam, pixel
box) once for ResNet-50 at 224 px, with either BatchNorm double backward
(`engine.bn_double_backward`: pytorch, explicit), and counts every aten operation that moves data: bytes read and
written (views and bare allocations excluded, an out= argument counted as written only, a tensor
taken for its shape only, such as a convolution backward's weight where it computes no input
gradient, not counted, nor a gradient batch norm's backward is not asked for, which fake tensors
hold all the same; a broadcast input counted at its stored size) and FLOPs
(torch.utils.flop_counter's formulas). The operations and their sizes do not depend on the
device, so the count runs on the CPU, on fake tensors (shapes only: benchmarks.common.fake_step),
which lets it count bs 8 G 8 (64 images) in seconds and no memory.

From the counts, for a GPU with memory bandwidth BW and TF32 rate P (nominal):
    bound = Σ over operations of max(bytes / BW, FLOPs / P)
the step as written cannot run faster, even with every kernel at the device's limit and no
launch cost (except where the L2 cache serves an operation: the results say how many bytes
belong to operations small enough for that); the rest of a measured time is what the kernels
leave unused (small kernels, launch gaps). It counts bs 8 G 8 once more under
`engine.precision` bfloat16 and float16 (autocast as a CPU applies it: convolutions and
matrix products in the half type, their outputs and what follows them stored in it; the bound
then takes the half type's tensor-core rate), with `engine.conv_double_backward`
explicit-grouped and explicit (the convolutions' double backward written out,
gradinv/engine/experimental/convolution.py; in float32 and float16), and with
`engine.bn_double_backward: explicit-fused` (BatchNorm's elementwise derivatives in one kernel
each, gradinv.engine.bn_elementwise: each counted as one operation that reads its inputs and
writes its outputs once, as its Triton kernel does on CUDA; with either convolution double
backward, in float32 and float16). Writes benchmarks/results/step_roofline.json.
"""

from __future__ import annotations

import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from benchmarks.common import RESULTS, argument_parser, command, fake_step, machine, write_result

# Nominal: HBM bandwidth (bytes/s) and dense TF32 tensor-core rate (FLOP/s), SXM parts.
GPUS = {"H100": {"bandwidth": 3.35e12, "tf32": 495e12, "half": 989e12},
        "H200": {"bandwidth": 4.8e12, "tf32": 495e12, "half": 989e12}}
L2_BYTES = 50 * 2**20  # the H100's L2: operations moving less in all could be served from it
COUNTED = [(1, 1), (8, 1), (8, 8), (48, 1)]  # (bs, G): bs 8 G 8 is the paper preset
BN_DOUBLE_BACKWARDS = ("pytorch", "explicit")  # engine.bn_double_backward
HALF_PRECISIONS = ("bfloat16", "float16")  # engine.precision, counted at bs 8 G 8 with the explicit BN (auto's choice)
PAPER_ITERATIONS = 20_000


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor as memory holds it (an expanded view reads its storage once)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def operation_flops(func, args, kwargs, out) -> int:
    """torch.utils.flop_counter's formula, except that a grouped convolution's weight gradient is
    counted per group (the formula ignores groups there; vmap over seeds makes every convolution
    whose weight differs per seed a grouped one)."""
    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0
    if func._overloadpacket is torch.ops.aten.convolution_backward:
        front, groups, mask, rest = args[:9], args[9], args[10], args[11:]
        if groups > 1 and mask[1]:
            grad_input = formula(*front, groups, [mask[0], False, mask[2]], *rest, **kwargs, out_val=out)
            grad_weight = formula(*front, groups, [False, True, False], *rest, **kwargs, out_val=out)
            return grad_input + grad_weight // groups
    return formula(*args, **kwargs, out_val=out)


# Operations that allocate memory without writing it, or give a tensor other memory's place (set_).
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_"}
# Operations that fill memory of their own, reading no tensor argument (only its shape or type).
FILLS = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like"}


def unread(func, args) -> list[torch.Tensor]:
    """The tensor arguments an operation takes for their shape only: a fill's, and a convolution
    backward's input where it computes no weight gradient and its weight where it computes no
    input gradient."""
    name = func._overloadpacket.__name__
    if name in FILLS:
        return [a for a in args if isinstance(a, torch.Tensor)]
    if name == "convolution_backward":
        _, x, weight, *_, mask = args
        return ([] if mask[1] else [x]) + ([] if mask[0] else [weight])
    return []


def not_produced(func, args, out) -> list[torch.Tensor]:
    """Outputs the kernel does not compute that fake tensors still hold: batch norm's backward
    computes only the gradients its output mask asks for, but its meta function (which fake
    tensors run) returns all three."""
    if func._overloadpacket is torch.ops.aten.native_batch_norm_backward:
        return [o for o, wanted in zip(out, args[9]) if not wanted and o is not None]
    return []


def written_only(func, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an out= overload writes its results into: written, not read."""
    if func._overloadname != "out":
        return []
    return [kwargs[a.name] for a in func._schema.arguments
            if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write and a.name in kwargs]


class TrafficCount(TorchDispatchMode):
    """Per aten operation that moves data: bytes in + out and FLOPs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket.__name__ in ALLOCATIONS:
            return out
        not_read = {id(t) for t in written_only(func, kwargs) + unread(func, args)}
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        phantoms = {id(o) for o in not_produced(func, args, out)}
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and id(o) not in phantoms]
        writes = any(r.alias_info is not None and r.alias_info.is_write for r in func._schema.returns)
        storages = {a.untyped_storage()._cdata for a in inputs}
        aliases_only = all(o.untyped_storage()._cdata in storages for o in outputs)
        inputs = [a for a in inputs if id(a) not in not_read]
        if outputs and (writes or not aliases_only):
            flops = operation_flops(func, args, kwargs, out)
            moved = sum(stored_bytes(t) for t in inputs) + sum(stored_bytes(t) for t in outputs)
            self.ops.append((str(func._overloadpacket.__name__), moved, flops))
        return out


def count_step(batch: int, seeds: int, bn_double_backward: str, precision: str = "float32",
               conv_double_backward: str = "pytorch") -> dict:
    """The counts of the engine's second step (the first creates Adam's state)."""
    with (fake_step(batch, seeds, bn_double_backward, precision=precision,
                    conv_double_backward=conv_double_backward) as (step, _), TrafficCount() as counter):
        step.step(False, None)
    return {"batch": batch, "seeds": seeds, "ops": len(counter.ops), "bytes": sum(b for _, b, _ in counter.ops),
            "flops": sum(f for _, _, f in counter.ops), "per_op": counter.ops}


def bound_seconds(ops: list[tuple[str, int, int]], gpu: dict, rate: str = "tf32") -> float:
    """Σ max(bytes / BW, FLOPs / P) over the operations, P the device's `rate`."""
    return sum(max(moved / gpu["bandwidth"], flops / gpu[rate]) for _, moved, flops in ops)


def paper_preset_row(precision: str, **modes: str) -> dict:
    """A variant (bn_double_backward, conv_double_backward) counted at bs 8 G 8, with its paper-preset
    bounds at the precision's rate (TF32 for float32, the half types' own rate otherwise)."""
    c = count_step(8, 8, precision=precision, **modes)
    rate = "tf32" if precision == "float32" else "half"
    row = {**modes, "precision": precision, "batch": 8, "seeds": 8, "ops": c["ops"], "bytes": c["bytes"],
           "flops": c["flops"],
           **{f"paper_minutes_{name}": bound_seconds(c["per_op"], gpu, rate) * PAPER_ITERATIONS / 60
              for name, gpu in GPUS.items()}}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("step_roofline", __doc__)
    parser.add_argument("--out", default=str(RESULTS / "step_roofline.json"))
    args = parser.parse_args(argv)
    rows, heaviest = [], {}
    for mode, (batch, seeds) in ((m, config) for m in BN_DOUBLE_BACKWARDS for config in COUNTED):
        c = count_step(batch, seeds, mode)
        row = {"bn_double_backward": mode, "batch": batch, "seeds": seeds, "ops": c["ops"], "bytes": c["bytes"],
               "flops": c["flops"],
               "bytes_of_ops_under_l2": sum(moved for _, moved, _ in c["per_op"] if moved < L2_BYTES),
               **{f"bound_s_{name}": bound_seconds(c["per_op"], gpu) for name, gpu in GPUS.items()}}
        if (batch, seeds) == (8, 8):
            row.update({f"paper_minutes_{name}": row[f"bound_s_{name}"] * PAPER_ITERATIONS / 60 for name in GPUS})
            large = [op for op in c["per_op"] if op[1] >= L2_BYTES]
            row["paper_minutes_H100_large_ops_only"] = bound_seconds(large, GPUS["H100"]) * PAPER_ITERATIONS / 60
            for name, moved, flops in c["per_op"]:
                entry = heaviest.setdefault(mode, {}).setdefault(name, [0, 0, 0])
                entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + moved, entry[2] + flops
        rows.append(row)
        print(json.dumps(row), flush=True)
    half_rows = [paper_preset_row(precision, bn_double_backward="explicit") for precision in HALF_PRECISIONS]
    explicit_conv_rows = [paper_preset_row(precision, conv_double_backward=conv, bn_double_backward="explicit")
                          for conv in ("explicit-grouped", "explicit") for precision in ("float32", "float16")]
    fused_bn_rows = [paper_preset_row(precision, bn_double_backward="explicit-fused", conv_double_backward=conv)
                     for conv in ("explicit-grouped", "pytorch") for precision in ("float32", "float16")]
    h100 = GPUS["H100"]
    top = {mode: sorted(ops.items(), key=lambda kv: -max(kv[1][1] / h100["bandwidth"], kv[1][2] / h100["tf32"]))
           for mode, ops in heaviest.items()}
    result = {"machine": machine(torch.device("cpu")), "command": command("step_roofline", sys.argv[1:] if argv is None else argv),
              "gpus": GPUS, "rows": rows, "half_precision_rows": half_rows, "explicit_conv_rows": explicit_conv_rows,
              "fused_bn_rows": fused_bn_rows,
              "top_ops_bs8_g8": {mode: [{"op": n, "calls": c, "bytes": b, "flops": f} for n, (c, b, f) in ops[:12]]
                                 for mode, ops in top.items()}}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
