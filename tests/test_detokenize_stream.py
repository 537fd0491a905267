"""Streaming text with stop strings (trail/detokenize.py IncrementalText, push_many) against the
real SmolLM2 tokenizer: the deltas always add up to the final text, the final text is the full
decode of the output cut before the first stop string to complete, and nothing past a stop's
first character is ever streamed - for crafted texts (stops across token boundaries, multi-byte
characters split over tokens, emoji) and random token sequences pushed in random chunks."""
import random

import pytest

from trail.detokenize import IncrementalText, push_many

PROMPT = "Tell me about it."


@pytest.fixture(scope="module")
def tok():
    from trail.assets import smollm2_hf_dir
    from trail.models.loader import load_tokenizer

    try:
        return load_tokenizer(smollm2_hf_dir())
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def reference(tok, ids, stops):
    """The full decode of `ids`, cut before the stop string that completes first (smallest end,
    then earliest start), and that stop string (None)."""
    full = tok.decode(ids, skip_special_tokens=True)
    hits = [(i + len(s), i, s) for s in stops if (i := full.find(s)) >= 0]
    if not hits:
        return full, None
    _, cut, s = min(hits)
    return full[:cut], s


def stream(tok, prompt_ids, ids, stops, chunks=None, rng=None):
    """Pushes `ids` (in chunks of 1..3 tokens when `rng` is given) until a stop, then finish().
    Checks at every push that what was streamed is a prefix of the reference and ends before any
    stop; returns (deltas, detokenizer)."""
    ref, _ = reference(tok, ids, stops)
    det = IncrementalText(tok, prompt_ids, stops)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3) if rng else 1
        delta, stopped = det.push(ids[i:i + n])
        i += n
        deltas.append(delta)
        sent = "".join(deltas)
        assert ref.startswith(sent), (sent, ref)
        assert sent == det.text
        if stopped:
            break
    deltas.append(det.finish())
    return deltas, det


def check(tok, ids, stops, prompt_ids=(), rng=None):
    deltas, det = stream(tok, list(prompt_ids), ids, stops, rng=rng)
    ref, stop = reference(tok, ids, stops)
    assert "".join(deltas) == det.text == ref
    assert det.stop_string == stop and det.stopped == (stop is not None) and det.finished
    return deltas


def test_stop_across_token_boundary_is_never_streamed(tok):
    text = "It is a place where time stops, and a place where we go."
    ids = encode(tok, text)
    deltas = check(tok, ids, ("re t",), encode(tok, PROMPT))
    assert "".join(deltas) == "It is a place whe"
    # " where" came before " time": its "re" was held back, never streamed
    pos = [i for i, d in enumerate(deltas) if d][-1]
    assert not any("re" in d for d in deltas[:pos + 1])
    # the stop's first characters come in one token, its end in the next: held back until then
    det = IncrementalText(tok, encode(tok, PROMPT), ("re t",))
    streamed = ""
    for t in ids:
        delta, stopped = det.push([t])
        streamed += delta
        assert "wher" not in streamed
        if stopped:
            break
    assert stopped and streamed == "It is a place whe" and det.stop_string == "re t"


def test_held_back_tail_is_released_when_no_stop_follows(tok):
    ids = encode(tok, "a place where we go")
    det = IncrementalText(tok, [], ("re t", "gone"))
    out = []
    for t in ids:
        delta, stopped = det.push([t])
        out.append(delta)
        assert not stopped
    # "re" after " where", "go" at the end: held back (either may start a stop)
    assert "".join(out) == "a place where we "
    assert det.held_back == "go"
    assert det.finish() == "go" and det.text == "a place where we go" and not det.stopped


def test_no_stops_streams_everything_decoded(tok):
    ids = encode(tok, "Hello world, this is fine.")
    det = IncrementalText(tok, encode(tok, PROMPT))
    out = "".join(det.push([t])[0] for t in ids)
    assert out == "Hello world, this is fine." and det.finish() == ""


def test_long_output(tok):
    text = "".join(f"Line {i}: naïve café 日本 🙂 ok.\n" for i in range(40)) + "END of it"
    ids = encode(tok, text)
    assert len(ids) > 300
    check(tok, ids, ("D of",), encode(tok, PROMPT))
    check(tok, ids, ("\n\n",), encode(tok, PROMPT), rng=random.Random(1))


