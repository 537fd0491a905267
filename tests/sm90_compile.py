"""Runs a script that compiles Triton kernels for sm_90 on a machine without a GPU (Triton lowers
to PTX and runs ptxas on the CPU), in a fresh interpreter without TRITON_INTERPRET."""
from __future__ import annotations

import os
import subprocess
import sys


def compile_for_sm90(script: str, timeout: int) -> str:
    """-> the script's stdout; fails the test with the end of its stderr if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
