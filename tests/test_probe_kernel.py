"""The fused probe kernel (trail_kernels/probe_triton.py): the Triton path and `probe_reference` against
an independent float64 filter that walks each request step by step with the transition as an
explicit matrix, plus the properties the engine relies on (rows sum to 1, no NaN, scratch slot
isolation, chunked == one-shot prefill, recompute leaves state intact, CUDA-graph replay).

On CPU the Triton path runs under TRITON_INTERPRET=1 with small shapes; the `gpu` tests repeat
the same checks at model shapes, in bf16, and inside a CUDA graph."""
import math

import pytest
import torch

from sm90_compile import compile_for_sm90
from tolerances import assert_close_ulps
from trail_kernels.probe import probe_step
from trail_kernels.probe_params import POW_BITS, ProbeParams, transition_matrix
from trail_kernels.probe_reference import log_predict, probe_reference
from trail_kernels.probe_state import ProbeState
from trail_kernels.probe_validation import validate_step
from trail_kernels.row_flags import FIRST_CHUNK, LAST_CHUNK, PREFILL, RECOMPUTE

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log")

PF_ONESHOT = PREFILL | FIRST_CHUNK | LAST_CHUNK
STATE_FIELDS = ("log_post", "pool_sum", "pool_count", "post_gen", "upd_gen", "expected_remaining")


# ---------------------------------------------------------------------------------------------
# The float64 filter, written from DESIGN.md independently of the module under test
# ---------------------------------------------------------------------------------------------
def explicit_transition(edges, values):
    k = len(values)
    widths = [edges[i + 1] - edges[i] for i in range(k)]
    if math.isinf(edges[-1]):
        widths[-1] = values[-1] - edges[-2] + 1
    t = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        move = 0.0 if i == 0 else 1.0 / widths[i]
        t[i, i] = 1.0 - move
        if i > 0:
            t[i - 1, i] = move
    return t


class Filter64:
    def __init__(self, params: ProbeParams, num_slots: int, scratch: int):
        self.w1, self.b1 = params.fc1_weight.double().cpu(), params.fc1_bias.double().cpu()
        self.w2, self.b2 = params.fc2_weight.double().cpu(), params.fc2_bias.double().cpu()
        edges = params.bin_edges.double().cpu().tolist()
        self.values = params.bin_values.double().cpu()
        self.t = explicit_transition(edges, self.values.tolist())
        self.pi = params.log_prior.double().cpu().exp()
        self.k = params.num_bins
        self.alpha, self.eps, self.rule, self.every = params.alpha, params.eps, params.rule, params.update_every
        self.scratch = scratch
        self.slots = {s: dict(p=torch.full((self.k,), 1.0 / self.k, dtype=torch.float64),
                              sum=torch.zeros(self.w1.shape[1], dtype=torch.float64), cnt=0, post=0, upd=0,
                              out=0.0) for s in range(num_slots)}

    def q(self, x):
        return torch.softmax(torch.relu(x @ self.w1.T + self.b1) @ self.w2.T + self.b2, -1)

    def floor(self, p):
        p = p / p.sum()
        return (p + self.eps / self.k) / (1 + self.eps)

    def step(self, states, cu, slots, flags, gens, max_news):
        x = states.double().cpu()
        for i, (s, f, g, mn) in enumerate(zip(slots, flags, gens, max_news)):
            if s == self.scratch or f & RECOMPUTE:
                continue
            st = self.slots[s]
            toks = x[cu[i]:cu[i + 1]]
            if f & PREFILL:
                if f & FIRST_CHUNK:
                    st["sum"], st["cnt"] = torch.zeros_like(st["sum"]), 0
                st["sum"] = st["sum"] + toks.sum(0)
                st["cnt"] += toks.shape[0]
                if not f & LAST_CHUNK:
                    continue
                st["p"] = self.floor(self.q(st["sum"] / st["cnt"]))
                st["post"] = st["upd"] = g
            else:
                p = st["p"]
                for _ in range(max(g - st["post"], 0)):
                    p = self.t @ p
                if g - st["upd"] >= self.every:
                    q = self.q(toks[-1])
                    p = p * q if self.rule == "trail" else p * (q / self.pi) ** self.alpha
                    p = self.floor(p)
                    st["upd"] = g
                st["p"] = p / p.sum()
                st["post"] = g
            cap = max(mn - g, 0)
            st["out"] = float((st["p"] * torch.clamp(self.values, max=cap)).sum())


# ---------------------------------------------------------------------------------------------
# Scenario: prompts in chunks, decodes with jumps, recompute, padded rows, small caps
# ---------------------------------------------------------------------------------------------
def make_step(segments, d, gen, device, dtype):
    """segments: (slot, flags, n_tokens, num_generated, max_new_tokens) -> launcher tensors."""
    lens = [seg[2] for seg in segments]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    states = torch.randn(cu[-1], d, generator=gen).to(device, dtype)
    return dict(states=states, cu_seqlens=i32(cu), slot_ids=i32([s[0] for s in segments]),
                flags=i32([s[1] for s in segments]), num_generated=i32([s[3] for s in segments]),
                max_new_tokens=i32([s[4] for s in segments]))


