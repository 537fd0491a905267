"""The predictor pipeline end to end on the real SmolLM2-135M-Instruct (CPU, fp32): 4 prompts x
16 tokens through the `trail` verbs collect -> embed -> train-probe -> eval-probe, plus the layer
convention and the equality of `trail embed` features with our model runner's tap."""
import argparse
import json
import math

import pytest
import torch

from trail.predictor import bins as B
from trail.predictor import prompts as P


def run_verb(argv):
    from trail.predictor.cli_verbs import add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def four_prompts():
    """Short ShareGPT first turns, two hashing into train, one into val, one into test."""
    want, out = {"train": 2, "val": 1, "test": 1}, []
    for p in P.sharegpt_prompts(limit=300):
        s = B.split_of(p.id)
        if want[s] > 0 and len(p.text) < 200:
            want[s] -= 1
            out.append(p)
        if not any(want.values()):
            return out
    pytest.skip("not enough short ShareGPT prompts")


@pytest.fixture(scope="module")
def lm(smollm2_dir):
    from trail.predictor import hf_backend

    return hf_backend.load(smollm2_dir, device="cpu", model_id="HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def pipeline_run(smollm2_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("pred")
    prompts = four_prompts()
    pfile = d / "prompts.jsonl"
    pfile.write_text("".join(json.dumps({"id": p.id, "source": p.source, "text": p.text}) + "\n" for p in prompts))
    common = ["--device", "cpu"]
    assert run_verb(["collect", "--prompts", str(pfile), "--out", str(d / "trace.jsonl"), "--max-new-tokens", "16",
                     "--batch-size", "4"] + common) == 0
    assert run_verb(["embed", str(d / "trace.jsonl"), "--out", str(d / "feats.safetensors"), "--num-decode", "4"] + common) == 0
    assert run_verb(["train-probe", str(d / "trace.jsonl"), "--features", str(d / "feats.safetensors"),
                     "--out", str(d / "probe"), "--sweep-layers", "--epochs", "1"] + common) == 0
    assert run_verb(["eval-probe", str(d / "trace.jsonl"), "--probe", str(d / "probe"), "--out", str(d / "eval"),
                     "--split", "all"] + common) == 0
    return d, prompts


def test_collect_trace(pipeline_run, lm):
    from trail.predictor.hf_backend import chat_ids
    from trail.predictor.trace import read_trace

    d, prompts = pipeline_run
    tr = read_trace(d / "trace.jsonl")
    assert sorted(r.id for r in tr.records) == sorted(p.id for p in prompts)
    assert tr.settings["max_new_tokens"] == 16 and tr.settings["repetition_penalty"] == 1.1
    assert tr.settings["temperature"] == 0.0
    eos = tr.settings["eos_token_ids"]
    for r in tr.records:
        assert r.prompt_ids == chat_ids(lm.tokenizer, r.prompt)
        assert 1 <= r.output_len <= 16
        assert r.hit_cap == (r.output_ids[-1] not in eos)
        assert all(t not in eos for t in r.output_ids[:-1])
    # resume: a second run finds everything done and adds nothing
    before = (d / "trace.jsonl").read_bytes()
    assert run_verb(["collect", "--prompts", str(d / "prompts.jsonl"), "--out", str(d / "trace.jsonl"),
                     "--max-new-tokens", "16", "--device", "cpu"]) == 0
    assert (d / "trace.jsonl").read_bytes() == before
    with pytest.raises(ValueError, match="cannot resume"):
        run_verb(["collect", "--prompts", str(d / "prompts.jsonl"), "--out", str(d / "trace.jsonl"),
                  "--max-new-tokens", "17", "--device", "cpu"])


def test_greedy_trace_matches_model(pipeline_run, lm):
    """Recorded outputs are the model's greedy choices under repetition penalty 1.1: teacher-force
    one request and check every output token is the argmax of the penalised logits."""
    from trail.predictor.trace import read_trace

    d, _ = pipeline_run
    r = read_trace(d / "trace.jsonl").records[0]
    ids = torch.tensor([r.prompt_ids + r.output_ids])
    with torch.no_grad():
        logits = lm.model(ids).logits[0]
    p = len(r.prompt_ids)
    for j, tok in enumerate(r.output_ids):
        row = logits[p + j - 1].clone()
        seen = torch.tensor(sorted(set(r.prompt_ids + r.output_ids[:j])))
        row[seen] = torch.where(row[seen] > 0, row[seen] / 1.1, row[seen] * 1.1)
        top2 = row.topk(2).values
        if top2[0] - top2[1] > 1e-3:         # skip near-ties (batching may flip them)
            assert int(row.argmax()) == tok, f"output token {j}"


def test_probe_files_and_metrics(pipeline_run, lm):
    from trail.predictor.probe_file import load_probe
    from trail.predictor.prompt_predictors import PromptPredictor
    from trail.predictor.trace import read_trace

    d, _ = pipeline_run
    recs = read_trace(d / "trace.jsonl").records
    boe_pp = PromptPredictor(d / "probe" / "prompt_boe", embeddings=lm.input_embeddings.detach(),
                             expect_model=lm.model_id)
    lp = boe_pp.log_probs(prompt_ids=[r.prompt_ids for r in recs])
    assert lp.shape == (4, 10)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4))
    torch.testing.assert_close(lp, boe_pp.log_probs(recs))
    with pytest.raises(ValueError, match="not 'other/model'"):
        PromptPredictor(d / "probe" / "prompt_boe", embeddings=lm.input_embeddings.detach(), expect_model="other/model")
    mlp, spec = load_probe(d / "probe" / "probe", expect_model="HuggingFaceTB/SmolLM2-135M-Instruct", expect_d=576)
    sweep = json.loads((d / "probe" / "sweep.json").read_text())
    assert len(sweep["val_mae_samples"]) == 30 and spec.layer == sweep["chosen"]
    assert spec.bin_edges == B.default_edges(10, 16) and len(spec.pi) == 10
    assert spec.training["train_length_counts"] and spec.validation["filter_grid"]
    assert (d / "probe" / "mae_vs_layer.png").stat().st_size > 1000
    _, boe = load_probe(d / "probe" / "prompt_boe", expect_kind="prompt_boe")
    assert boe.d == 576
    res = json.loads((d / "eval" / "eval.json").read_text())
    assert res["requests"] == 4 and res["layer"] == spec.layer
    names = set(res["methods"])
    for m in ("(i) trail_baseline[boe]", "(ii) prompt_filter[boe]", "(iii) no_feature", "(iv) prefill_probe",
              "(v) trail_every8", "(v) trail_every1", "(vi) filter"):
        assert m in names and math.isfinite(res["methods"][m]["mae"])
    assert (d / "eval" / "mae_vs_generated.png").stat().st_size > 1000
    try:
        from trail.predictor.prompt_predictors import minilm_dir
        minilm_dir()
    except FileNotFoundError:
        return
    assert "(i) trail_baseline[minilm]" in names
    _, mini = load_probe(d / "probe" / "prompt_minilm")
    assert mini.d == 384 and mini.encoder


