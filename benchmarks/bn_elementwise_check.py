"""The fused elementwise parts of BatchNorm's derivatives (gradinv.engine.bn_elementwise, Triton) against
the composed aten operations they replace, on CUDA: same results, and time per step.

    python -m benchmarks.bn_elementwise_check        # a CUDA GPU with Triton; torch and torchvision only (~20 s)

For each BatchNorm layer of ResNet-50 at 224 px, its tensors as the layer's double backward sees
them at bs 8 with 8 vmapped seeds (the seeds folded into the channels: (8, 8·C, H, W)): the
largest difference between the kernels' outputs and the composed operations' (float32; relative,
in units of 1 + |value|), and the median time of each over repeated calls (CUDA events), for the
double backward's two outputs (5 passes fused, 13 composed) and the input gradient with the BN
prior's statistics (3 passes fused, 5 composed). Per step: the sum over the 53 layers, and the
bandwidth each reaches on the bytes it moves. Writes benchmarks/results/bn_elementwise-cuda.json; exit 1 when the results differ
by more than float32 rounding, 2 without a CUDA GPU or Triton."""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch
import torchvision

from benchmarks.common import RESULTS, argument_parser, command, machine, write_result
from gradinv.engine.bn_elementwise import first_order_terms_composed, output_type, second_order_terms_composed

BATCH, SEEDS, REPEATS = 8, 8, 20
TOLERANCE = 1e-5  # float32, another order of rounding: measured on the CPU through Triton's interpreter: up to 7e-7


def layer_shapes() -> Counter:
    """(N, G·C, H, W) of every BatchNorm layer's input in ResNet-50 at 224 px, counted."""
    model, shapes = torchvision.models.resnet50(), Counter()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda _m, args, _out: shapes.update([tuple(args[0].shape)]))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224))
    return Counter({(BATCH, SEEDS * c, h, w): n for (_, c, h, w), n in shapes.items()})


def median_ms(fn) -> float:
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("bn_elementwise_check", __doc__)
    parser.add_argument("--out", default=str(RESULTS / "bn_elementwise-cuda.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bn_elementwise_check needs a CUDA GPU: the kernel it checks is Triton's, compiled for one.")
        return 2
    try:
        from gradinv.engine.experimental.bn_elementwise_triton import (first_order_terms_triton,
                                                                       second_order_terms_triton)
    except ImportError as error:
        print(f"bn_elementwise_check needs Triton ({error}).")
        return 2
    generator = torch.Generator("cuda").manual_seed(0)
    rows, worst = [], 0.0
    for shape, layers in sorted(layer_shapes().items()):
        u, x, g = (torch.randn(shape, device="cuda", generator=generator) for _ in range(3))
        c = torch.randn(7, shape[1], device="cuda", generator=generator)
        dtype = output_type(u, x, g, c)
        expected = (*second_order_terms_composed(u, x, g, c), first_order_terms_composed(x, g, c[:3]))
        got = (*second_order_terms_triton(u, x, g, c, dtype), first_order_terms_triton(x, g, c[:3], dtype))
        difference = max(((o - e).abs() / (e.abs() + 1)).max().item() for o, e in zip(got, expected))
        worst = max(worst, difference)
        rows.append({"shape": list(shape), "layers": layers, "max_rel_difference": difference,
                     "second_order_fused_ms": median_ms(lambda: second_order_terms_triton(u, x, g, c, dtype)),
                     "second_order_composed_ms": median_ms(lambda: second_order_terms_composed(u, x, g, c)),
                     "first_order_fused_ms": median_ms(lambda: first_order_terms_triton(x, g, c[:3], dtype)),
                     "first_order_composed_ms": median_ms(lambda: first_order_terms_composed(x, g, c[:3])),
                     "bytes_per_pass": x.numel() * x.element_size()})
        del u, x, g, expected, got
    passes = {"second_order_fused": 5, "second_order_composed": 13, "first_order_fused": 3, "first_order_composed": 5}
    per_step = {name: sum(r[f"{name}_ms"] * r["layers"] for r in rows) for name in passes}
    moved = {name: sum(r["bytes_per_pass"] * r["layers"] for r in rows) * passes[name] for name in passes}
    result = {"machine": machine(torch.device("cuda")), "command": command("bn_elementwise_check", sys.argv[1:] if argv is None else argv),
              "batch": BATCH, "seeds": SEEDS, "rows": rows, "max_rel_difference": worst,
              "per_step_ms": per_step, "per_step_bytes": moved,
              "bandwidth_bytes_per_s": {name: moved[name] / (per_step[name] / 1e3) for name in passes}}
    write_result(args.out, result)
    print(json.dumps({k: result[k] for k in ("max_rel_difference", "per_step_ms", "bandwidth_bytes_per_s")}))
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
