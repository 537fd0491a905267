"""Probe files: `NAME.safetensors` (the MLP, `torch.nn.Linear` layout) + `NAME.json` (what it
means). Written by `trail train-probe`, read by the engine, `trail eval-probe` and tests.

    fc1.weight [h, d]  fc1.bias [h]  fc2.weight [K, h]  fc2.bias [K]

`NAME.json`: format, version, kind ("layer" probe, or a prompt predictor "prompt_boe" /
"prompt_minilm"), model id, layer, d, h, bin_edges (K + 1), bin_values (K), pi (K, the training
label prior), alpha, eps, max_new_tokens, and free-form training / validation records.
Loading checks everything against the weights and against what the caller expects (model id,
d); any mismatch is a ValueError that names the file and the field.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import MISSING, asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path

import torch
from torch import nn

from trail.predictor.bins import validate_edges

FORMAT, VERSION = "trail-probe", 1
KINDS = ("layer", "prompt_boe", "prompt_minilm")


class ProbeMLP(nn.Module):
    """Linear(d, h) -> ReLU -> Linear(h, K): logits over remaining-length bins."""

    def __init__(self, d: int, num_bins: int, h: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, num_bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.to(self.fc1.weight.dtype))))


@dataclass
class ProbeSpec:
    kind: str
    model: str
    d: int
    h: int
    bin_edges: list[float]
    bin_values: list[float]
    pi: list[float]
    layer: int | None = None
    alpha: float = 1.0
    eps: float = 1e-4
    max_new_tokens: int = 512
    encoder: str | None = None          # prompt_minilm: which text encoder
    training: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges) - 1

    def validate(self, where: str = "probe") -> "ProbeSpec":
        """Checks every field's type and range (nothing coerced: a number is an int or float, never
        a bool, a string or null); ValueError "<where>: <field> must be ..., got <value>"."""
        def bad(msg):
            raise ValueError(f"{where}: {msg}")

        def got(value):
            return f"got {value!r:.200} ({type(value).__name__})"

        def number(v) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool)

        def integer(v) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        if not (isinstance(self.kind, str) and self.kind in KINDS):
            bad(f"kind must be one of {KINDS}, {got(self.kind)}")
        if not (isinstance(self.model, str) and self.model):
            bad(f"model must be a non-empty string (the model id), {got(self.model)}")
        if not isinstance(self.bin_edges, (list, tuple)):
            bad(f"bin_edges must be a list of numbers, {got(self.bin_edges)}")
        for i, e in enumerate(self.bin_edges):
            if not number(e):
                bad(f"bin_edges[{i}] must be a number, {got(e)}")
        try:
            self.bin_edges = validate_edges(self.bin_edges)
        except ValueError as exc:
            bad(f"bin_edges: {exc}")
        k = self.num_bins
        for name in ("bin_values", "pi"):
            vals = getattr(self, name)
            if not isinstance(vals, (list, tuple)) or len(vals) != k:
                bad(f"{name} must hold {k} numbers (one per bin), {got(vals)}")
            for i, v in enumerate(vals):
                if not (number(v) and math.isfinite(v) and v >= 0):
                    bad(f"{name}[{i}] must be a finite number >= 0, {got(v)}")
        if any(p <= 0 for p in self.pi) or abs(sum(self.pi) - 1.0) > 1e-4:
            bad(f"pi must be positive and sum to 1, got {list(self.pi)} (sum {sum(self.pi):.6f})")
        for name in ("d", "h"):
            if not (integer(getattr(self, name)) and getattr(self, name) > 0):
                bad(f"{name} must be a positive integer, {got(getattr(self, name))}")
        if self.kind == "layer" and not (integer(self.layer) and self.layer >= 0):
            bad(f"layer must be a layer index (an integer >= 0) for a layer probe, {got(self.layer)}")
        if self.layer is not None and not (integer(self.layer) and self.layer >= 0):
            bad(f"layer must be null or a layer index (an integer >= 0), {got(self.layer)}")
        if not (number(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0):
            bad(f"alpha must be a finite number > 0, {got(self.alpha)}")
        if not (number(self.eps) and 0 <= self.eps < 1):
            bad(f"eps must be a number in [0, 1), {got(self.eps)}")
        if not (integer(self.max_new_tokens) and self.max_new_tokens > 0):
            bad(f"max_new_tokens must be a positive integer, {got(self.max_new_tokens)}")
        if self.encoder is not None and not isinstance(self.encoder, str):
            bad(f"encoder must be null or a string, {got(self.encoder)}")
        for name in ("training", "validation"):
            if not isinstance(getattr(self, name), dict):
                bad(f"{name} must be an object (a dict of records), {got(getattr(self, name))}")
        return self


SHIPPED_DIR = Path(__file__).resolve().parent / "probes"


def shipped_probe_dir(model_id: str) -> Path:
    """Where the probe files shipped for `model_id` live: probes/<last part of the id>/
    (probe.*, prompt_boe.*, prompt_minilm.*). FileNotFoundError when none is shipped."""
    folder = SHIPPED_DIR / model_id.rstrip("/").split("/")[-1]
    if not paths(folder / "probe")[1].is_file():
        raise FileNotFoundError(f"no probe shipped for {model_id} (looked in {folder}); train one with "
                                f"`trail collect`, `trail embed`, `trail train-probe`")
    return folder


def paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """NAME, NAME.json or NAME.safetensors -> (NAME.safetensors, NAME.json)."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def resolve_path(path: str | os.PathLike) -> Path:
    """A probe file as a user names it: NAME, NAME.json or NAME.safetensors, or a folder holding
    probe.json (its layer probe: `<folder>/probe`). -> NAME. A folder without probe.json is a
    FileNotFoundError saying what it holds and what is expected."""
    p = Path(path)
    if p.is_dir():
        if not paths(p / "probe")[1].is_file():
            held = sorted(f.name for f in p.glob("*.json"))
            raise FileNotFoundError(f"{p}: a folder without probe.json (holds {held or 'no .json files'}); give a "
                                    f"probe file (NAME, NAME.json or NAME.safetensors) or a folder holding probe.json")
        p = p / "probe"
    return p


