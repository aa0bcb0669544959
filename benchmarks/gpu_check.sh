#!/usr/bin/env bash
# The GPU check, ready for any machine with an NVIDIA GPU, from a fresh clone or a bare checkout.
#
# 1. What the machine is (CPU and its instruction sets, GPU, driver, packages): doctor.txt.
# 2. Stage torch, what needs only PyTorch on the GPU: the reference model in fp32, fp16 and bf16 on
#    the GPU checked against the CPU reference (tiny, every head; base itm), and a bench of base itm
#    on the GPU (PyTorch eager fp32, fp16, bf16, and torch.compile fp16).
# 3. Stage ort-cuda, what needs ONNX Runtime's CUDA provider (onnxruntime-gpu built for the
#    machine's CUDA): the plain, fused (ort) and standard-ONNX (trt) graphs of base itm in FP32 and
#    FP16 checked on it (tiny, every head, in pytest), what TF32 would cost the FP32 graph, `pytest -m gpu`'s
#    CUDA-provider tests, and a bench of base itm on it against PyTorch fp16.
# 4. Stage tensorrt: tiny and base itm graphs quantized to fp16 and int8, engines built from the
#    newest graph dialect the installed TensorRT parses and checked, `pytest -m gpu`, and a bench of
#    TensorRT with and without CUDA graphs against PyTorch fp16.
#
# Everything goes to the results folder. btdeploy runs as `python -m btdeploy`, so a checkout on
# PYTHONPATH is enough where nothing can be installed. Without a GPU it stops after step 1 (exit 3);
# a stage that cannot run here (no CUDA provider, no TensorRT, and pip cannot install them) is
# skipped with one line saying why, and the script exits 3 if any was.
#
# usage: bash benchmarks/gpu_check.sh [RESULTS] [STAGES]
#        RESULTS default benchmarks/results/gpu-check; STAGES a comma list, default torch,ort-cuda,tensorrt
#        (ort-graphs: only the graphs ort-cuda checks, in BTDEPLOY_GPU_CHECK_WORK, to make them ahead)
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results/gpu-check}
stages=",${2:-torch,ort-cuda,tensorrt},"
for stage in ${stages//,/ }; do
  [[ ",torch,ort-graphs,ort-cuda,tensorrt," == *",$stage,"* ]] \
    || { echo "gpu-check: no stage $stage (stages: torch, ort-graphs, ort-cuda, tensorrt)"; exit 2; }
done
work=${BTDEPLOY_GPU_CHECK_WORK:-$(mktemp -d)}
python=${PYTHON:-python3}
mkdir -p "$results"
log="$results/steps.log"
: > "$log"
skipped=0
step() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$log"; }
stop() { printf 'gpu-check: stopped at "%s": %s\n' "$1" "$2" | tee -a "$log"; exit 3; }
skip() { printf 'gpu-check: stage %s skipped: %s\n' "$1" "$2" | tee -a "$log"; skipped=1; }
wanted() { [[ $stages == *",$1,"* ]]; }
btdeploy() { "$python" -m btdeploy "$@"; }
# One parity check: its whole output to NAME.txt and its rows to NAME.json; a failed check is
# recorded (exit 1: parity failed, 2: it could not run) and the next step still runs.
check() {
  local name=$1 status=0
  shift
  btdeploy check "$@" --report "$results/$name.json" > "$results/$name.txt" 2>&1 || status=$?
  step "  $name: exit $status, $(tail -1 "$results/$name.txt")"
}
# tiny (every head) and base (itm) exported once, for whichever stage needs them first.
exported() {
  [ -d "$work/$1" ] && return
  if [ "$1" = tiny ]; then
    btdeploy export --model tiny --out "$work/tiny" >> "$log" 2>&1
  else
    btdeploy export --model base --heads itm --out "$work/base" >> "$log" 2>&1
  fi
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

stage_torch() {
  step "tiny, every head: export, then the reference on the GPU (fp32, fp16, bf16) against the CPU reference"
  exported tiny
  for precision in fp32 fp16 bf16; do
    check "parity.tiny.torch-cuda.$precision" "$work/tiny" --backend torch --device cuda --precision "$precision"
  done

  step "base itm: export, then the reference on the GPU (fp16, bf16) against the CPU reference"
  exported base
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
}

# The base graphs stage ort-cuda checks, made once in the work folder; needs no GPU, so it can run
# alone (stage ort-graphs) ahead of the rest.
stage_ort_graphs() {
  if [ -f "$work/ort-graphs.done" ]; then
    step "base itm's graphs for the CUDA provider: made earlier in $work"
    return
  fi
  step "base itm: optimize ort and trt, quantize each to fp16 (ort's fp16 starts from the trt graph)"
  exported base
  local flavour
  for flavour in ort trt; do
    btdeploy optimize "$work/base" --flavour "$flavour" >> "$log" 2>&1
  done
  for flavour in ort trt; do
    btdeploy quantize "$work/base" --flavour "$flavour" --precision fp16 >> "$log" 2>&1
  done
  touch "$work/ort-graphs.done"
}

stage_ort_cuda() {
  step "does ONNX Runtime start its CUDA provider?"
  local problem
  problem=$("$python" -c "from btdeploy.backends.provider_probe import start_problem as p; print(p('CUDAExecutionProvider') or '')")
  if [ -n "$problem" ]; then
    skip ort-cuda "$problem (onnxruntime-gpu built for this machine's CUDA is needed)"
    return
  fi
  stage_ort_graphs

  # tiny, every head, is checked by pytest -m gpu below (tests/backends/test_onnxruntime_cuda_gpu.py).
  step "base itm on ONNX Runtime's CUDA provider, FP32 and FP16 graphs"
  local shapes=(--batch-sizes 1,8 --seq-lens 16,40) graph
  check "parity.base.itm.ort-cuda.export.fp32" "$work/base" --providers cuda cpu "${shapes[@]}"
  for graph in ort.fp32 ort.fp16 trt.fp32 trt.fp16; do
    check "parity.base.itm.ort-cuda.$graph" "$work/base" --providers cuda cpu "${shapes[@]}" \
      --flavour "${graph%.*}" --precision "${graph#*.}"
  done

  step "what TF32 would cost base itm's FP32 graph on the CUDA provider"
  "$python" benchmarks/ort_cuda_tf32.py "$work/base/itm" --shapes 1x40,32x40 --iters 10 2>&1 | tee "$results/tf32.txt" \
    || step "  ort_cuda_tf32.py failed (exit $?)"

  step "bench base itm on the GPU: ONNX Runtime's CUDA provider against PyTorch fp16"
  btdeploy bench "$work/base" --heads itm --device cuda --batch-sizes 1,8,32 --seq-lens 40 --iters 10 --build-once \
    --variants torch-eager-fp16,ort,ort-fused,trt-graph,ort-fp16 --out "$results/bench-ort-cuda" >> "$log" 2>&1 \
    || step "  bench failed (exit $?): see $log"
  cat "$results/bench-ort-cuda/results.md" 2>/dev/null | tee -a "$log" || true

  step "pytest -m gpu: the CUDA provider's tests"
  "$python" -m pytest -m gpu -q -ra tests/backends/test_onnxruntime_cuda_gpu.py 2>&1 | tee "$results/pytest-gpu-ort-cuda.txt" \
    || step "  pytest -m gpu failed (exit $?)"
}

stage_tensorrt() {
  # The engines are built from Model Optimizer's fp16 and int8 graphs: both must import.
  step "are TensorRT and Model Optimizer installed (else install the tensorrt extra)?"
  if ! "$python" -c "import tensorrt, modelopt.onnx" 2>/dev/null \
    && ! "$python" -m pip install -q -e ".[dev,tensorrt]" >> "$log" 2>&1; then
    "$python" -m pytest -m gpu -q -ra tests/backends/test_tensorrt_gpu.py > "$results/pytest-gpu.txt" 2>&1 || true
    skip tensorrt "TensorRT or Model Optimizer is not installed and pip could not install them (see $log); \
pytest -m gpu's skip reasons are in $results/pytest-gpu.txt"
    return
  fi
  exported tiny
  exported base
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

  step "pytest -m gpu: the TensorRT tests"  # named: collecting every test file needs the serve extra too
  "$python" -m pytest -m gpu -q -ra tests/backends/test_tensorrt_gpu.py 2>&1 | tee "$results/pytest-gpu.txt" \
    || step "  pytest -m gpu failed (exit $?)"

  step "bench base itm on the GPU: TensorRT with and without CUDA graphs against PyTorch fp16"
  btdeploy bench "$work/base" --heads itm --device cuda --batch-sizes 1,8 --seq-lens 16,40 --iters 20 \
    --variants torch-eager-fp16,trt-fp16,trt-fp16-cudagraph,trt-int8,trt-int8-cudagraph --out "$results/bench" \
    | tee -a "$log"
}

for stage in torch ort-graphs ort-cuda tensorrt; do
  wanted "$stage" && "stage_${stage//-/_}"
done
step "done: $results"
[ "$skipped" = 0 ] || exit 3
