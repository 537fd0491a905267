#!/usr/bin/env bash
# The GPU suite, by section: bash bench/gpu_suite.sh SECTION [SECTION ...]
#   build    build and install trail with its CUDA extension (no registry needed)
#   test     pytest -m gpu (GPU tests; CPU tests too when TRAIL_ALL_TESTS=1)
#   kernels  kernel and swap microbenchmarks        (bench/suite/kernels_*.py)
#   model    model forward / decode step benchmarks (bench/suite/model_*.py)
#   serve    the serving verdict's grid, one section per call (bench/suite/serve_grid.py;
#            TRAIL_SERVE_SECTION=NAME, --list for the sections) + its summary in $DEST/serve/
# Each section should finish within 8 minutes on one H100. A section script writes its JSON,
# logs and plots under $TRAIL_RESULTS/<section>/ and a short table to
# $TRAIL_RESULTS/<section>/*.summary.txt; the summaries are printed last and everything is packed
# into ONE archive: ${OUT:-bench/results}/gpu_suite_<sections>.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 build|test|kernels|model|serve ..." >&2; exit 2; }
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
export TRAIL_RESULTS=${TRAIL_RESULTS:-$(mktemp -d /tmp/trail-results.XXXX)}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

run_section() {
  local section=$1 dir="$TRAIL_RESULTS/$1" t0 rc=0
  mkdir -p "$dir"
  t0=$(date +%s)
  case "$section" in
    build)
      # sm_90 machine code + PTX unless the caller chose (the image presets TORCH_CUDA_ARCH_LIST=9.0a)
      export TRAIL_CUDA_ARCH_LIST=${TRAIL_CUDA_ARCH_LIST:-9.0+PTX}
      { $PY -m pip install --no-build-isolation --no-deps -v . 2>&1 | tail -n 30; } >"$dir/build.log"
      rc=${PIPESTATUS[0]}
      $PY -c "import json, trail; print(json.dumps(trail.native_info(), indent=1))" \
        >"$dir/native_info.json" 2>>"$dir/build.log" || rc=1
      { echo "build: rc=$rc in $(( $(date +%s) - t0 )) s"; cat "$dir/native_info.json"; } >"$dir/build.summary.txt"
      ;;
    test)
      local sel=(-m gpu)
      [ "${TRAIL_ALL_TESTS:-0}" = 1 ] && sel=()
      $PY -m pytest tests "${sel[@]}" -q -p no:cacheprovider --junitxml="$dir/junit.xml" >"$dir/pytest.log" 2>&1
      rc=$?
      { echo "test: rc=$rc in $(( $(date +%s) - t0 )) s"; tail -n 15 "$dir/pytest.log"; } >"$dir/test.summary.txt"
      ;;
    kernels|model|serve)
      shopt -s nullglob
      local scripts=(bench/suite/"$section"_*.py)
      [ ${#scripts[@]} -gt 0 ] || echo "$section: no scripts yet" >"$dir/none.summary.txt"
      for s in "${scripts[@]}"; do
        local name; name=$(basename "$s" .py)
        timeout 480 $PY "$s" --out "$dir" >"$dir/$name.log" 2>&1 || { echo "$name: FAILED (rc=$?)" >>"$dir/$name.summary.txt"; rc=1; }
      done
      if [ "$section" = serve ]; then
        # the verdict's summary over this call's section and any earlier ones ($TRAIL_SERVE_MERGE: folders)
        $PY bench/serve_summary.py "$dir"/*/ ${TRAIL_SERVE_MERGE:-} --out "$DEST/serve" >"$dir/summary.log" 2>&1 || rc=1
        cp "$DEST/serve/summary.md" "$dir/summary.summary.txt" 2>/dev/null
      fi
      if [ "$section" = kernels ] && [ -d bench/micro ]; then
        $PY -m pytest bench/micro -q -p no:cacheprovider --benchmark-enable \
          --benchmark-json="$dir/micro.json" >"$dir/micro.log" 2>&1 || rc=1
        tail -n 40 "$dir/micro.log" >"$dir/micro.summary.txt"
      fi
      ;;
    *) echo "unknown section: $section" >&2; return 2 ;;
  esac
  echo "[$section] rc=$rc $(( $(date +%s) - t0 )) s"
  return $rc
}

for section in "$@"; do run_section "$section" || status=1; done

echo; echo "===== summary ====="
for section in "$@"; do
  for f in "$TRAIL_RESULTS/$section"/*.summary.txt; do [ -f "$f" ] && { echo "--- $section/$(basename "$f" .summary.txt)"; cat "$f"; }; done
done
archive="$DEST/gpu_suite_$(IFS=_; echo "$*").tar.gz"
tar -czf "$archive" -C "$TRAIL_RESULTS" . && echo "results: $archive"
exit $status
