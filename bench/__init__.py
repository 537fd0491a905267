"""Benchmarks of trail (serving, simulator, predictor pipeline, GPU suite), importable as a package
from the repository root (`import bench.serve`, `from bench import common`); the scripts also run
as `python bench/X.py` from the root. What they share is in bench/common.py. The library (trail,
trail_kernels) never imports bench."""
