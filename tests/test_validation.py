"""Validation at the boundary (issue 27, item 1): every bad input a hostile user tried is refused
with an error naming the field, the value and what is allowed; nothing is coerced silently. Each
case runs against an engine (tiny random model) with requests already queued and running, and
checks that they finish with exactly the tokens they get without the bad call."""
import json
import math

import numpy as np
import pytest
import torch
from tiny_engine_model import tiny_model_probe

from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.predictor.probe_file import ProbeMLP, ProbeSpec, load_probe_params, load_spec, save_probe
from trail.request import SamplingParams
from trail.request_checks import check_request_id
from trail.sampling import SampleParams
from trail.scheduler_types import SchedulerConfig

# the queued work: greedy, sampled, and sampled with top_k past the candidate sampler (the exact
# sampler, where a float32 top_p of 0 used to make every step raise)
QUEUED = [(list(range(10, 30)), SamplingParams(max_new_tokens=10, ignore_eos=True)),
          (list(range(40, 52)), SamplingParams(max_new_tokens=12, temperature=0.8, seed=5, ignore_eos=True)),
          (list(range(60, 75)), SamplingParams(max_new_tokens=8, temperature=0.9, top_k=2000, seed=9,
                                               repetition_penalty=1.2, ignore_eos=True))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: ~50 tiny engines run here, and on a busy 2-core machine two spinning
    threads per matmul make each run ~30x slower. The reference runs under the same setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_probe()


def _engine(tiny, **cfg):
    model, probe = tiny
    cfg.setdefault("max_model_len", 96)
    cfg.setdefault("prefill_tokens_per_s", 1e4)
    return LLMEngine(model, None, EngineConfig(policy="trail", max_batch=4, num_gpu_blocks=40, **cfg), probe=probe,
                     probe_layer=1, eos_token_ids=[7])


def _serve(tiny, bad=None, extra=()):
    """QUEUED (+ `extra`) through one engine; `bad(engine)` runs after the first step, with the
    requests queued and running. -> every request's final tokens."""
    engine = _engine(tiny)
    ids = [engine.add_request(p, sp) for p, sp in list(QUEUED) + list(extra)]
    final = {o.request_id: o for o in engine.step() if o.finished}
    if bad is not None:
        bad(engine)
    while engine.has_unfinished():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    engine.check_idle()
    return [list(final[i].token_ids) for i in ids]


@pytest.fixture(scope="module")
def reference(tiny):
    return _serve(tiny)


def _refused(exc_type, *fragments):
    """A check that the error is `exc_type` and its message holds each fragment (the field, the
    value as the message writes it, the allowed range)."""
    def check(excinfo):
        assert excinfo.type is exc_type or issubclass(excinfo.type, exc_type), excinfo.type
        msg = str(excinfo.value)
        for f in fragments:
            assert f in msg, f"{f!r} not in {msg!r}"
    return check


def _add(prompt=(1, 2, 3), **kw):
    def call(engine):
        engine.add_request(list(prompt) if isinstance(prompt, tuple) else prompt,
                           SamplingParams(max_new_tokens=4), **kw)
    return call


def _params(**kw):
    return lambda engine: engine.add_request([1, 2, 3], SamplingParams(**{"max_new_tokens": 4, **kw}))


def _config(**kw):
    return lambda engine: EngineConfig(**kw)


def _options(**kw):
    return lambda engine: EngineConfig(policy_options=kw)


# (id, the bad call, the error type, fragments its message must hold)
CASES = [
    # float32 on the device: 0 or inf there, so refused here
    ("temperature-denormal", _params(temperature=1e-45), ValueError, ["temperature", "1e-45", "[1e-06, 1e+06]"]),
    ("temperature-below-normal", _params(temperature=1e-39), ValueError, ["temperature", "1e-39", "0 (greedy)"]),
    ("temperature-inf-in-f32", _params(temperature=1e39), ValueError, ["temperature", "1e+39", "[1e-06, 1e+06]"]),
    ("top_p-zero-in-f32", _params(top_p=1e-300), ValueError, ["top_p", "1e-300", "[1e-06, 1]"]),
    ("top_p-denormal", _params(top_p=1e-45), ValueError, ["top_p", "1e-45", "[1e-06, 1]"]),
    ("penalty-denormal", _params(repetition_penalty=1e-46), ValueError,
     ["repetition_penalty", "1e-46", "[1e-06, 1e+06]"]),
    ("penalty-inf-in-f32", _params(repetition_penalty=1e300), ValueError, ["repetition_penalty", "1e+300"]),
    ("temperature-str", _params(temperature="0.5"), ValueError, ["temperature", "'0.5'", "str"]),
    ("top_k-float", _params(top_k=1.5), ValueError, ["top_k", "1.5", "[0, 2147483647]"]),
    ("top_k-past-int64", _params(top_k=2**64), ValueError, ["top_k", str(2**64)]),
    ("max_new_tokens-bool", _params(max_new_tokens=True), ValueError, ["max_new_tokens", "True", "bool"]),
    ("seed-bool", _params(seed=True), ValueError, ["seed", "True", "[0, 2**63)"]),
    ("stop_token_ids-bool", _params(stop_token_ids=[3, True]), ValueError, ["stop_token_ids[1]", "True"]),
    ("ignore_eos-int", _params(ignore_eos=1), ValueError, ["ignore_eos", "1", "bool"]),
    # stop strings match text: an engine without a tokenizer refuses them
    ("stop-without-tokenizer", _params(stop=("re t",)), ValueError, ["SamplingParams.stop", "'re t'", "needs text"]),
    # request ids: ints in [0, 2**62)
    ("request_id-int64-max", _add(request_id=2**63 - 1), ValueError, ["request_id", str(2**63 - 1), "[0, 2**62)"]),
    ("request_id-2**63", _add(request_id=2**63), ValueError, ["request_id", str(2**63), "[0, 2**62)"]),
    ("request_id-float", _add(request_id=100.5), ValueError, ["request_id", "100.5", "float"]),
    ("request_id-bool", _add(request_id=True), ValueError, ["request_id", "True", "bool"]),
    ("request_id-str", _add(request_id="7"), ValueError, ["request_id", "'7'", "str"]),
    ("request_id-negative", _add(request_id=-1), ValueError, ["request_id", "-1", "[0, 2**62)"]),
    # prompts: str, a sequence of ints, or chat messages; nothing else
    ("prompt-bytes", _add(b"hello"), ValueError, ["prompt", "b'hello'", "bytes"]),
    ("prompt-float-and-bool", _add([1.7, True]), ValueError, ["prompt[0]", "1.7", "float"]),
    ("prompt-bool", _add([1, True]), ValueError, ["prompt[1]", "True", "bool"]),
    ("prompt-str-element", _add([1, "2"]), ValueError, ["prompt[1]", "'2'", "str"]),
    ("prompt-numpy-bool", _add([4, np.bool_(True)]), ValueError, ["prompt[1]", "True", "bool"]),
    ("prompt-float-array", _add(np.array([1.0, 2.0])), ValueError, ["prompt", "float64"]),
    ("prompt-set", _add({1, 2}), ValueError, ["prompt", "set", "{1, 2}"]),
    ("prompt-none", _add(None), ValueError, ["prompt", "None"]),
    ("prompt-out-of-vocab", _add([1, 600]), ValueError, ["prompt[1]", "600", "[0, 512)"]),
    # EngineConfig and the SchedulerConfig options it carries
    ("allow_keep-str", _options(allow_keep="no"), ValueError, ["allow_keep", "'no'", "bool"]),
    ("c-str", _options(c="0.8"), ValueError, ["policy_options", "c must", "'0.8'", ">= 0"]),
    ("margin-str", _options(margin="x"), ValueError, ["margin", "'x'", "finite number"]),
    ("max_preemptions-float", _options(max_preemptions=1.5), ValueError, ["max_preemptions", "1.5", "[0, 2147483647]"]),
    ("max_forced_evictions-float", _options(max_forced_evictions=1.5), ValueError,
     ["max_forced_evictions", "1.5", "[0, 2147483647]"]),
    ("aging_rate-nan", _options(aging_rate=math.nan), ValueError, ["aging_rate", "nan", ">= 0"]),
    ("max_batch-bool", _config(max_batch=True), ValueError, ["max_batch", "True", "[1, 2147483647]"]),
    ("max_model_len-float", _config(max_model_len=96.0), ValueError, ["max_model_len", "96.0", "float"]),
    ("overlap-int", _config(overlap=1), ValueError, ["overlap", "1", "bool"]),
    ("kv_cache_gib-str", _config(kv_cache_gib="1"), ValueError, ["kv_cache_gib", "'1'", ">= 0"]),
    ("gpu_memory_utilization", _config(gpu_memory_utilization=1.5), ValueError,
     ["gpu_memory_utilization", "1.5", "(0, 1]"]),
    ("cuda_graph_sizes-bool", _config(cuda_graph_sizes=(1, True)), ValueError, ["cuda_graph_sizes[1]", "True"]),
    ("scheduler-config-direct", lambda e: SchedulerConfig(max_preemptions=1.5).resolved(), ValueError,
     ["scheduler config", "max_preemptions", "1.5"]),
    ("swap_space_gib-past-ram", lambda e: _engine(e.tiny, swap_space_gib=1e6), ValueError,
     ["swap_space_gib", "1e+06 GiB", "physical memory"]),
]
@pytest.mark.parametrize("call, exc, fragments", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_is_refused_and_the_queued_requests_are_served_unchanged(tiny, reference, call, exc, fragments):
    def bad(engine):
        engine.tiny = tiny
        with pytest.raises(Exception) as excinfo:
            call(engine)
        _refused(exc, *fragments)(excinfo)
    assert _serve(tiny, bad) == reference


def test_request_ids_are_checked():
    for good in (0, 2**62 - 1, np.int64(5)):
        assert check_request_id(good) == int(good) and type(check_request_id(good)) is int
    for bad in (2**62, 2**63 - 1, -1, 100.5, True, "3", None):
        with pytest.raises(ValueError, match=r"request_id .*\[0, 2\*\*62\)"):
            check_request_id(bad)


def test_the_smallest_allowed_values_serve_beside_the_exact_sampler(tiny, reference):
    """The lower bounds are safe in float32 next to a top_k > 1024 row (the exact sampler), and
    temperature 1e-6 samples what greedy gives; numpy numbers are taken as the numbers they equal."""
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    edge = [([5, 6, 7], greedy),
            ([5, 6, 7], SamplingParams(max_new_tokens=6, temperature=1e-6, seed=1, ignore_eos=True)),
            ([8, 9], SamplingParams(max_new_tokens=6, temperature=0.7, top_p=1e-6, top_k=2000, seed=2,
                                    ignore_eos=True)),
            ([8, 9], SamplingParams(max_new_tokens=6, repetition_penalty=1e-6, ignore_eos=True)),
            (np.array([8, 9], np.int32), SamplingParams(max_new_tokens=np.int64(6), temperature=np.float32(1e6),
                                                        repetition_penalty=1e6, seed=3, ignore_eos=True))]
    out = _serve(tiny, extra=edge)
    assert out[:len(QUEUED)] == reference
    assert out[len(QUEUED) + 1] == out[len(QUEUED)]                    # temperature 1e-6 == greedy
    assert all(len(t) == 6 and all(0 <= x < 512 for x in t) for t in out[len(QUEUED):])
    p = edge[-1][1]
    assert type(p.max_new_tokens) is int and type(p.temperature) is float


def test_sample_params_share_the_float32_bounds():
    with pytest.raises(ValueError, match=r"SampleParams: top_p must be .*\[1e-06, 1\].*1e-300"):
        SampleParams(temperature=0.5, top_p=1e-300)
    with pytest.raises(ValueError, match=r"SampleParams: temperature .*1e-45"):
        SampleParams(temperature=1e-45)
    SampleParams(temperature=1e-6, top_p=1e-6, repetition_penalty=1e6)


# ---- probe files ------------------------------------------------------------------------------
@pytest.fixture
def probe_dir(tmp_path):
    torch.manual_seed(0)
    spec = ProbeSpec(kind="layer", model="org/model", d=12, h=16, bin_edges=[0, 4, 8, 16, math.inf],
                     bin_values=[2.0, 6.0, 12.0, 30.0], pi=[0.1, 0.2, 0.3, 0.4], layer=3, alpha=0.3, eps=1e-3,
                     max_new_tokens=32)
    save_probe(tmp_path / "probe", ProbeMLP(12, 4, 16), spec)
    return tmp_path


@pytest.mark.parametrize("field, value, fragments", [
    ("alpha", None, ["alpha", "None", "> 0"]),
    ("eps", "0.01", ["eps", "'0.01'", "[0, 1)"]),
    ("d", True, ["d must", "True", "bool"]),
    ("max_new_tokens", 32.0, ["max_new_tokens", "32.0"]),
    ("bin_values", [2.0, 6.0, None, 30.0], ["bin_values[2]", "None"]),
    ("bin_edges", [0, 4, "8", 16, 32], ["bin_edges[2]", "'8'"]),
    ("kind", None, ["kind", "None"]),
    ("training", [1], ["training", "[1]"]),
    ("colour", "red", ["unknown field", "colour"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_probe_file_errors_name_the_file_the_field_and_the_value(tiny, reference, probe_dir, field, value, fragments):
    js = probe_dir / "probe.json"
    raw = json.loads(js.read_text())
    raw[field] = value
    js.write_text(json.dumps(raw))

    def bad(engine):
        for path in (probe_dir / "probe", js, probe_dir):       # NAME, NAME.json, the folder
            with pytest.raises(Exception) as excinfo:
                load_probe_params(path)
            _refused(ValueError, str(js), *fragments)(excinfo)
    assert _serve(tiny, bad) == reference


def test_a_probe_folder_means_its_probe_json(probe_dir, tmp_path_factory):
    params, spec = load_probe_params(probe_dir)
    assert spec.layer == 3 and params.alpha == 0.3
    assert load_spec(probe_dir) == load_spec(probe_dir / "probe.json")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match=f"{empty}: a folder without probe.json"):
        load_probe_params(empty)


def test_a_prompt_predictor_returning_nothing_is_a_clear_error(tiny):
    model, probe = tiny
    engine = LLMEngine(model, None, EngineConfig(policy="sjf_prompt", max_model_len=96, prefill_tokens_per_s=1e4,
                                                 num_gpu_blocks=40), prompt_predictor=lambda prompts: [],
                       eos_token_ids=[7])
    with pytest.raises(ValueError, match="prompt_predictor returned 0 values"):
        engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=4))
    assert not engine.has_unfinished()
