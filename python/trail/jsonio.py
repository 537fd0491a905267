"""Strict JSON for every file trail writes: NaN and infinities become null (bare NaN, which
Python's json writes by default, is rejected by strict parsers), numpy scalars and arrays become
numbers and lists."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (dicts, lists, tuples, numpy values)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":     # numpy scalars and arrays
        return strict(obj.tolist())
    return obj


def dumps(obj: Any, **kwargs) -> str:
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(obj, **kwargs))
    return path