def scenario(gen, max_slots, extra_decode_steps=3):
    """A list of steps (segment lists) over five requests A..E on shuffled slots."""
    perm = torch.randperm(max_slots, generator=gen).tolist()
    a, b, c, dd, e = perm[:5]
    pad = max_slots

    def pads(n):
        return [(pad, 0, 1, int(torch.randint(0, 50, (1,), generator=gen)), 9) for _ in range(n)]

    steps = [
        [(a, PF_ONESHOT, 5, 0, 40), (b, PREFILL | FIRST_CHUNK, 4, 0, 30), (c, PF_ONESHOT, 1, 0, 6),
         (dd, PF_ONESHOT | RECOMPUTE, 3, 2, 10)],
        [(a, 0, 1, 1, 40), (b, PREFILL, 3, 0, 30), (c, 0, 1, 1, 6)],
        [(a, 0, 1, 2, 40), (c, 0, 1, 4, 6)] + pads(3),
        [(b, PREFILL | LAST_CHUNK, 2, 0, 30), (a, 0, 1, 3, 40), (e, PF_ONESHOT, 7, 0, 500)],
        [(a, PREFILL | FIRST_CHUNK | RECOMPUTE, 6, 3, 40), (b, 0, 1, 1, 30), (c, 0, 1, 5, 6), (e, 0, 1, 1, 500)],
        [(a, PREFILL | LAST_CHUNK | RECOMPUTE, 2, 4, 40), (b, 0, 1, 2, 30), (e, 0, 1, 2, 500)],
        [(a, 0, 1, 5, 40), (b, 0, 1, 3, 30), (c, 0, 1, 6, 6), (e, 0, 1, 3, 500)] + pads(2),
        # C finished; a new request takes its slot (chunked prompt: the pool must restart)
        [(c, PREFILL | FIRST_CHUNK, 2, 0, 25), (a, 0, 1, 6, 40)],
        [(c, PREFILL | LAST_CHUNK, 3, 0, 25), (b, 0, 1, 4, 30)],
    ]
    gens = {a: 6, b: 4, c: 0, e: 3}
    caps = {a: 40, b: 30, c: 25, e: 500}
    for _ in range(extra_decode_steps):
        rows = []
        for s in gens:
            gens[s] += int(torch.randint(1, 4, (1,), generator=gen)) if torch.rand(1, generator=gen) < 0.3 else 1
            rows.append((s, 0, 1, gens[s], caps[s]))
        order = torch.randperm(len(rows), generator=gen).tolist()
        steps.append([rows[i] for i in order] + pads(int(torch.randint(0, 3, (1,), generator=gen))))
    return steps


def run_scenario(params, steps, device, dtype, gen, max_slots, impl, tol, config=None):
    d = params.hidden_size
    state = ProbeState.for_params(params, max_slots=max_slots, max_rows=64, device=device)
    ref_state = state.clone()
    model = Filter64(params, state.num_slots, state.scratch_slot)
    for segments in steps:
        step = make_step(segments, d, gen, device, dtype)
        has_prefill = any(s[1] & PREFILL for s in segments)
        probe_step(**step, params=params, state=state, has_prefill=has_prefill, impl=impl, config=config)
        probe_reference(**step, params=params, state=ref_state, has_prefill=has_prefill)
        model.step(step["states"], step["cu_seqlens"].tolist(), step["slot_ids"].tolist(),
                   step["flags"].tolist(), step["num_generated"].tolist(), step["max_new_tokens"].tolist())
        compare_states(state, ref_state, model, tol)
    assert int(state.tile_counters.abs().sum()) == 0
    return state


def compare_states(state, ref_state, model, tol):
    """Probabilities within `tol`; expected lengths within tol * K * max(value) (a probability
    error of tol per bin, times the largest bin value)."""
    real = torch.arange(state.max_slots)
    post = state.log_post.cpu().double().exp()
    out_tol = tol * model.k * float(model.values.max())
    torch.testing.assert_close(post[real], ref_state.log_post[real].cpu().double().exp(), rtol=0, atol=tol,
                               msg=lambda m: f"posterior vs reference: {m}")
    torch.testing.assert_close(state.expected_remaining[real].cpu(), ref_state.expected_remaining[real].cpu(),
                               rtol=0, atol=out_tol, msg=lambda m: f"expected remaining vs reference: {m}")
    torch.testing.assert_close(state.pool_sum[real].cpu(), ref_state.pool_sum[real].cpu(), rtol=tol, atol=tol)
    for name in ("pool_count", "post_gen", "upd_gen"):
        assert torch.equal(getattr(state, name)[real].cpu(), getattr(ref_state, name)[real].cpu()), name
    for s in range(state.max_slots):
        st = model.slots[s]
        torch.testing.assert_close(post[s], st["p"], rtol=0, atol=tol, msg=lambda m: f"slot {s} posterior: {m}")
        assert abs(float(state.expected_remaining[s]) - st["out"]) <= out_tol, (s, float(state.expected_remaining[s]),
                                                                               st["out"])
        assert int(state.post_gen[s]) == st["post"] and int(state.upd_gen[s]) == st["upd"]
        torch.testing.assert_close(state.pool_sum[s].cpu().double(), st["sum"], rtol=tol, atol=tol)
    torch.testing.assert_close(post.sum(-1), torch.ones(state.num_slots, dtype=torch.float64), atol=1e-5, rtol=0)


