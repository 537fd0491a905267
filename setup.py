"""Build `trail` and its native extension `trail._C`.

setup.py only drives CMake (CMakeLists.txt is the one description of the native build):
CUDA sources are compiled when the installed torch has CUDA and `nvcc` is found, C++ only
otherwise. Install with `pip install --no-build-isolation .` so the build sees the installed
torch (build isolation would fetch another one).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _want_cuda() -> bool:
    flag = os.environ.get("TRAIL_CUDA", "auto").lower()
    if flag in ("0", "off", "no", "false"):
        return False
    import torch

    has_nvcc = shutil.which("nvcc") is not None or (
        os.environ.get("CUDA_HOME") and Path(os.environ["CUDA_HOME"], "bin", "nvcc").exists()
    )
    found = torch.version.cuda is not None and bool(has_nvcc)
    if flag in ("1", "on", "yes", "true") and not found:
        raise RuntimeError("TRAIL_CUDA=1 but torch has no CUDA or nvcc is not on PATH")
    return found


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[], py_limited_api=True)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(os.environ.get("TRAIL_BUILD_DIR", ROOT / "build" / "cmake"))
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = _want_cuda()
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DTRAIL_OUTPUT_DIR={out.parent}",
            f"-DTRAIL_OUTPUT_NAME={out.name}",
            f"-DTRAIL_WITH_CUDA={'ON' if cuda else 'OFF'}",
        ]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(cfg)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


# folders of package data only (no __init__.py): listed so setuptools ships their files
# (pyproject.toml [tool.setuptools.package-data]) instead of warning that they would be ignored
DATA_PACKAGES = ["trail.data", "trail.data.sim", "trail.predictor.probes"]

setup(
    packages=find_packages("python") + DATA_PACKAGES
    + find_packages(".", include=["trail_kernels", "trail_kernels.*"]),
    ext_modules=[CMakeExtension("trail._C")],
    cmdclass={"build_ext": CMakeBuild},
)
