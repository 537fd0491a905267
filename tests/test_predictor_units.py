"""Predictor pipeline pieces without a model: prompt readers, traces, bins, probe files,
feature gathering, baselines, and the filter adapter's plumbing around probe_reference."""
import io
import json
import math
import tarfile

import pytest
import torch

from trail.predictor import bins as B
from trail.predictor import prompts as P
from trail.predictor.embed import DenseFeatures, SampledFeatures, probe_inputs
from trail.predictor.probe_file import ProbeMLP, ProbeSpec, load_probe, save_probe
from trail.predictor.trace import TraceRecord, TraceWriter, read_trace


# ---- prompts -------------------------------------------------------------------------------
def test_truncated_sharegpt_file_is_read_object_by_object(tmp_path):
    convs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                               {"from": "gpt", "value": "answer"}]} for i in range(5)]
    convs[2]["conversations"][0]["from"] = "gpt"          # does not start with a human turn
    convs[3]["conversations"] = convs[3]["conversations"][:1]  # one turn only
    text = json.dumps(convs, indent=2)
    cut = text[: text.rfind('"answer"')]                   # cut inside the last conversation
    path = tmp_path / "sg.json"
    path.write_text(cut)
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut)
    out = P.sharegpt_prompts(path)
    assert [p.text for p in out] == ["question 0", "question 1"]
    # small chunks exercise the refill path
    assert len(list(P.iter_json_array(path, chunk_chars=7))) == 4


