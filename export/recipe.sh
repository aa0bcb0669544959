#!/usr/bin/env bash
# Every head of a preset or checkpoint (usage: recipe.sh MODEL [OUT]): export (with split
# towers), optimize in both flavours, quantize (fp16 and int8 in both flavours, dynamic int8 for
# ONNX Runtime), and check every graph against PyTorch at its precision's tolerances. On a
# machine with a GPU and TensorRT, also build and check the engines. Calibration: pass CALIB_IMAGES=DIR CALIB_TEXTS=FILE for real data.
set -euo pipefail
model=${1:?usage: recipe.sh MODEL [OUT], MODEL a preset (tiny, base) or checkpoint folder}
out=${2:-btdeploy-out/$(basename "$model")}
calib=()
if [[ -n "${CALIB_IMAGES:-}" ]]; then calib=(--calib-images "$CALIB_IMAGES" --calib-texts "$CALIB_TEXTS"); fi
btdeploy export --model "$model" --heads all --split --out "$out"
btdeploy check "$out" --batch-sizes 1,3 --seq-lens 5,40 --report "$out/parity.plain.json"
btdeploy check "$out" --split --batch-sizes 1,3 --seq-lens 5,40 --report "$out/parity.split.json"
# Both flavours first: fp16 and int8 of the ort flavour start from the trt graph.
for flavour in ort trt; do
  btdeploy optimize "$out" --flavour "$flavour"
  btdeploy check "$out" --flavour "$flavour" --batch-sizes 1,3 --seq-lens 5,40 --report "$out/parity.$flavour.json"
done
for flavour in ort trt; do
  for precision in fp16 int8; do
    btdeploy quantize "$out" --flavour "$flavour" --precision "$precision" "${calib[@]}"
    btdeploy check "$out" --flavour "$flavour" --precision "$precision" --report "$out/parity.$flavour.$precision.json"
  done
done
btdeploy quantize "$out" --flavour ort --precision int8-dynamic
btdeploy check "$out" --flavour ort --precision int8-dynamic --report "$out/parity.ort.int8-dynamic.json"
if btdeploy doctor | grep -q "TensorRT build and run: yes"; then
  for precision in fp16 int8; do
    btdeploy build "$out" --precision "$precision" --timing-cache "$out/timing.cache"
    btdeploy check "$out" --backend tensorrt --precision "$precision" --report "$out/parity.tensorrt.$precision.json"
  done
fi
