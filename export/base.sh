#!/usr/bin/env bash
# Export every head of the base preset and check it against PyTorch.
set -euo pipefail
out=${1:-btdeploy-out/base}
btdeploy export --model base --heads all --out "$out"
btdeploy check "$out" --batch-sizes 1,3 --seq-lens 5,40 --report "$out/parity.json"