CPU_CASES = [
    # d, h, K, rule, eps, alpha, update_every, open_ended
    (48, 40, 10, "bayes", 1e-3, 0.7, None, True),
    (100, 64, 5, "trail", 0.0, 1.0, 2, False),
    (33, 16, 3, "bayes", 0.0, 1.3, None, False),
    (40, 32, 17, "bayes", 1e-6, 0.5, 3, True),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"d{c[0]}-h{c[1]}-K{c[2]}-{c[3]}")
def test_triton_matches_reference_and_float64_filter(case, seeded):
    d, h, k, rule, eps, alpha, every, open_ended = case
    params = ProbeParams.random(d, h, k, generator=seeded, open_ended=open_ended, scale=4.0, max_len=64,
                                rule=rule, eps=eps, alpha=alpha, update_every=every)
    run_scenario(params, scenario(seeded, 7), "cpu", torch.float32, seeded, 7, "triton", 2e-5)


def test_reference_matches_float64_filter_many_shapes(seeded):
    for d, h, k in [(8, 16, 1), (20, 24, 2), (130, 70, 12), (64, 512, 10)]:
        params = ProbeParams.random(d, h, k, generator=seeded, open_ended=k > 1, scale=3.0, max_len=40, eps=1e-4,
                                    alpha=0.8)
        run_scenario(params, scenario(seeded, 9, extra_decode_steps=4), "cpu", torch.float32, seeded, 9,
                     "reference", 2e-5)


def test_multiple_row_tiles_and_tile_configs(seeded):
    """More rows than one BLOCK_M tile, several h blocks, odd d; counters reset after each launch."""
    params = ProbeParams.random(37, 48, 10, generator=seeded, scale=3.0, max_len=100, eps=1e-5)
    max_slots = 30
    prompts = [(s, PF_ONESHOT, 2, 0, 80) for s in range(max_slots)]
    decodes = [[(s, 0, 1, g, 80) for s in torch.randperm(max_slots, generator=seeded).tolist()]
               + [(max_slots, 0, 1, 0, 0)] * 5 for g in (1, 2, 4)]
    for config in (None, dict(BLOCK_M=32, BLOCK_H=16, BLOCK_D=32)):
        run_scenario(params, [prompts] + decodes, "cpu", torch.float32, seeded, max_slots, "triton", 2e-5,
                     config=config)


def test_transition_tables_match_repeated_steps():
    edges = torch.tensor([0, 3, 10, 11, 40, math.inf], dtype=torch.float64)
    values = torch.tensor([1.0, 6.0, 10.0, 25.0, 90.0], dtype=torch.float64)
    params = ProbeParams(torch.zeros(4, 2), torch.zeros(4), torch.zeros(5, 4), torch.zeros(5), edges, values,
                         torch.zeros(5))
    t = explicit_transition(edges.tolist(), values.tolist())
    assert torch.allclose(transition_matrix(params.move_prob), t)
    assert params.move_prob[-1].item() == pytest.approx(1 / (90 - 40 + 1))
    assert torch.allclose(t.sum(0), torch.ones(5, dtype=torch.float64))
    for j in range(POW_BITS):
        exact = torch.linalg.matrix_power(t, 2 ** j).T
        table = params.log_transition_pows[j, :5, :5].double()
        if j < 8:
            torch.testing.assert_close(table.exp(), exact, atol=1e-6, rtol=0)
        reachable = exact > 1e-300
        torch.testing.assert_close(table[reachable], exact[reachable].log(), atol=1e-4, rtol=1e-5)
        assert torch.isneginf(params.log_transition_pows[j, 5:]).all()
    # bin 0 can never move up: the log table keeps those entries at -inf (exact zeros)
    assert torch.isneginf(params.log_transition_pows[:, 0, 1:5]).all()
    p = torch.rand(3, 5, dtype=torch.float64)
    s = torch.tensor([0, 13, 1000])
    expected = torch.stack([torch.linalg.matrix_power(t, int(n)) @ p[i] for i, n in enumerate(s)])
    out = log_predict(p.log(), params.log_transition_pows.double(), s).exp()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_large_step_jump_matches_explicit_matrix_power(impl, seeded):
    params = ProbeParams.random(16, 16, 6, generator=seeded, open_ended=True, max_len=600, eps=0.0, scale=2.0)
    state = ProbeState.for_params(params, max_slots=2, max_rows=4)
    model = Filter64(params, 3, 2)
    for segs in ([(0, PF_ONESHOT, 3, 0, 5000), (1, PF_ONESHOT, 2, 0, 5000)],
                 [(0, 0, 1, 700, 5000), (1, 0, 1, 2 ** POW_BITS + 50, 5000)]):
        step = make_step(segs, 16, seeded, "cpu", torch.float32)
        probe_step(**step, params=params, state=state, impl=impl)
        if segs[0][3] == 0:
            model.step(step["states"], step["cu_seqlens"].tolist(), step["slot_ids"].tolist(),
                       step["flags"].tolist(), step["num_generated"].tolist(), step["max_new_tokens"].tolist())
    # slot 0 jumped 700 steps: the explicit filter walks them one by one
    m = model.slots[0]
    p = m["p"]
    for _ in range(700):
        p = model.t @ p
    q = model.q(step["states"][0].double())
    p = p * (q / model.pi) ** model.alpha
    torch.testing.assert_close(state.log_post[0].double().exp(), p / p.sum(), atol=2e-5, rtol=0)
    # slot 1 jumped past the clamp (2^16 - 1 steps): finite, normalised, mass near bin 0
    row = state.log_post[1].exp()
    assert torch.isfinite(row).all() and abs(row.sum().item() - 1) < 1e-5 and row[0] > 0.5