def resolve_layer_probe(path: str | os.PathLike) -> tuple[Path, ProbeSpec]:
    """`--probe` as a user gives it: a probe directory (holding probe.json), or NAME / NAME.json /
    NAME.safetensors of a layer probe. Checks the files exist and the JSON is a valid layer probe,
    without loading any model, so a bad path fails at once with a clear message."""
    try:
        p = resolve_path(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--probe {exc}") from None
    st, js = paths(p)
    if not js.is_file():
        raise FileNotFoundError(f"--probe {path}: no probe directory or probe file there ({js} not found)")
    if not st.is_file():
        raise FileNotFoundError(f"--probe {path}: {js.name} found but its weights {st} are missing")
    spec = load_spec(p)
    if spec.kind != "layer":
        raise ValueError(f"--probe {path}: a {spec.kind!r} file; eval-probe needs the layer probe (probe.json)")
    return p, spec


def save_probe(path: str | os.PathLike, mlp: ProbeMLP, spec: ProbeSpec) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    spec.validate(str(path))
    st, js = paths(path)
    state = {k: v.detach().float().contiguous().cpu() for k, v in mlp.state_dict().items()}
    _check_weights(state, spec, str(st))
    st.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(st), metadata={"format": FORMAT})
    js.write_text(json.dumps(dict(format=FORMAT, version=VERSION, **asdict(spec)), indent=1))
    return st, js


