#!/usr/bin/env bash
# Incremental rebuild of trail._C for an editable install (development): the library lands in
# python/trail/ where the editable package loads it. Serialised by a lock, so parallel callers wait.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
exec flock /tmp/trail-build.lock sh -c "
  cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH=\$($PY -c 'import torch.utils; print(torch.utils.cmake_prefix_path)') \
    -DPython_EXECUTABLE=\$(command -v $PY) \
    -DTRAIL_OUTPUT_DIR=$PWD/python/trail -DTRAIL_OUTPUT_NAME=_C.abi3.so >/dev/null &&
  cmake --build build/cmake"