# ---------------------------------------------------------------------------------------------
# Numerical edge cases
# ---------------------------------------------------------------------------------------------
def _fixed_logits_params(logits, **kwargs):
    """A probe whose output ignores the input: logits = fc2 bias."""
    k = len(logits)
    edges = torch.linspace(0, 10 * k, k + 1, dtype=torch.float64)
    return ProbeParams(torch.zeros(16, 8), torch.zeros(16), torch.zeros(k, 16), torch.tensor(logits),
                       edges, (edges[:-1] + edges[1:]) / 2, torch.full((k,), -math.log(k)), **kwargs)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_extreme_logits_stay_finite_and_normalised(impl, eps, seeded):
    k = 10
    big = [3e4 if i == 7 else -3e4 for i in range(k)]
    params = _fixed_logits_params(big, eps=eps, alpha=2.0)
    state = ProbeState.for_params(params, max_slots=3, max_rows=4)
    state.log_post[1] = torch.tensor([0.0] + [-5e4] * (k - 1))          # all mass in bin 0
    state.log_post[2] = torch.full((k,), -1e3)                             # unnormalised: e^-1000
    state.post_gen[1:3] = 4
    state.upd_gen[1:3] = 4
    step = make_step([(0, PF_ONESHOT, 3, 0, 100), (1, 0, 1, 5, 100), (2, 0, 1, 6, 100)], 8, seeded, "cpu",
                     torch.float32)
    probe_step(**step, params=params, state=state, impl=impl)
    post = state.log_post[:3]
    assert not torch.isnan(post).any()
    probs = post.exp()
    assert_close_ulps(probs.sum(-1), torch.ones(3), ulps=32)
    assert (probs.argmax(-1) == 7).all()   # the evidence (6e4 nats) beats the prior (5e4 nats)
    assert torch.isfinite(state.expected_remaining[:3]).all()


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_every_bin_underflowing_in_linear_space(impl, seeded):
    """prior: bin 0 with the rest at e^-200; evidence: bin K-1 with the rest at e^-200. In fp32
    linear space every product is e^-200 or less = 0; in log space the answer is exact."""
    k = 6
    params = _fixed_logits_params([-200.0] * (k - 1) + [0.0], eps=0.0)
    state = ProbeState.for_params(params, max_slots=1, max_rows=2)
    prior = torch.tensor([0.0] + [-200.0] * (k - 1))
    state.log_post[0] = prior - torch.logsumexp(prior, 0)
    assert (state.log_post[0].exp() * torch.softmax(params.fc2_bias, 0)).max() == 0   # underflows in fp32
    step = make_step([(0, 0, 1, 1, 1000)], 8, seeded, "cpu", torch.float32)
    probe_step(**step, params=params, state=state, impl=impl)
    model = Filter64(params, 2, 1)
    model.slots[0]["p"] = torch.softmax(prior.double(), 0)
    model.step(step["states"], [0, 1], [0], [0], [1], [1000])
    got = state.log_post[0].double().exp()
    assert torch.isfinite(state.log_post[0]).all() and abs(got.sum().item() - 1) < 1e-6
    torch.testing.assert_close(got, model.slots[0]["p"], atol=1e-6, rtol=1e-5)
    assert got[0] > 0.1 and got[-1] > 0.1   # both modes survive; no all-zero row


