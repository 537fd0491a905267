"""trail: length-aware LLM serving (TRAIL: shortest-predicted-remaining-first with limited preemption).

Importing `trail` loads the native library `trail._C` (ops under `torch.ops.trail`, classes under
`torch.classes.trail`). Kernels with Triton and torch-reference implementations live in the sibling
package `trail_kernels`.
"""
from trail._native import native_info, ops

__version__ = "0.1.0"
__all__ = ["native_info", "ops", "__version__"]
