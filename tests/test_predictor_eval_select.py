"""What eval-probe evaluates by default, the decoding-settings check, and the trace reader's
validation of records against the header."""
import json
import logging

import pytest

from trail.predictor import bins as B
from trail.predictor.eval_select import choose_requests, settings_differences
from trail.predictor.probe_file import ProbeSpec
from trail.predictor.trace import Trace, TraceRecord, TraceWriter, read_trace

SETTINGS = {"model": "m", "max_new_tokens": 8, "temperature": 0.0, "repetition_penalty": 1.1,
            "eos_token_ids": [2]}


def _rec(i, out, finish):
    return TraceRecord(f"req-{i}", "t", f"p{i}", [1, 5], out, finish)


def _spec(**training):
    return ProbeSpec("layer", "m", 4, 8, [0, 4, 8], [2, 6], [0.5, 0.5], layer=0, max_new_tokens=8,
                     training=training)


def _trace(n=60):
    return Trace(dict(SETTINGS), [_rec(i, [7, 2], "eos") for i in range(n)])


def test_auto_keeps_exactly_what_the_probe_never_saw():
    tr = _trace()
    seen = [r.id for r in tr.records if B.split_of(r.id) != "test"]
    spec = _spec(seen_ids=B.encode_id_set(seen), trace=dict(SETTINGS))
    sub, how = choose_requests(tr, spec)
    assert [r.id for r in sub.records] == [r.id for r in tr.records if B.split_of(r.id) == "test"]
    # a trace with new requests: they are kept, whatever their split
    other = Trace(dict(SETTINGS), tr.records + [_rec(1000 + i, [2], "eos") for i in range(5)])
    sub2, _ = choose_requests(other, spec)
    assert len(sub2) == len(sub) + 5
    # an explicit split still works, --limit and --ids restrict
    assert len(choose_requests(tr, spec, "all")[0]) == 60
    assert len(choose_requests(tr, spec, "all", limit=7)[0]) == 7
    assert [r.id for r in choose_requests(tr, spec, ids=["req-3", "req-1"])[0].records] == ["req-3", "req-1"]
    with pytest.raises(ValueError, match="not in the trace"):
        choose_requests(tr, spec, ids=["nope"])
    with pytest.raises(ValueError, match="split must be"):
        choose_requests(tr, spec, "tset")


def test_auto_without_recorded_ids_falls_back(caplog):
    tr = _trace()
    # looks like the training trace: same size, same settings -> the test split
    sub, how = choose_requests(tr, _spec(trace_requests=60, trace=dict(SETTINGS)))
    assert all(B.split_of(r.id) == "test" for r in sub.records) and "test-split" in how
    # a foreign trace: all of it, with a warning
    with caplog.at_level(logging.WARNING):
        sub, how = choose_requests(tr, _spec(trace_requests=2000, trace=dict(SETTINGS)))
    assert len(sub) == 60 and "pass --split test" in caplog.text


def test_settings_differences_name_the_decoding_keys():
    tr = _trace()
    spec = _spec(trace={"model": "m", "max_new_tokens": 512, "repetition_penalty": 1.1, "backend": "x"})
    assert settings_differences(tr, spec) == {"max_new_tokens": (512, 8)}


def _write(path, records, settings=SETTINGS):
    with open(path, "w") as f:
        f.write(json.dumps({"format": "trail-trace", "version": 1, "settings": settings}) + "\n")
        for r in records:
            f.write(json.dumps(r.__dict__) + "\n")


@pytest.mark.parametrize("rec, msg", [
    (_rec(0, [7, 3], "eos"), "last token 3 is not one of the header's eos_token_ids"),
    (_rec(0, [7, 3, 4], "length"), "finished by 'length' after 3 tokens"),
    (_rec(0, [7, 2, 4, 5, 6, 7, 8, 9], "length"), "EOS id 2 at output position 1"),
    (_rec(0, list(range(3, 12)) + [2], "eos"), "10 output tokens, not in 1..max_new_tokens=8"),
])
def test_trace_reader_checks_records_against_the_header(tmp_path, rec, msg):
    path = tmp_path / "t.jsonl"
    _write(path, [_rec(1, [2], "eos"), rec])
    with pytest.raises(ValueError, match=msg) as e:
        read_trace(path)
    assert "t.jsonl:3" in str(e.value)          # names the line
    assert len(read_trace(path, validate=False)) == 2


def test_trace_reader_needs_max_new_tokens(tmp_path):
    path = tmp_path / "t.jsonl"
    _write(path, [_rec(1, [2], "eos")], settings={"model": "m"})
    with pytest.raises(ValueError, match="max_new_tokens"):
        read_trace(path)
    ok = tmp_path / "ok.jsonl"
    with TraceWriter(ok, SETTINGS) as w:
        w.write(_rec(1, [5, 2], "eos"))
        w.write(_rec(2, [5] * 8, "length"))
    assert len(read_trace(ok)) == 2