# ---------------------------------------------------------------------------------------------
# Engine-facing properties
# ---------------------------------------------------------------------------------------------
def _started_state(params, max_slots, gen, impl):
    state = ProbeState.for_params(params, max_slots=max_slots, max_rows=32)
    step = make_step([(s, PF_ONESHOT, 2, 0, 50) for s in range(max_slots)], params.hidden_size, gen, "cpu",
                     torch.float32)
    probe_step(**step, params=params, state=state, impl=impl)
    return state


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_padded_rows_touch_only_the_scratch_slot(impl, seeded):
    params = ProbeParams.random(24, 32, 10, generator=seeded, scale=3.0, max_len=64, eps=1e-4)
    state = _started_state(params, 6, seeded, impl)
    before = state.clone()
    step = make_step([(4, 0, 1, 1, 50), (1, 0, 1, 1, 50)] + [(6, 0, 1, 3, 50)] * 6, 24, seeded, "cpu",
                     torch.float32)
    probe_step(**step, params=params, state=state, has_prefill=False, impl=impl)
    untouched = [0, 2, 3, 5]
    for name in STATE_FIELDS:
        assert torch.equal(getattr(state, name)[untouched], getattr(before, name)[untouched]), name
    for s in (4, 1):
        assert not torch.equal(state.log_post[s], before.log_post[s])
    assert not torch.equal(state.log_post[6], before.log_post[6])


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_chunked_prefill_equals_one_shot(impl, seeded):
    params = ProbeParams.random(40, 32, 10, generator=seeded, scale=4.0, max_len=64, eps=1e-4)
    state = ProbeState.for_params(params, max_slots=4, max_rows=8)
    prompt = torch.randn(11, 40, generator=seeded)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    # slot 3: one shot; slot 1: chunks of 4, 5, 2 tokens over three steps, beside other work
    probe_step(prompt, i32([0, 11]), i32([3]), i32([PF_ONESHOT]), i32([0]), i32([70]), params, state, impl=impl)
    other = torch.randn(11, 40, generator=seeded)
    chunks = [(0, 4, PREFILL | FIRST_CHUNK), (4, 9, PREFILL), (9, 11, PREFILL | LAST_CHUNK)]
    for i, (lo, hi, fl) in enumerate(chunks):
        states = torch.cat([other[:3], prompt[lo:hi]])
        probe_step(states, i32([0, 3, 3 + hi - lo]), i32([0, 1]), i32([PF_ONESHOT, fl]), i32([0, 0]),
                   i32([70, 70]), params, state, impl=impl)
        assert int(state.pool_count[1]) == hi
    # chunked sums add in another order: a few ulps of the summed magnitudes (11 tokens)
    assert_close_ulps(state.pool_sum[1], state.pool_sum[3], ulps=64)
    assert_close_ulps(state.log_post[1], state.log_post[3], ulps=64)
    assert_close_ulps(state.expected_remaining[1], state.expected_remaining[3], ulps=64)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_recompute_rows_leave_the_slot_intact(impl, seeded):
    params = ProbeParams.random(24, 32, 10, generator=seeded, scale=3.0, max_len=64, eps=1e-4)
    state = _started_state(params, 3, seeded, impl)
    step = make_step([(0, 0, 1, 1, 50), (1, 0, 1, 1, 50), (2, 0, 1, 1, 50)], 24, seeded, "cpu", torch.float32)
    probe_step(**step, params=params, state=state, impl=impl)
    before = state.clone()
    for fl in (PREFILL | FIRST_CHUNK | RECOMPUTE, PREFILL | RECOMPUTE, PF_ONESHOT | RECOMPUTE):
        step = make_step([(1, fl, 9, 2, 50), (0, 0, 1, 2, 50)], 24, seeded, "cpu", torch.float32)
        probe_step(**step, params=params, state=state, impl=impl)
    for name in STATE_FIELDS:
        assert torch.equal(getattr(state, name)[1], getattr(before, name)[1]), name
    assert not torch.equal(state.log_post[0], before.log_post[0])


def test_triton_is_deterministic_and_matches_dispatch(seeded):
    params = ProbeParams.random(24, 48, 10, generator=seeded, scale=3.0, max_len=64, eps=1e-4)
    state = _started_state(params, 5, seeded, "triton")
    twin, ref = state.clone(), state.clone()
    step = make_step([(s, 0, 1, 1, 50) for s in (3, 0, 4, 1)], 24, seeded, "cpu", torch.float32)
    probe_step(**step, params=params, state=state, impl="triton")
    probe_step(**step, params=params, state=twin, impl="triton")
    probe_step(**step, params=params, state=ref)          # auto on CPU: the reference
    for name in STATE_FIELDS:
        assert torch.equal(getattr(state, name), getattr(twin, name)), name
    assert_close_ulps(state.log_post, ref.log_post)


def test_out_of_range_slots_are_skipped_by_the_kernel_and_rejected_by_validation(seeded):
    params = ProbeParams.random(16, 16, 4, generator=seeded, scale=2.0, max_len=40)
    state = _started_state(params, 2, seeded, "triton")
    before = state.clone()
    step = make_step([(0, 0, 1, 1, 40), (7, 0, 1, 1, 40), (-1, 0, 1, 1, 40)], 16, seeded, "cpu", torch.float32)
    probe_step(**step, params=params, state=state, impl="triton")
    assert torch.equal(state.log_post[1:], before.log_post[1:])
    assert not torch.equal(state.log_post[0], before.log_post[0])
    with pytest.raises(ValueError, match="slot ids outside"):
        probe_reference(**step, params=params, state=before)


