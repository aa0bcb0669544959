#!/usr/bin/env bash
# The GPU check, ready for the first machine with an NVIDIA GPU: from a fresh clone, in about
# 10 minutes, it prepares tiny and base itm graphs, installs TensorRT, builds fp16 and int8
# engines (from the newest graph dialect the installed TensorRT parses), runs `pytest -m gpu`,
# benches TensorRT with and without CUDA graphs against PyTorch fp16 on the GPU, and writes
# everything to a results folder. On a machine without a GPU it runs the steps that need none
# and stops at the first that needs one, with one line saying so (exit 3).
#
# usage: bash benchmarks/gpu_check.sh [RESULTS]      (default: benchmarks/results/gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results/gpu-check}
work=${BTDEPLOY_GPU_CHECK_WORK:-$(mktemp -d)}
mkdir -p "$results"
log="$results/steps.log"
: > "$log"
step() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$log"; }
stop() { printf 'gpu-check: stopped at "%s": %s\n' "$1" "$2" | tee -a "$log"; exit 3; }

step "install btdeploy (dev extra)"
pip install -q -e ".[dev]" >> "$log" 2>&1

step "tiny itm: export, optimize every flavour, quantize fp16 and int8 in the TensorRT flavours (CPU)"
btdeploy export --model tiny --heads itm --out "$work/tiny" >> "$log" 2>&1
for flavour in ort trt trt-compat; do btdeploy optimize "$work/tiny" --flavour "$flavour" >> "$log" 2>&1; done
for flavour in trt trt-compat; do
  for precision in fp16 int8; do
    btdeploy quantize "$work/tiny" --flavour "$flavour" --precision "$precision" >> "$log" 2>&1
  done
done

step "is there an NVIDIA GPU?"
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || stop "is there an NVIDIA GPU?" "no NVIDIA GPU visible to torch (torch.cuda.is_available() is False); every step before this one ran"
nvidia-smi >> "$log" 2>&1 || true

step "install the tensorrt extra"
pip install -q -e ".[dev,tensorrt]" >> "$log" 2>&1 || stop "install the tensorrt extra" "pip could not install tensorrt (see $log)"
btdeploy doctor "$work/tiny" | tee "$results/doctor.txt"

step "base itm: export, optimize trt and trt-compat, quantize fp16 and int8"
btdeploy export --model base --heads itm --out "$work/base" >> "$log" 2>&1
for flavour in trt trt-compat; do
  btdeploy optimize "$work/base" --flavour "$flavour" >> "$log" 2>&1
  for precision in fp16 int8; do
    btdeploy quantize "$work/base" --flavour "$flavour" --precision "$precision" >> "$log" 2>&1
  done
done

for model in tiny base; do
  for precision in fp16 int8; do
    step "build and check the $model itm $precision engine"
    btdeploy build "$work/$model" --precision "$precision" --timing-cache "$work/timing.cache" >> "$log" 2>&1
    btdeploy check "$work/$model" --backend tensorrt --precision "$precision" \
      --report "$results/parity.$model.itm.tensorrt.$precision.json" | tee -a "$log"
  done
done

step "pytest -m gpu"
python -m pytest -m gpu -q -ra 2>&1 | tee "$results/pytest-gpu.txt"

step "bench base itm on the GPU: TensorRT with and without CUDA graphs against PyTorch fp16"
btdeploy bench "$work/base" --heads itm --device cuda --batch-sizes 1,8 --seq-lens 16,40 --iters 20 \
  --variants torch-eager-fp16,trt-fp16,trt-fp16-cudagraph,trt-int8,trt-int8-cudagraph --out "$results/bench" \
  | tee -a "$log"
step "done: $results"
