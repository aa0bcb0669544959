#!/usr/bin/env bash
# Every head of the large preset through `btdeploy pipeline`: every flavour and precision, checked
# against PyTorch. Each large head is past 2 GB, so its graphs are stored as model*.onnx plus
# .onnx.data. On 2-core, 24 GB machines a head took 11-21 min at a peak of 9.1-9.8 GB
# (benchmarks/results/large-pipeline). The split towers are left out: not measured at this size.
# Not run in CI (time).
set -euo pipefail
out=${1:-btdeploy-out/large}
exec btdeploy pipeline --model large --out "$out"
