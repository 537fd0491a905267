#!/usr/bin/env bash
# Independent GPU jobs side by side on one multi-GPU host, one GPU each, one archive per job.
#
#   bash bench/gpu_jobs.sh JOBS_FILE
#
# JOBS_FILE: one job per line, "NAME COMMAND ..." (blank lines and # comments skipped). Job i
# (0-based) runs `bash -c COMMAND` with CUDA_VISIBLE_DEVICES=i, OUT=$RESULTS/NAME (its own results
# folder), OMP_NUM_THREADS = host cores / jobs, its output in $RESULTS/NAME.log, and is stopped
# (SIGTERM, then SIGKILL 20 s later) after JOB_TIMEOUT seconds (default 540). Every job runs on
# its own GPU, so one job's timings do not share a device with another's; they do share the host,
# so each job is pinned (taskset) to its own slice of the cores. The 2026-11-27 serving rounds ran
# before the pinning and measured up to 1.9x between identical runs of a host-bound engine.
#
# Environment: BUILD=1 builds trail first (bench/gpu_suite.sh build); JOB_TIMEOUT; OUT (default
# bench/results); RESULTS (default a new /tmp folder): where jobs write, kept on the machine.
# Results: $OUT/NAME.tar.gz per job (split into NAME.tar.gz.partaa, ... when over 15 MiB:
# `cat NAME.tar.gz.part* | tar xz`) and $OUT/jobs.tar.gz (logs, exit codes, build).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 1 ] && [ -f "$1" ] || { echo "usage: $0 JOBS_FILE" >&2; exit 2; }
DEST=${OUT:-bench/results}
RESULTS=${RESULTS:-$(mktemp -d /tmp/trail-jobs.XXXX)}
mkdir -p "$RESULTS"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
if [ "${BUILD:-0}" = 1 ]; then
  OUT="$RESULTS" bash bench/gpu_suite.sh build >"$RESULTS/build.log" 2>&1 || echo "build FAILED (see build.log)"
  rm -f "$RESULTS"/gpu_suite_build.tar.gz
fi
mapfile -t JOBS < <(grep -v '^[[:space:]]*\(#\|$\)' "$1")
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "${#JOBS[@]}" -le "$NGPU" ] || { echo "${#JOBS[@]} jobs but $NGPU GPUs" >&2; exit 2; }
THREADS=$(( $(nproc) / ${#JOBS[@]} ))
pids=() names=()
for i in "${!JOBS[@]}"; do
  name=${JOBS[$i]%% *} cmd=${JOBS[$i]#* }
  mkdir -p "$RESULTS/$name"
  echo "[$name] GPU $i: $cmd"
  pin=()
  command -v taskset >/dev/null && pin=(taskset -c "$(( i * THREADS ))-$(( (i + 1) * THREADS - 1 ))")
  CUDA_VISIBLE_DEVICES=$i OMP_NUM_THREADS=$THREADS OUT="$RESULTS/$name" \
    timeout -s TERM --kill-after=20 "${JOB_TIMEOUT:-540}" "${pin[@]}" bash -c "$cmd" >"$RESULTS/$name.log" 2>&1 &
  pids+=($!) names+=("$name")
done
: >"$RESULTS/jobs.rc"
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  echo "${names[$i]} rc=$rc at $(( $(date +%s) - T0 )) s" | tee -a "$RESULTS/jobs.rc"
done
nvidia-smi -L >"$RESULTS/gpus.txt" 2>&1
for n in "${names[@]}"; do
  tar -czf "$DEST/$n.tar.gz" -C "$RESULTS" "$n"
  if [ "$(stat -c %s "$DEST/$n.tar.gz")" -gt $(( 15 * 1024 * 1024 )) ]; then
    split -b 15M "$DEST/$n.tar.gz" "$DEST/$n.tar.gz.part" && rm "$DEST/$n.tar.gz"
  fi
done
tar -czf "$DEST/jobs.tar.gz" -C "$RESULTS" $(printf -- "--exclude=./%s " "${names[@]}") .
ls -la "$DEST"
for n in "${names[@]}"; do echo "--- $n"; tail -n 4 "$RESULTS/$n.log"; done
