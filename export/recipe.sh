#!/usr/bin/env bash
# Every head of a preset or checkpoint (usage: recipe.sh MODEL [OUT]): a thin call of
# `btdeploy pipeline`, the one orchestration of the main job. It exports (with split towers),
# optimizes every flavour, quantizes every precision, checks every graph against PyTorch at its
# precision's tolerances, and builds and checks TensorRT engines where TensorRT runs.
# Calibration: pass CALIB_IMAGES=DIR CALIB_TEXTS=FILE for real data (CALIB_SIZE=N rows, default 16).
set -euo pipefail
model=${1:?usage: recipe.sh MODEL [OUT], MODEL a preset (tiny, base, large) or checkpoint folder}
out=${2:-btdeploy-out/$(basename "$model")}
calib=()
if [[ -n "${CALIB_IMAGES:-}${CALIB_TEXTS:-}" ]]; then
  calib=(--calib-images "${CALIB_IMAGES:?CALIB_TEXTS is set: set CALIB_IMAGES=DIR too}"
         --calib-texts "${CALIB_TEXTS:?CALIB_IMAGES is set: set CALIB_TEXTS=FILE (one caption per line) too}")
fi
if [[ -n "${CALIB_SIZE:-}" ]]; then
  calib+=(--calib-size "$CALIB_SIZE")
fi
exec btdeploy pipeline --model "$model" --out "$out" --split "${calib[@]}"
