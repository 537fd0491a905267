"""The README's "Use the engine" snippet runs as written (real SmolLM2-135M-Instruct on CPU) and
answers sensibly: with the chat template the model names colours."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Use the engine"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_engine_snippet_answers_sensibly(smollm2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_snippet(), "README.md", "exec"), scope)
    out = scope["outs"][0]
    colours = {"red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink", "brown"}
    named = {w for w in re.findall(r"[a-z]+", out.text.lower()) if w in colours}
    assert len(named) >= 2, out.text
    assert out.text in capsys.readouterr().out
    assert (tmp_path / "telemetry.json").is_file()


def test_telemetry_json_is_strict(tmp_path):
    """Telemetry with NaN fields (device time on CPU, a request without predictions) is written
    as strict JSON: NaN -> null."""
    import json
    import math

    from trail.request import RequestMetrics
    from trail.telemetry import Telemetry

    t = Telemetry()
    t.add_step(0, 0.0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1e-3, 0.0, math.nan)
    t.add_request(0, 5, 3, "length", RequestMetrics(0.0))
    text = t.export_json(tmp_path / "t.json").read_text()
    data = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"bare {c}")))
    assert data["steps"][0][-1] is None and "NaN" not in text