def load_spec(path: str | os.PathLike) -> ProbeSpec:
    """The checked metadata of a probe file (`resolve_path`: NAME, NAME.json, NAME.safetensors or a
    folder holding probe.json). Every error names the JSON file, the field and its value."""
    _, js = paths(resolve_path(path))
    if not js.is_file():
        raise FileNotFoundError(f"probe metadata not found: {js}")
    try:
        raw = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{js}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{js}: not a trail probe file (format {raw.get('format') if isinstance(raw, dict) else None!r})")
    if raw.get("version") != VERSION:
        raise ValueError(f"{js}: probe file version {raw.get('version')!r} not supported (want {VERSION})")
    fields = {k: v for k, v in raw.items() if k not in ("format", "version")}
    # fitted values are never filled in silently: a probe without them is not the one trained
    required = ("max_new_tokens",) + (("alpha", "eps") if fields.get("kind") == "layer" else ())
    missing = [k for k in required if k not in fields]
    if missing:
        raise ValueError(f"{js}: missing fitted key(s) {missing}; retrain or add them (see `trail train-probe`)")
    known = {f.name for f in dataclass_fields(ProbeSpec)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{js}: unknown field(s) {unknown}; a probe file holds {sorted(known)}")
    absent = sorted(f.name for f in dataclass_fields(ProbeSpec)
                    if f.name not in fields and f.default is MISSING and f.default_factory is MISSING)
    if absent:
        raise ValueError(f"{js}: missing field(s) {absent}")
    return ProbeSpec(**fields).validate(str(js))


def load_probe(path: str | os.PathLike, expect_model: str | None = None, expect_d: int | None = None,
               expect_kind: str | None = None, device: str | torch.device = "cpu"
               ) -> tuple[ProbeMLP, ProbeSpec]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_path(path)
    st, js = paths(path)
    spec = load_spec(path)
    if expect_kind is not None and spec.kind != expect_kind:
        raise ValueError(f"{js}: a {spec.kind!r} probe, expected {expect_kind!r}")
    if expect_model is not None and spec.model != expect_model:
        raise ValueError(f"{js}: probe trained for model {spec.model!r}, not {expect_model!r}")
    if expect_d is not None and spec.d != expect_d:
        raise ValueError(f"{js}: probe input width d={spec.d} does not match the model's {expect_d}")
    if not st.is_file():
        raise FileNotFoundError(f"probe weights not found: {st}")
    try:
        state = load_file(str(st))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{st}: unreadable safetensors file ({exc})") from None
    _check_weights(state, spec, str(st))
    mlp = ProbeMLP(spec.d, spec.num_bins, spec.h)
    mlp.load_state_dict(state)
    return mlp.to(device).eval(), spec


def _check_weights(state: dict, spec: ProbeSpec, where: str) -> None:
    want = {"fc1.weight": (spec.h, spec.d), "fc1.bias": (spec.h,),
            "fc2.weight": (spec.num_bins, spec.h), "fc2.bias": (spec.num_bins,)}
    if set(state) != set(want):
        raise ValueError(f"{where}: tensors {sorted(state)} != expected {sorted(want)}")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(state[name].shape)}, "
                             f"expected {shape} (d={spec.d}, h={spec.h}, K={spec.num_bins})")
        if not torch.isfinite(state[name]).all():
            raise ValueError(f"{where}: {name} holds non-finite values")


def probe_params(mlp: ProbeMLP, spec: ProbeSpec, *, rule: str = "bayes", alpha: float | None = None,
                 eps: float | None = None, update_every: int | None = None,
                 device: str | torch.device = "cpu"):
    """The kernel-side `trail_kernels.probe_params.ProbeParams` of a loaded layer probe (fp32 weights on
    `device`; cast with `.to(device, dtype)`)."""
    from trail_kernels.probe_params import ProbeParams

    sd = {k: v.detach().float().to(device) for k, v in mlp.state_dict().items()}
    return ProbeParams(sd["fc1.weight"], sd["fc1.bias"], sd["fc2.weight"], sd["fc2.bias"],
                       torch.tensor(spec.bin_edges, dtype=torch.float64),
                       torch.tensor(spec.bin_values, dtype=torch.float64),
                       torch.tensor(spec.pi, dtype=torch.float64).log(),
                       alpha=spec.alpha if alpha is None else alpha,
                       eps=spec.eps if eps is None else eps, rule=rule, update_every=update_every)


def load_probe_params(path: str | os.PathLike, expect_model: str | None = None, expect_d: int | None = None,
                      device: str | torch.device = "cpu"):
    """A layer probe file -> (ProbeParams on `device`, ProbeSpec): what an engine needs."""
    mlp, spec = load_probe(path, expect_model=expect_model, expect_d=expect_d, expect_kind="layer")
    try:
        return probe_params(mlp, spec, device=device), spec
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{paths(resolve_path(path))[1]}: {exc}") from None
