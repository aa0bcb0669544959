#!/usr/bin/env bash
# Export every head of the tiny preset and check it against PyTorch.
set -euo pipefail
out=${1:-btdeploy-out/tiny}
btdeploy export --model tiny --heads all --out "$out"
btdeploy check "$out" --batch-sizes 1,3 --seq-lens 5,40 --report "$out/parity.json"