def test_layer_hooks_follow_the_layer_convention(lm):
    from trail.predictor.hf_backend import chat_ids, forward_layers

    ids = chat_ids(lm.tokenizer, "Name three colours.")
    got = {}
    forward_layers(lm, [ids], [0, 14, 29], lambda layer, s: got.__setitem__(layer, s[0].clone()))
    with torch.no_grad():
        hs = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(got[0], hs[1][0])
    torch.testing.assert_close(got[14], hs[15][0])
    assert (got[29] - hs[30][0]).abs().max() > 1.0      # hs[30] is after the final norm


def test_embed_features_equal_runner_tap(pipeline_run, lm, smollm2_dir, tmp_path):
    """`trail embed --dense-layer L` (transformers hooks) equals our ModelRunner's tap at every
    position, and so do the features embedded through the runner tap backend."""
    from trail.segments import Segment
    from trail.predictor.embed import DenseFeatures, embed_dense, fed_tokens
    from trail.predictor.runner_backend import RunnerTap
    from trail.predictor.trace import read_trace

    d, _ = pipeline_run
    layer = 7
    assert run_verb(["embed", str(d / "trace.jsonl"), "--out", str(tmp_path / "hf.safetensors"),
                     "--dense-layer", str(layer), "--device", "cpu"]) == 0
    hf = DenseFeatures.load(tmp_path / "hf.safetensors")
    tap = RunnerTap(smollm2_dir, layer, "cpu", torch.float32, max_slots=2, max_len=512)
    rn = embed_dense(lm, read_trace(d / "trace.jsonl"), layer, runner_tap=tap, progress=False)
    torch.testing.assert_close(hf.feats.float(), rn.feats.float(), rtol=2e-3, atol=2e-2)
    for i, r in enumerate(read_trace(d / "trace.jsonl").records[:2]):
        seq = fed_tokens(r)
        states = tap.runner.step([Segment(0, seq, 0)]).tap.states
        p = len(r.prompt_ids)
        want = torch.cat([states[:p].mean(0, keepdim=True), states[p:]]).half().float()
        torch.testing.assert_close(hf.request(hf.ids.index(r.id)).float(), want, rtol=2e-3, atol=2e-2)


