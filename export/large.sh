#!/usr/bin/env bash
# The ITM and MLM heads of the large preset through `btdeploy pipeline`, FP32 graphs only. Each
# large head is past 2 GB, so it is stored as model.onnx + model.onnx.data. Not run in CI
# (memory and time).
set -euo pipefail
out=${1:-btdeploy-out/large}
exec btdeploy pipeline --model large --heads itm,mlm --precisions none --out "$out"
