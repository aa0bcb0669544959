#!/usr/bin/env bash
# The GPU check, ready for any machine with an NVIDIA GPU, from a fresh clone or a bare checkout.
#
# 1. What the machine is (CPU and its instruction sets, GPU, driver, packages): doctor.txt.
# 2. What needs only PyTorch on the GPU: the reference model in fp32, fp16 and bf16 on the GPU
#    checked against the CPU reference (tiny, every head; base itm), and a bench of base itm on
#    the GPU (PyTorch eager fp32, fp16, bf16, and torch.compile fp32).
# 3. What needs TensorRT: tiny and base itm graphs quantized to fp16 and int8, engines built from
#    the newest graph dialect the installed TensorRT parses and checked, `pytest -m gpu`, and a
#    bench of TensorRT with and without CUDA graphs against PyTorch fp16.
#
# Everything goes to the results folder. btdeploy runs as `python -m btdeploy`, so a checkout on
# PYTHONPATH is enough where nothing can be installed. It stops at the first step that cannot run
# here with one line saying why (exit 3): without a GPU after step 1, without TensorRT (not
# installed, and pip cannot install it) after step 2.
#
# usage: bash benchmarks/gpu_check.sh [RESULTS]      (default: benchmarks/results/gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results/gpu-check}
work=${BTDEPLOY_GPU_CHECK_WORK:-$(mktemp -d)}
python=${PYTHON:-python3}
mkdir -p "$results"
log="$results/steps.log"
: > "$log"
step() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$log"; }
stop() { printf 'gpu-check: stopped at "%s": %s\n' "$1" "$2" | tee -a "$log"; exit 3; }
gpu_tests=tests/backends/test_tensorrt_gpu.py  # named: collecting every test file needs the serve extra too
btdeploy() { "$python" -m btdeploy "$@"; }
# One parity check: its whole output to NAME.txt and its rows to NAME.json; a failed check is
# recorded (exit 1: parity failed, 2: it could not run) and the next step still runs.
check() {
  local name=$1 status=0
  shift
  btdeploy check "$@" --report "$results/$name.json" > "$results/$name.txt" 2>&1 || status=$?
  step "  $name: exit $status, $(tail -1 "$results/$name.txt")"
}

# From the repository root `import btdeploy` finds the checkout anyway: its dependencies say whether it can run.
step "btdeploy and its dependencies importable (else install it with the dev extra)"
"$python" -c "import btdeploy.cli, torch, transformers, onnx, onnxruntime, PIL" 2>/dev/null \
  || "$python" -m pip install -q -e ".[dev]" >> "$log" 2>&1 \
  || stop "install btdeploy" "btdeploy or a dependency is not importable and pip could not install them (see $log)"

step "what this machine is: btdeploy doctor (CPU and instruction sets, GPU, driver, packages)"
{ date -u; uname -srm; btdeploy doctor; } > "$results/doctor.txt" 2>&1
cat "$results/doctor.txt" >> "$log"

step "is there an NVIDIA GPU?"
"$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || stop "is there an NVIDIA GPU?" "no NVIDIA GPU visible to torch (torch.cuda.is_available() is False)"

step "tiny, every head: export, then the reference on the GPU (fp32, fp16, bf16) against the CPU reference"
btdeploy export --model tiny --out "$work/tiny" >> "$log" 2>&1
for precision in fp32 fp16 bf16; do
  check "parity.tiny.torch-cuda.$precision" "$work/tiny" --backend torch --device cuda --precision "$precision"
done

step "base itm: export, then the reference on the GPU (fp16, bf16) against the CPU reference"
btdeploy export --model base --heads itm --out "$work/base" >> "$log" 2>&1
for precision in fp16 bf16; do
  check "parity.base.itm.torch-cuda.$precision" "$work/base" --backend torch --device cuda --precision "$precision" \
    --batch-sizes 1,8 --seq-lens 16,40
done

# torch.compile in fp32 was measured on the first H200 (benchmarks/results/gpu-check/bench-torch-compile);
# fp16 is TensorRT fp16's natural peer.
step "bench base itm on the GPU: PyTorch eager fp32, fp16, bf16 and torch.compile fp16"
btdeploy bench "$work/base" --heads itm --device cuda --batch-sizes 1,8,32 --seq-lens 16,40 --iters 30 --build-once \
  --variants torch-eager,torch-eager-fp16,torch-eager-bf16,torch-compile-fp16 --out "$results/bench-torch" >> "$log" 2>&1
cat "$results/bench-torch/results.md" 2>/dev/null | tee -a "$log" || true

# The engines are built from Model Optimizer's fp16 and int8 graphs: both must import.
step "are TensorRT and Model Optimizer installed (else install the tensorrt extra)?"
"$python" -c "import tensorrt, modelopt.onnx" 2>/dev/null || "$python" -m pip install -q -e ".[dev,tensorrt]" >> "$log" 2>&1 \
  || { "$python" -m pytest -m gpu -q -ra "$gpu_tests" > "$results/pytest-gpu.txt" 2>&1 || true
       stop "install the tensorrt extra" "TensorRT or Model Optimizer is not installed and pip could not install them (see $log); \
every step before this one ran, and pytest -m gpu's skip reasons are in $results/pytest-gpu.txt"; }
btdeploy doctor "$work/tiny" > "$results/doctor.tensorrt.txt"  # now with TensorRT, and the Polygraphy commands

step "tiny and base itm: optimize trt and trt-compat, quantize fp16 and int8"
for model in tiny base; do
  for flavour in trt trt-compat; do
    btdeploy optimize "$work/$model" --heads itm --flavour "$flavour" >> "$log" 2>&1
    for precision in fp16 int8; do
      btdeploy quantize "$work/$model" --heads itm --flavour "$flavour" --precision "$precision" >> "$log" 2>&1
    done
  done
done

for model in tiny base; do
  for precision in fp16 int8; do
    step "build and check the $model itm $precision engine"
    btdeploy build "$work/$model" --heads itm --precision "$precision" --timing-cache "$work/timing.cache" >> "$log" 2>&1
    check "parity.$model.itm.tensorrt.$precision" "$work/$model" --heads itm --backend tensorrt --precision "$precision"
  done
done

step "pytest -m gpu"
"$python" -m pytest -m gpu -q -ra "$gpu_tests" 2>&1 | tee "$results/pytest-gpu.txt"

step "bench base itm on the GPU: TensorRT with and without CUDA graphs against PyTorch fp16"
btdeploy bench "$work/base" --heads itm --device cuda --batch-sizes 1,8 --seq-lens 16,40 --iters 20 \
  --variants torch-eager-fp16,trt-fp16,trt-fp16-cudagraph,trt-int8,trt-int8-cudagraph --out "$results/bench" \
  | tee -a "$log"
step "done: $results"
