#!/usr/bin/env bash
# The GPU measurements the speed work still lacks, the most needed first, each under its own
# time limit (about 10 minutes in all on an H100), so that a short GPU lease brings back what it can.
#
#     OUT=/some/folder bash benchmarks/gpu_lease.sh     # from the repository root; default: benchmarks/results
#
# BUDGET (seconds, default 560) caps the whole: a step gets at most what is left of it and is
# skipped with under 30 s left, so that one command of a lease that allows 10 minutes ends in
# time. Needs torch and torchvision only. Each benchmark writes its own results file as it goes;
# one that fails or runs out of time costs only its own figures. Afterwards, on any machine, with
# the results files in benchmarks/results: `python -m benchmarks.write_docs` (docs/performance.md
# lists what is still missing).
set -u
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # as given from where the script was started
cd "$(dirname "$0")/.."    # python -m benchmarks.<name> runs from the repository root
python="${PYTHON:-$(command -v python || command -v python3)}"  # a machine may have only python3
budget="${BUDGET:-560}"
started=$SECONDS
run() {  # seconds, then the benchmark's module name and its arguments
    local limit=$1 left=$((budget - (SECONDS - started)))
    shift
    if [ "$left" -lt 30 ]; then
        echo "== skipped (${left} s of the budget left): $*"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $* (at most ${limit} s)"
    timeout "$limit" "$python" -m "$@" || echo "== exit $? from: $*"
}
# BatchNorm's elementwise derivatives in Triton kernels: the same results on CUDA as composed, and their time
run 60 benchmarks.bn_elementwise_check --out "$out/bn_elementwise-cuda.json"
# the default step at the paper preset beside its candidates (cuda_graph_check.py's PRESET_CANDIDATES):
# engine.bn_double_backward explicit-fused, engine.conv_double_backward explicit-grouped and
# explicit, half precision, cuDNN's autotuner
run 360 benchmarks.cuda_graph_check --skip-check --focus --out "$out/cuda_graph-focus.json"
# float16's effect on the reconstruction (bfloat16's was measured on a CPU)
run 200 benchmarks.tf32_quality --iterations 400 --settings "tf32, seeds batched" "float16, seeds batched" \
    --out "$out/precision_quality-cuda.json"
# which kernels the step spends its time in with the convolutions that copy no activations between layouts
run 75 benchmarks.step_profile --conv-double-backward explicit-grouped --out "$out/step_profile-cuda-grouped-conv.json"