def test_collect_through_our_runner_matches_transformers(pipeline_run, tmp_path):
    """`trail collect --backend runner` (continuous batching, 1 slot for 2 prompts so the slot is
    reused) gives the same greedy outputs as the transformers-collected trace."""
    from trail.predictor.trace import read_trace

    d, _ = pipeline_run
    ref = read_trace(d / "trace.jsonl")
    recs = ref.records[:2]
    pfile = tmp_path / "p.jsonl"
    pfile.write_text("".join(json.dumps({"id": r.id, "source": r.source, "text": r.prompt}) + "\n" for r in recs))
    assert run_verb(["collect", "--prompts", str(pfile), "--out", str(tmp_path / "t.jsonl"), "--max-new-tokens", "6",
                     "--backend", "runner", "--batch-size", "1", "--max-prompt-tokens", "200", "--device", "cpu"]) == 0
    got = read_trace(tmp_path / "t.jsonl")
    assert got.settings["backend"] == "trail.model_runner"
    for r in recs:
        g = got.by_id()[r.id]
        assert g.prompt_ids == r.prompt_ids
        assert g.output_ids == r.output_ids[:6]
        assert g.finish == ("eos" if r.output_len <= 6 and not r.hit_cap else "length")


def test_eval_probe_reuses_features_and_picks_unseen_requests(pipeline_run, tmp_path, monkeypatch, caplog):
    """The probe records the ids it saw, so on its own training trace the default evaluates just
    the test split; with --features the forward is never run and the numbers are the same;
    --ids / --limit restrict; --record writes the simulator's npz."""
    from trail.predictor import embed as E
    from trail.predictor.recorded import check_recorded
    from trail.predictor.trace import read_trace

    d, _ = pipeline_run
    spec = json.loads((d / "probe" / "probe.json").read_text())
    layer = spec["layer"]
    recs = read_trace(d / "trace.jsonl").records
    test_ids = [r.id for r in recs if B.split_of(r.id) == "test"]
    assert run_verb(["eval-probe", str(d / "trace.jsonl"), "--probe", str(d / "probe"), "--out", str(tmp_path / "a"),
                     "--device", "cpu", "--record", str(tmp_path / "rec.npz")]) == 0
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert a["requests"] == len(test_ids) and "never saw" in a["selection"]
    assert check_recorded(tmp_path / "rec.npz")["layer"] == layer
    assert set(a["ranking"]["admission"]) >= {"boe", "prefill_probe"} and "(vi) filter" in a["ranking"]["alive"]

    assert run_verb(["embed", str(d / "trace.jsonl"), "--out", str(tmp_path / "dense.safetensors"),
                     "--dense-layer", str(layer), "--device", "cpu"]) == 0

    def no_forward(*a, **k):
        raise AssertionError("the forward ran although features were given")

    monkeypatch.setattr(E, "embed_dense", no_forward)
    assert run_verb(["eval-probe", str(d / "trace.jsonl"), "--probe", str(d / "probe"), "--out", str(tmp_path / "b"),
                     "--device", "cpu", "--features", str(tmp_path / "dense.safetensors")]) == 0
    b = json.loads((tmp_path / "b" / "eval.json").read_text())
    for m, v in a["methods"].items():
        assert b["methods"][m]["mae"] == pytest.approx(v["mae"], rel=1e-4, abs=1e-3)
    two = [recs[0].id, recs[1].id]
    assert run_verb(["eval-probe", str(d / "trace.jsonl"), "--probe", str(d / "probe"), "--out", str(tmp_path / "c"),
                     "--device", "cpu", "--features", str(tmp_path / "dense.safetensors"), "--ids", ",".join(two)]) == 0
    assert json.loads((tmp_path / "c" / "eval.json").read_text())["requests"] == 2
    assert run_verb(["eval-probe", str(d / "trace.jsonl"), "--probe", str(d / "probe"), "--out", str(tmp_path / "e"),
                     "--device", "cpu", "--features", str(tmp_path / "dense.safetensors"), "--split", "all",
                     "--limit", "3"]) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["requests"] == 3


def test_eval_probe_bad_probe_path_fails_before_the_model_loads(pipeline_run, tmp_path, monkeypatch, capsys):
    """Bad --probe / --features are argument errors (exit code 2, one line naming the argument), found
    at parse time, before any model loads."""
    from trail.predictor import cli_verbs

    d, _ = pipeline_run

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the --probe path was checked")

    monkeypatch.setattr(cli_verbs, "_load_lm", no_model)
    for extra, says in [(["--probe", tmp_path / "nope"], "nope"),
                        (["--probe", tmp_path], "probe.json"),
                        (["--probe", d / "probe" / "prompt_boe.json"], "eval-probe needs the layer probe"),
                        (["--probe", d / "probe", "--features", tmp_path / "missing.safetensors"],
                         "argument --features: no such file")]:
        with pytest.raises(SystemExit) as exc:
            run_verb(["eval-probe", str(d / "trace.jsonl"), "--out", str(tmp_path), *map(str, extra)])
        assert exc.value.code == 2 and says in capsys.readouterr().err