def test_alpaca_from_json_and_sdist(tmp_path):
    recs = [{"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Translate", "input": "bonjour", "output": "hello"}]
    js = tmp_path / "a.json"
    js.write_text(json.dumps(recs))
    tgz = tmp_path / "llamafactory-0.9.5.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        data = json.dumps(recs).encode()
        info = tarfile.TarInfo("llamafactory-0.9.5/data/alpaca_en_demo.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    for src in (js, tgz):
        out = P.alpaca_prompts(src)
        assert [p.text for p in out] == ["Say hi", "Translate\n\nbonjour"]
        assert out[0].id == P.prompt_id("alpaca", "Say hi")
    with pytest.raises(ValueError, match="expected a .json"):
        P.alpaca_prompts(tmp_path / "x.txt")


# ---- traces --------------------------------------------------------------------------------
def _rec(i, n_out=5, finish="eos"):
    return TraceRecord(f"r{i}", "t", f"prompt {i}", [1, 2, 3 + i], list(range(10, 10 + n_out)), finish)


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz"])
def test_trace_roundtrip_and_resume(tmp_path, name):
    path = tmp_path / name
    settings = {"model": "m", "max_new_tokens": 8, "repetition_penalty": 1.1}
    with TraceWriter(path, settings) as w:
        w.write(_rec(0))
        w.write(_rec(1, 8, "length"))
    with TraceWriter(path, dict(settings, batch_size=3)) as w:   # non-semantic key may differ
        assert w.done == {"r0", "r1"}
        w.write(_rec(2))
    tr = read_trace(path)
    assert [r.id for r in tr.records] == ["r0", "r1", "r2"]
    assert tr.records[1].hit_cap and not tr.records[0].hit_cap and tr.records[1].output_len == 8
    with pytest.raises(ValueError, match="cannot resume.*repetition_penalty"):
        TraceWriter(path, dict(settings, repetition_penalty=1.2))


def test_trace_torn_line_and_bad_files(tmp_path):
    path = tmp_path / "t.jsonl"
    with TraceWriter(path, {"model": "m", "max_new_tokens": 8}) as w:
        w.write(_rec(0))
    with open(path, "a") as f:
        f.write('{"id": "r1", "sour')                      # a killed run
    assert [r.id for r in read_trace(path).records] == ["r0"]
    with TraceWriter(path, {"model": "m", "max_new_tokens": 8}) as w:
        w.write(_rec(1))
    assert [r.id for r in read_trace(path).records] == ["r0", "r1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match="not a trail trace"):
        read_trace(bad)
    with pytest.raises(ValueError, match="finish"):
        TraceRecord("x", "s", "p", [1], [2], "stopped")


# ---- bins ----------------------------------------------------------------------------------
def test_bins():
    edges = B.default_edges(10, 512)
    rem = torch.tensor([0, 51, 52, 511, 512, 900])
    assert B.bin_index(rem, edges).tolist() == [0, 0, 1, 9, 9, 9]
    vals = B.bin_values(rem.float(), edges)
    assert vals[0] == pytest.approx(25.5) and vals[9] == pytest.approx((511 + 512 + 900) / 3)
    assert vals[5] == pytest.approx(0.5 * (edges[5] + edges[6]))   # empty bin: midpoint
    pi = B.label_prior(rem.float(), edges)
    assert sum(pi) == pytest.approx(1) and min(pi) > 0
    for bad, msg in (([0, 10], "at least 3"), ([1, 2, 3], "start at 0"), ([0, 5, 5, 9], "increasing"),
                     ([0, math.inf, 9], "finite")):
        with pytest.raises(ValueError, match=msg):
            B.validate_edges(bad)
    assert B.parse_edges("0,32,64,inf")[-1] == math.inf
    splits = [B.split_of(f"id{i}") for i in range(4000)]
    assert splits == [B.split_of(f"id{i}") for i in range(4000)]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(frac["test"] - 0.1) < 0.02 and abs(frac["val"] - 0.1) < 0.02


# ---- probe files ---------------------------------------------------------------------------
def _probe(d=12, k=4, h=16):
    torch.manual_seed(0)
    mlp = ProbeMLP(d, k, h)
    spec = ProbeSpec(kind="layer", model="org/model", d=d, h=h, bin_edges=[0, 4, 8, 16, math.inf],
                     bin_values=[2.0, 6.0, 12.0, 30.0], pi=[0.1, 0.2, 0.3, 0.4], layer=3,
                     alpha=0.3, eps=1e-3, max_new_tokens=32, training={"rows": 5})
    return mlp, spec


def test_probe_file_roundtrip(tmp_path):
    mlp, spec = _probe()
    st, js = save_probe(tmp_path / "probe", mlp, spec)
    assert st.name == "probe.safetensors" and js.name == "probe.json"
    mlp2, spec2 = load_probe(tmp_path / "probe.json", expect_model="org/model", expect_d=12)
    assert spec2 == spec
    x = torch.randn(3, 12)
    assert torch.equal(mlp(x), mlp2(x))
    from safetensors.torch import load_file
    assert set(load_file(str(st))) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert load_file(str(st))["fc1.weight"].shape == (16, 12)


def _edit_json(path, **changes):
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("case, msg", [
    ("wrong_d", "d=12 does not match the model's 64"),
    ("wrong_model", "trained for model 'org/model', not 'other/model'"),
    ("bad_edges", "strictly increasing"),
    ("edges_vs_values", "bin_values must hold 3"),
    ("json_d_vs_weights", "fc1.weight has shape"),
    ("corrupt_weights", "unreadable safetensors"),
    ("missing_tensor", "tensors .* != expected"),
    ("not_json", "not valid JSON"),
    ("bad_pi", "pi must be positive and sum to 1"),
])
def test_probe_file_errors(tmp_path, case, msg):
    mlp, spec = _probe()
    st, js = save_probe(tmp_path / "p", mlp, spec)
    kw = {}
    if case == "wrong_d":
        kw["expect_d"] = 64
    elif case == "wrong_model":
        kw["expect_model"] = "other/model"
    elif case == "bad_edges":
        _edit_json(js, bin_edges=[0, 8, 4, 16, 32])
    elif case == "edges_vs_values":
        _edit_json(js, bin_edges=[0, 4, 8, 16])
    elif case == "json_d_vs_weights":
        _edit_json(js, d=13)
    elif case == "corrupt_weights":
        st.write_bytes(st.read_bytes()[:100])
    elif case == "missing_tensor":
        from safetensors.torch import save_file
        sd = {k: v for k, v in mlp.state_dict().items() if k != "fc2.bias"}
        save_file(sd, str(st))
    elif case == "not_json":
        js.write_text("{nope")
    elif case == "bad_pi":
        _edit_json(js, pi=[0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=msg):
        load_probe(tmp_path / "p", **kw)


# ---- features and training pieces ---------------------------------------------------------
def test_probe_inputs_gathers_the_right_positions():
    torch.manual_seed(0)
    states = torch.randn(2, 9, 4)
    plen = torch.tensor([3, 5])
    g = torch.tensor([[0, 1, 4, -1], [0, 2, 3, 4]])
    out = probe_inputs(states, plen, g)
    torch.testing.assert_close(out[0, 0], states[0, :3].mean(0))
    torch.testing.assert_close(out[1, 0], states[1, :5].mean(0))
    torch.testing.assert_close(out[0, 1], states[0, 3])       # g=1 -> position P + g - 1
    torch.testing.assert_close(out[0, 2], states[0, 6])
    assert torch.all(out[0, 3] == 0)
    torch.testing.assert_close(out[1, 3], states[1, 8])


def test_standardisation_is_folded_into_fc1():
    from trail.predictor.train_probe import TrainConfig, _fold_standardisation, train_mlp

    torch.manual_seed(0)
    x = torch.randn(256, 6) * torch.tensor([1, 10, 100, 0.1, 1, 5]) + 40
    mu, sd = x.mean(0), x.std(0)
    a = ProbeMLP(6, 4, 32)
    b = ProbeMLP(6, 4, 32)
    b.load_state_dict(a.state_dict())
    _fold_standardisation(b, mu, sd)
    torch.testing.assert_close(b(x), a((x - mu) / sd), rtol=1e-4, atol=1e-4)

    rem = (x[:, 1] - 40).abs() * 3 + 1
    y = B.bin_index(rem, [0, 4, 8, 16, 1e9])
    vals = B.bin_values(rem, [0, 4, 8, 16, 1e9])
    mlp, info = train_mlp(x, y, x[:64], rem[:64], torch.full((64,), 1e9), vals, 4,
                          TrainConfig(hidden=32, epochs=30, patience=30, batch_size=64))
    with torch.no_grad():
        ce = float(torch.nn.functional.cross_entropy(mlp(x), y))
    assert ce < 0.8 * math.log(4), ce       # learned something, on raw (unstandardised) inputs
    assert info["history"][-1]["train_nll"] < info["history"][0]["train_nll"]


def test_no_feature_baseline_matches_brute_force():
    from trail.predictor.eval_probe import no_feature_estimate

    lens = [3, 3, 7, 10, 16, 16, 16]
    counts = torch.bincount(torch.tensor(lens), minlength=17).tolist()
    spec = ProbeSpec("layer", "m", 4, 8, [0, 8, 16, 32], [4, 12, 20], [0.3, 0.3, 0.4], layer=0,
                     max_new_tokens=16, training={"train_length_counts": counts})
    g = torch.arange(0, 16)
    est = no_feature_estimate(spec, g)
    for gi, e in zip(g.tolist(), est.tolist()):
        alive = [L - gi for L in lens if L > gi]
        assert e == pytest.approx(sum(alive) / len(alive))


def _dense(n=3, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor([5, 1, 9][:n], dtype=torch.int32)
    cu = torch.zeros(n + 1, dtype=torch.int64)
    cu[1:] = lens.long().cumsum(0)
    return DenseFeatures([f"r{i}" for i in range(n)], 2, torch.randn(int(cu[-1]), d, generator=gen).half(),
                         cu, lens, torch.tensor([False, False, True]))


@pytest.mark.parametrize("rule, every", [("bayes", 1), ("trail", 8)])
def test_filter_adapter_batches_like_one_request_at_a_time(rule, every):
    """The adapter runs all requests as slots of one state; the result must equal running each
    request alone through probe_reference, step by step."""
    from trail.predictor.filter_adapter import probe_params, run_filter
    from trail_kernels.probe_reference import probe_reference
    from trail_kernels.probe_state import ProbeState
    from trail_kernels.row_flags import FIRST_CHUNK, LAST_CHUNK, PREFILL

    d, k = 8, 4
    mlp, spec = _probe(d=d, k=k, h=16)
    spec.d = d
    dense = _dense(d=d)
    params = probe_params(mlp, spec, rule=rule, update_every=every)
    got = run_filter(params, dense, 12)
    i32 = dict(dtype=torch.int32)
    for i in range(3):
        st = ProbeState.for_params(params, max_slots=1, max_rows=1)
        rows = dense.request(i)
        for gi in range(int(dense.total_len[i])):
            flags = PREFILL | FIRST_CHUNK | LAST_CHUNK if gi == 0 else 0
            r = probe_reference(rows[gi: gi + 1].contiguous(), torch.tensor([0, 1], **i32), torch.tensor([0], **i32),
                                torch.tensor([flags], **i32), torch.tensor([gi], **i32), torch.tensor([12], **i32),
                                params, st)
            assert got[int(dense.cu[i]) + gi].item() == pytest.approx(r[0].item(), rel=1e-5, abs=1e-5)


def test_filter_adapter_prior_without_evidence_only_drifts():
    """(ii)/(iv) machinery: with update_every=NEVER the readout depends on the starting
    distribution, never on the features."""
    from trail.predictor.filter_adapter import NEVER, probe_params, run_filter

    mlp, spec = _probe(d=8)
    spec.d = 8
    dense = _dense(d=8)
    params = probe_params(mlp, spec, update_every=NEVER)
    init = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 3))
    a = run_filter(params, dense, 12, init_log_post=init)
    dense.feats = torch.randn_like(dense.feats.float()).half()
    b = run_filter(params, dense, 12, init_log_post=init)
    torch.testing.assert_close(a, b)
    # request 2 (9 positions): expected remaining never increases as mass only moves down
    seq = a[int(dense.cu[2]): int(dense.cu[3])]
    assert torch.all(seq[1:] <= seq[:-1] + 1e-5)


def test_sampled_features_save_load(tmp_path):
    f = SampledFeatures(["a", "b"], [0, 3], torch.randn(2, 2, 3, 4).half(), torch.tensor([[0, 1, -1], [0, 2, 5]], dtype=torch.int32),
                        torch.tensor([2, 7], dtype=torch.int32), torch.tensor([False, True]), {"model": "m"})
    f.save(tmp_path / "f.safetensors")
    g = SampledFeatures.load(tmp_path / "f.safetensors")
    assert g.ids == f.ids and g.layers == f.layers and torch.equal(g.feats, f.feats) and g.meta["model"] == "m"
    req, slot, gg, rem = g.rows()
    assert gg.tolist() == [0, 1, 0, 2, 5] and rem.tolist() == [2, 1, 7, 5, 2]
    with pytest.raises(ValueError, match="expected dense"):
        DenseFeatures.load(tmp_path / "f.safetensors")


def test_shipped_probe_dir_names_what_is_missing():
    from trail.predictor.probe_file import shipped_probe_dir

    with pytest.raises(FileNotFoundError, match="no probe shipped for org/NoSuchModel"):
        shipped_probe_dir("org/NoSuchModel")