def test_validation_messages(seeded):
    params = ProbeParams.random(16, 16, 4, generator=seeded, max_len=40)
    state = ProbeState.for_params(params, max_slots=3, max_rows=4)
    good = make_step([(0, 0, 1, 1, 40), (1, 0, 1, 1, 40)], 16, seeded, "cpu", torch.float32)
    bad_cases = [
        (dict(slot_ids=torch.tensor([1, 1], dtype=torch.int32)), "appears twice"),
        (dict(flags=torch.tensor([FIRST_CHUNK, 0], dtype=torch.int32)), "PREFILL missing"),
        (dict(flags=torch.tensor([64, 0], dtype=torch.int32)), "unknown flag"),
        (dict(cu_seqlens=torch.tensor([0, 1, 1], dtype=torch.int32)), "empty segments"),
        (dict(cu_seqlens=torch.tensor([0, 2, 9], dtype=torch.int32)), "cu_seqlens must start"),
        (dict(num_generated=torch.tensor([-1, 0], dtype=torch.int32)), ">= 0"),
    ]
    for change, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            validate_step(**{**good, **change}, state=state)
    shape_cases = [
        (dict(slot_ids=torch.tensor([0, 1], dtype=torch.int64)), "slot_ids must be a contiguous int32"),
        (dict(states=torch.zeros(2, 15)), "d=15"),
        (dict(cu_seqlens=torch.tensor([0, 1], dtype=torch.int32)), r"cu_seqlens must be a contiguous int32 \[3\]"),
    ]
    for change, message in shape_cases:
        with pytest.raises(ValueError, match=message):
            probe_step(**{**good, **change}, params=params, state=state, impl="triton")
    small = ProbeState.for_params(params, max_slots=3, max_rows=1)
    with pytest.raises(ValueError, match="max_rows=1"):
        probe_step(**good, params=params, state=small)


def test_params_validation():
    k = 4
    base = dict(fc1_weight=torch.zeros(8, 6), fc1_bias=torch.zeros(8), fc2_weight=torch.zeros(k, 8),
                fc2_bias=torch.zeros(k), bin_edges=torch.tensor([0.0, 1, 5, 9, 20]), bin_values=torch.ones(k),
                log_prior=torch.zeros(k))
    ProbeParams(**base)
    cases = [
        (dict(fc2_bias=torch.zeros(3)), "shapes disagree"),
        (dict(bin_edges=torch.tensor([0.0, 5, 1, 9, 20])), "increase strictly"),
        (dict(bin_edges=torch.tensor([0.0, 1, 5, 9])), r"bin_edges must be \[5\]"),
        (dict(log_prior=torch.tensor([0.0, -math.inf, 0, 0])), "log_prior must be finite"),
        (dict(bin_edges=torch.tensor([0.0, 1, 5, 9, math.inf]), bin_values=torch.tensor([0.5, 3, 7, 8])),
         "open-ended last bin starts at 9"),
        (dict(bin_edges=torch.tensor([0.0, 1, 1.5, 9, 20])), "narrower than one token"),
        (dict(rule="magic"), "rule"),
        (dict(alpha=0.0), "alpha"),
        (dict(eps=-1.0), "eps"),
        (dict(update_every=0), "update_every"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            ProbeParams(**{**base, **change})
    trail_rule = ProbeParams(**base, rule="trail", alpha=0.3)
    assert trail_rule.update_every == 8 and trail_rule.alpha_used == 1.0
    assert torch.equal(trail_rule.log_prior_used, torch.zeros(k))


# ---------------------------------------------------------------------------------------------
# Compiling for the H100 without one: Triton lowers to PTX and runs ptxas on the CPU, which catches
# GPU-only compiler failures (layouts, dot shapes, shared memory) that the interpreter never sees.
# ---------------------------------------------------------------------------------------------
_SM90_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import trail_kernels.probe_triton as P
from trail_kernels.probe_params import POW_BITS, padded_num_bins

target = GPUTarget("cuda", 90, 32)
ptrs = dict(cu_ptr="*i32", slot_ptr="*i32", flags_ptr="*i32", gen_ptr="*i32", max_new_ptr="*i32", b1_ptr="*fp32",
            b2_ptr="*fp32", lpows_ptr="*fp32", values_ptr="*fp32", logpi_ptr="*fp32", log_post_ptr="*fp32",
            pool_sum_ptr="*fp32", pool_cnt_ptr="*i32", post_gen_ptr="*i32", upd_gen_ptr="*i32", out_ptr="*fp32",
            partial_ptr="*fp32", counter_ptr="*i32", state_stride="i32", n_rows="i32", num_slots="i32",
            partial_stride="i32", alpha="fp32", log_floor="fp32", eps_log1p="fp32", update_every="i32")
cases = [("bf16", "bf16", 1, False, 64, 64, 128, 4096, 10), ("bf16", "bf16", 2, True, 16, 16, 128, 576, 10),
         ("fp32", "fp32", 0, True, 64, 64, 64, 576, 17), ("bf16", "bf16", 1, False, 128, 64, 64, 576, 10)]
names = P._probe_fused_kernel.arg_names
for sdt, wdt, mode, has_prefill, bm, bh, bd, d, k in cases:
    types = dict(ptrs, states_ptr="*" + sdt, w1_ptr="*" + wdt, w2_ptr="*" + wdt)
    const = dict(d=d, h=512, K=k, FLOOR=True, BLOCK_M=bm, BLOCK_H=bh, BLOCK_D=bd, FILTER_M=16,
                 KP=padded_num_bins(k), DOT_MODE=mode, HAS_PREFILL=has_prefill, POWS=POW_BITS)
    sig = {n: ("constexpr" if n in const else types[n]) for n in names}
    src = ASTSource(P._probe_fused_kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()})
    kernel = triton.compile(src, target=target, options=dict(num_warps=8 if bm == 128 else 4, num_stages=3))
    assert kernel.metadata.shared <= 227 * 1024, kernel.metadata.shared
    assert "atom.global.gpu.acq_rel.add" in kernel.asm["ptx"]
names = P._probe_pool_kernel.arg_names
sig = dict(states_ptr="*bf16", state_stride="i32", cu_ptr="*i32", slot_ptr="*i32", flags_ptr="*i32",
           pool_sum_ptr="*fp32", pool_cnt_ptr="*i32", num_slots="i32", d="i32", BLOCK_T="constexpr",
           BLOCK_D="constexpr")
triton.compile(ASTSource(P._probe_pool_kernel, sig, constexprs={(9,): 16, (10,): 128}), target=target,
               options=dict(num_warps=4))
print("compiled", len(cases) + 1)
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    assert "compiled 5" in compile_for_sm90(_SM90_COMPILE, timeout=240)


# ---------------------------------------------------------------------------------------------
# GPU: model shapes, bf16, CUDA graphs, no syncs
# ---------------------------------------------------------------------------------------------
GPU_CASES = [
    # d, h, K, weights dtype, states dtype, tol
    (576, 512, 10, torch.float32, torch.float32, 2e-5),
    (576, 512, 10, torch.bfloat16, torch.bfloat16, 1e-4),
    (4096, 512, 10, torch.bfloat16, torch.bfloat16, 1e-4),
    (1000, 384, 7, torch.float32, torch.bfloat16, 2e-5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"d{c[0]}-{str(c[3])[6:]}-{str(c[4])[6:]}")
@pytest.mark.parametrize("rule", ["bayes", "trail"])
def test_gpu_scenario_matches_reference_and_float64(case, rule, seeded):
    d, h, k, wdt, sdt, tol = case
    params = ProbeParams.random(d, h, k, generator=seeded, open_ended=True, scale=4.0, max_len=64, eps=1e-4,
                                alpha=0.7, rule=rule, update_every=2 if rule == "trail" else None).to("cuda", wdt)
    run_scenario(params, scenario(seeded, 12, extra_decode_steps=6), "cuda", sdt, seeded, 12, "triton", tol)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 37, 300, 1024])
