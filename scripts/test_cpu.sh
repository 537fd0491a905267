#!/usr/bin/env bash
# Install everything (scripts/install_cpu.sh) and run the CPU test suite. Exit 5 (no tests
# collected) counts as a failure: a suite that runs nothing proves nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_cpu.sh
. .venv/bin/activate
python -m pytest tests -m "not slow" -q "$@"
python -m pytest bench/micro/test_engine_host_bench.py -q --benchmark-disable
