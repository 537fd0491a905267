"""No module of the library (python/trail, trail_kernels) grows past MAX_LINES: a file that does
more than one job gets split (issue 22). The failure lists every file over the limit."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (ROOT / "python" / "trail", ROOT / "trail_kernels")
MAX_LINES = 450


def test_every_library_module_is_at_most_max_lines():
    sizes = {path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for package in PACKAGES for path in sorted(package.rglob("*.py"))}
    assert sizes, f"no modules found under {PACKAGES}"
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