def test_gpu_large_batches_match_float64(batch, seeded):
    params = ProbeParams.random(576, 512, 10, generator=seeded, open_ended=True, scale=4.0, eps=1e-5,
                                alpha=0.6).to("cuda", torch.bfloat16)
    steps = [[(s, PF_ONESHOT, 1 + s % 5, 0, 300) for s in range(batch)]]
    for g in (1, 2, 5):
        steps.append([(s, 0, 1, g, 300) for s in torch.randperm(batch, generator=seeded).tolist()])
    run_scenario_big(params, steps, batch, seeded)


def run_scenario_big(params, steps, max_slots, gen):
    state = ProbeState.for_params(params, max_slots=max_slots, max_rows=max_slots + 8, device="cuda")
    ref_state = state.clone()
    model = Filter64(params, state.num_slots, state.scratch_slot)
    for segments in steps:
        step = make_step(segments, params.hidden_size, gen, "cuda", torch.bfloat16)
        has_prefill = any(s[1] & PREFILL for s in segments)
        probe_step(**step, params=params, state=state, has_prefill=has_prefill, impl="triton")
        probe_reference(**step, params=params, state=ref_state, has_prefill=has_prefill)
        model.step(step["states"], step["cu_seqlens"].tolist(), step["slot_ids"].tolist(),
                   step["flags"].tolist(), step["num_generated"].tolist(), step["max_new_tokens"].tolist())
    compare_states(state, ref_state, model, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [576, 4096])
