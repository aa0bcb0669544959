#!/usr/bin/env bash
# Export the ITM and MLM heads of the large preset and check them at batch 1. Each large head is
# past 2 GB, so it is stored as model.onnx + model.onnx.data. Not run in CI (memory and time).
set -euo pipefail
out=${1:-btdeploy-out/large}
btdeploy export --model large --heads itm,mlm --out "$out"
btdeploy check "$out" --batch-sizes 1 --seq-lens 5,40 --report "$out/parity.json"