@pytest.mark.parametrize("text,stops", [
    ("日本語のテキスト 🙂 café — naïve", ("本語",)),          # stop inside characters split over tokens
    ("日本語のテキスト 🙂 café — naïve", ("🙂 c",)),           # stop starting with an emoji
    ("emoji 🙂🙃😀 end", ("🙃",)),
    ("emoji 🙂🙃😀 end", ("zzz",)),                         # no stop: the whole text
    ("x = a + b\n\n## Next", ("\n\n",)),
    ("The end.</s> more", (".</s>", "end")),                 # two stops: the first to complete wins
    ("abcdef", ("bcd", "abcdefg")),                          # a longer stop's prefix held, a shorter one completes
    ("abcdef", ("cd", "abcd")),                              # both end at d: the longer (earlier) one
])
def test_crafted(tok, text, stops):
    ids = encode(tok, text)
    assert any(tok.decode([t]).endswith("\ufffd") for t in ids) or text.isascii() or "🙂" not in text
    check(tok, ids, stops, encode(tok, PROMPT))
    check(tok, ids, stops, (), rng=random.Random(0))


def test_multibyte_character_waits_for_its_last_token(tok):
    ids = encode(tok, "語")
    assert len(ids) > 1 and tok.decode(ids[:1]).endswith("\ufffd")
    det = IncrementalText(tok, [])
    assert det.push(ids[:1]) == ("", False)
    assert det.push(ids[1:]) == ("語", False)
    # an incomplete character at the end of the output is shown as a full decode shows it
    det = IncrementalText(tok, [])
    det.push(ids[:1])
    assert det.finish() == tok.decode(ids[:1])


def test_prompt_ending_inside_a_character(tok):
    ids = encode(tok, "語語")
    det = IncrementalText(tok, ids[:1])       # the prompt's last token is half a character
    rest = ids[1:]
    deltas = [det.push([t])[0] for t in rest] + [det.finish()]
    assert "".join(deltas) == tok.decode(rest)


def test_special_tokens_skipped_and_after_stop_ignored(tok):
    ids = encode(tok, "one two") + [tok.eos_token_id] + encode(tok, " three")
    det = IncrementalText(tok, [], ("thr",))
    out = "".join(det.push([t])[0] for t in ids)
    assert out == "one two " and det.stopped
    assert det.push(encode(tok, " four")) == ("", True) and det.finish() == ""
    keep = IncrementalText(tok, [], (), skip_special_tokens=False)
    assert "".join(keep.push([t])[0] for t in ids) + keep.finish() == tok.decode(ids)


def _random_ids(rng, tok, n, pool, byte_tokens):
    """Random output ids: common words, single-byte tokens (pieces of multi-byte characters),
    emoji and CJK text, any token, and a few special tokens."""
    out = []
    for _ in range(n):
        r = rng.random()
        out.append(rng.choice(pool) if r < 0.6 else rng.choice(byte_tokens) if r < 0.8
                   else rng.randrange(tok.vocab_size) if r < 0.97 else rng.choice([0, 1, 2]))
    return out


def test_random_sequences_batched(tok):
    """300 random requests in batches of 60 through push_many, 1-3 tokens per step; stop strings
    drawn from each request's own decoded text (so most of them hit, often across tokens)."""
    rng = random.Random(7)
    prompt = encode(tok, PROMPT)
    pool = encode(tok, "the a place where we go time stops 日本語 🙂 😀 café naïve — ok .,\n")
    byte_tokens = sorted(i for s, i in tok.get_vocab().items() if len(s) == 1)[:256]
    checked = stopped_count = 0
    for _ in range(5):
        ids, stops, dets, deltas, pos = [], [], [], [], []
        for _ in range(60):
            seq = _random_ids(rng, tok, rng.randint(1, 40), pool, byte_tokens)
            full = tok.decode(seq, skip_special_tokens=True)
            st = []
            for _ in range(rng.randint(0, 3)):
                if len(full) >= 2:
                    a = rng.randrange(len(full) - 1)
                    st.append(full[a:a + rng.randint(1, 6)])
            if rng.random() < 0.3:
                st.append("\ufffd\ufffdnever")
            ids.append(seq)
            stops.append(tuple(s for s in st if s and "\ufffd" not in s))
            dets.append(IncrementalText(tok, prompt if rng.random() < 0.7 else rng.choice([[], seq[:1]]), stops[-1]))
            deltas.append([])
            pos.append(0)
        refs = [reference(tok, seq, st)[0] for seq, st in zip(ids, stops)]
        live = list(range(60))
        while live:
            chunk = {i: ids[i][pos[i]:pos[i] + rng.randint(1, 3)] for i in live}
            results = push_many([dets[i] for i in live], [chunk[i] for i in live])
            for i, (d, stop) in zip(list(live), results):
                pos[i] += len(chunk[i])
                deltas[i].append(d)
                assert refs[i].startswith("".join(deltas[i]))
                if stop or pos[i] >= len(ids[i]):
                    deltas[i].append(dets[i].finish())
                    live.remove(i)
        for i in range(60):
            ref, stop = reference(tok, ids[i], stops[i])
            assert "".join(deltas[i]) == dets[i].text == ref, (ids[i], stops[i])
            assert dets[i].stop_string == stop
            checked += 1
            stopped_count += stop is not None
    assert checked == 300 and stopped_count > 100