def test_gpu_decode_launch_in_cuda_graph_replays_with_new_inputs(d, seeded):
    batch, max_slots = 48, 80
    params = ProbeParams.random(d, 512, 10, generator=seeded, open_ended=True, scale=4.0, eps=1e-5,
                                alpha=0.8).to("cuda", torch.bfloat16)
    state = ProbeState.for_params(params, max_slots=max_slots, max_rows=max_slots, device="cuda")
    prompt = make_step([(s, PF_ONESHOT, 3, 0, 200) for s in range(max_slots)], d, seeded, "cuda", torch.bfloat16)
    probe_step(**prompt, params=params, state=state, impl="triton")
    static = make_step([(max_slots, 0, 1, 0, 0)] * batch, d, seeded, "cuda", torch.bfloat16)
    launch = lambda: probe_step(**static, params=params, state=state, has_prefill=False, impl="triton")  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launch()                              # compile outside the capture (touches scratch only)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    gens = torch.zeros(max_slots, dtype=torch.int64)
    for it in range(6):
        n_real = int(torch.randint(1, batch + 1, (1,), generator=seeded))
        slots = torch.randperm(max_slots, generator=seeded)[:n_real]
        gens[slots] += torch.randint(1, 3, (n_real,), generator=seeded)
        slot_ids = torch.full((batch,), max_slots, dtype=torch.int32)
        slot_ids[:n_real] = slots.int()
        num_gen = torch.zeros(batch, dtype=torch.int32)
        num_gen[:n_real] = gens[slots].int()
        new = dict(states=torch.randn(batch, d, generator=seeded).to(torch.bfloat16), slot_ids=slot_ids,
                   num_generated=num_gen, max_new_tokens=torch.full((batch,), 150, dtype=torch.int32))
        for name, value in new.items():
            static[name].copy_(value)
        expected = state.clone()
        probe_reference(**static, params=params, state=expected, has_prefill=False)
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        real = torch.arange(max_slots, device="cuda")
        for name in STATE_FIELDS:
            torch.testing.assert_close(getattr(state, name)[real], getattr(expected, name)[real], atol=1e-4,
                                       rtol=1e-4, msg=lambda m: f"replay {it}, {name}: {m}")
        assert int(state.tile_counters.abs().sum()) == 0


@pytest.mark.gpu
def test_gpu_decode_launch_has_no_sync_and_no_allocation(seeded):
    params = ProbeParams.random(4096, 512, 10, generator=seeded, eps=1e-5).to("cuda", torch.bfloat16)
    state = ProbeState.for_params(params, max_slots=256, max_rows=256, device="cuda")
    step = make_step([(s, 0, 1, 1, 100) for s in range(256)], 4096, seeded, "cuda", torch.bfloat16)
    probe_step(**step, params=params, state=state, has_prefill=False, impl="triton")   # compile
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            probe_step(**step, params=params, state=state, has_prefill=False, impl="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocated


@pytest.mark.gpu
def test_gpu_repeated_launches_stay_consistent(seeded):
    """Many launches with different batch sizes: the arrival counters reset themselves and the
    split over hidden blocks never mixes up partial sums (a race would show as a mismatch)."""
    params = ProbeParams.random(576, 512, 10, generator=seeded, eps=1e-5, scale=4.0).to("cuda", torch.bfloat16)
    state = ProbeState.for_params(params, max_slots=512, max_rows=512, device="cuda")
    ref = state.clone()
    for it in range(40):
        n = int(torch.randint(1, 513, (1,), generator=seeded))
        slots = torch.randperm(512, generator=seeded)[:n].tolist()
        step = make_step([(s, 0, 1, it + 1, 400) for s in slots], 576, seeded, "cuda", torch.bfloat16)
        probe_step(**step, params=params, state=state, has_prefill=False, impl="triton")
        probe_reference(**step, params=params, state=ref, has_prefill=False)
    torch.testing.assert_close(state.log_post, ref.log_post, atol=1e-4, rtol=0)
    torch.testing.assert_close(state.expected_remaining, ref.expected_remaining, atol=1e-2, rtol=1e-4)
    assert int(state.tile_counters.abs().sum()) == 0


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_a_non_finite_state_does_not_poison_its_slot(impl, seeded):
    """One NaN (or inf) hidden-state row: its slot only runs the predict step (decode) or starts
    from the prior (prompt); the next finite row updates it normally; other slots are unaffected."""
    params = ProbeParams.random(16, 32, 6, generator=seeded, scale=3.0, max_len=64, eps=1e-4)
    state = _started_state(params, 3, seeded, impl)
    before, clean = state.clone(), state.clone()
    step = make_step([(0, 0, 1, 2, 50), (1, 0, 1, 2, 50), (2, PF_ONESHOT, 3, 0, 50)], 16, seeded, "cpu",
                     torch.float32)
    probe_step(**step, params=params, state=clean, impl=impl)
    step["states"][0, 3] = float("nan")
    step["states"][2:5, 1] = float("inf")
    probe_step(**step, params=params, state=state, impl=impl)
    assert torch.isfinite(state.log_post[:3]).all() and torch.isfinite(state.expected_remaining[:3]).all()
    assert_close_ulps(state.log_post[1], clean.log_post[1])          # the finite row is untouched by the others
    predicted = log_predict(before.log_post[:1].double(), params.log_transition_pows.double(), torch.tensor([2]))
    assert int(state.upd_gen[0]) == 0 and int(state.post_gen[0]) == 2    # predicted, no update
    assert_close_ulps(state.log_post[0].exp(), predicted[0].exp(), ulps=64)
    prior = params.log_prior_used.double().exp()
    floored = (prior / prior.sum() + params.eps / params.num_bins) / (1 + params.eps)
    assert_close_ulps(state.log_post[2].exp(), floored, ulps=64)   # prompt: the (floored) prior
    # the slot recovers: the next finite decode row is an ordinary update
    nxt = make_step([(0, 0, 1, 3, 50)], 16, seeded, "cpu", torch.float32)
    probe_step(**nxt, params=params, state=state, impl=impl)
    assert int(state.upd_gen[0]) == 3 and torch.isfinite(state.log_post[0]).all()
