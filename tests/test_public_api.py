"""Semantic versioning of the public API (trail.__all__): every documented name imports, and every
parameter recorded in tests/public_api_v0.1.json is still there with the same kind and default.
New parameters are allowed only with defaults (a minor release); removing or changing a recorded
one is a breaking change and needs a new major version and a new record. The API reference builds
from the docstrings (scripts/build_docs.sh)."""
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import trail

RECORD = json.loads((Path(__file__).with_name("public_api_v0.1.json")).read_text())
REQUIRED = "<required>"


def _resolve(dotted: str):
    obj = trail
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_public_name_imports_and_has_a_docstring():
    for name in trail.__all__:
        obj = getattr(trail, name)
        if name != "__version__" and (inspect.isclass(obj) or inspect.isfunction(obj)):
            assert inspect.getdoc(obj), f"trail.{name} has no docstring"


@pytest.mark.parametrize("name", sorted(RECORD))
def test_recorded_signatures_are_kept(name):
    params = {p.name: p for p in inspect.signature(_resolve(name)).parameters.values() if p.name != "self"}
    for pname, kind, default in RECORD[name]:
        assert pname in params, f"{name}: parameter {pname!r} was removed (breaking change)"
        p = params[pname]
        assert p.kind.name == kind, f"{name}({pname}): kind {p.kind.name}, recorded {kind}"
        got = REQUIRED if p.default is inspect.Parameter.empty else repr(p.default)
        assert got == default, f"{name}({pname}): default {got}, recorded {default}"
    recorded = {r[0] for r in RECORD[name]}
    for pname, p in params.items():
        if pname not in recorded and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            assert p.default is not inspect.Parameter.empty, f"{name}: new parameter {pname!r} must have a default"


def test_api_reference_builds(tmp_path):
    pytest.importorskip("pdoc")
    script = Path(__file__).resolve().parents[1] / "scripts" / "build_docs.sh"
    modules = ["trail.engine", "trail.length_probe", "trail.scheduler", "trail.kv_cache", "trail.kv_swap"]
    subprocess.run([sys.executable, "-m", "pdoc", "-o", str(tmp_path), "--no-show-source", *modules], check=True,
                   capture_output=True)
    assert (tmp_path / "trail" / "length_probe.html").is_file() and script.is_file()
