#!/usr/bin/env bash
# The tiny preset through export/recipe.sh: export (split too), optimize, quantize, check, and
# build engines where TensorRT runs.
exec "$(dirname "$0")/recipe.sh" tiny "$@"
