#!/usr/bin/env bash
# Export every head of the base preset, optimize it in both flavours, and check every graph against PyTorch.
set -euo pipefail
out=${1:-btdeploy-out/base}
btdeploy export --model base --heads all --out "$out"
btdeploy check "$out" --batch-sizes 1,3 --seq-lens 5,40 --report "$out/parity.plain.json"
for flavour in ort trt; do
  btdeploy optimize "$out" --flavour "$flavour"
  btdeploy check "$out" --flavour "$flavour" --batch-sizes 1,3 --seq-lens 5,40 --report "$out/parity.$flavour.json"
done
