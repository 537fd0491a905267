#!/usr/bin/env bash
# The API reference of trail's public names, generated from the docstrings with pdoc, into
# docs/api/ (open docs/api/index.html). Run after scripts/install_cpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
OUT=${1:-docs/api}
python -m pdoc -o "$OUT" --no-show-source trail.engine trail.engine_config trail.request trail.length_probe \
  trail.predictor.prompt_predictors trail.scheduler trail.scheduler_types trail.kv_cache trail_kernels.row_flags \
  trail.telemetry trail.sim
echo "API reference: $OUT/index.html"
