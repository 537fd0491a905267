"""Test setup shared by every test file.

- Without CUDA, TRITON_INTERPRET=1 is set before anything imports Triton, so kernel tests can run
  the Triton path on CPU (small grids only: ~1 ms per program instance).
- TRAIL_CHECK_LEDGER=1: serving cores check the block ledger against every plan.
- `gpu`-marked tests are skipped without CUDA.
- `smollm2_dir`: the real SmolLM2-135M-Instruct weights as a cached safetensors folder, converted
  from the GGUF once per machine (not once per test).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# every serving core in the tests checks, after each step, that each scheduled slot maps exactly
# its plan row's BLOCKS (trail.serving_core.ServingCore.check)
os.environ.setdefault("TRAIL_CHECK_LEDGER", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    from trail.assets import smollm2_hf_dir

    try:
        return smollm2_hf_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def seeded():
    torch.manual_seed(1234)
    return torch.Generator().manual_seed(1234)
