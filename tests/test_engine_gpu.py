"""The engine on the GPU: one host-device sync per step (everything else runs under
torch.cuda.set_sync_debug_mode("error")), with swaps through real pinned memory, and every block
and slot returned at the end. Random SmolLM2-135M-shaped weights in bf16 (timing-free checks)."""
import pytest
import torch

from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.models import random_model
from trail.request import SamplingParams
from trail.scheduler_types import TRAIL_PAPER
from trail_kernels.probe_params import ProbeParams

pytestmark = pytest.mark.gpu


def _engine(**cfg):
    model = random_model("smollm2-135m", device="cuda", dtype=torch.bfloat16, seed=0)
    probe = ProbeParams.random(model.config.hidden_size, 512, 10, generator=torch.Generator().manual_seed(0))
    config = EngineConfig(policy="trail", max_model_len=256, prefill_tokens_per_s=1000.0, **cfg)
    return LLMEngine(model, None, config, probe=probe, probe_layer=19)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_one_sync_per_step_with_swaps(monkeypatch, overlap):
    engine = _engine(max_batch=16, num_gpu_blocks=40, num_host_blocks=64, overlap=overlap,
                     policy_options=dict(TRAIL_PAPER, c=5.0))
    gen = torch.Generator().manual_seed(1)
    for i in range(24):
        prompt = torch.randint(0, 49152, (int(torch.randint(4, 60, (1,), generator=gen)),), generator=gen).tolist()
        engine.add_request(prompt, SamplingParams(max_new_tokens=120,
                                                  replay_length=int(torch.randint(8, 120, (1,), generator=gen))))
    for _ in range(3):                                   # warm-up: Triton compiles, caches fill
        engine.step()
    syncs = []
    real_sync = engine._sync

    def counted(step):
        syncs.append(engine._step_index)
        torch.cuda.set_sync_debug_mode("default")        # the one sync the step is allowed
        try:
            real_sync(step)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(engine, "_sync", counted)
    steps = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        while engine.has_unfinished():
            before = len(syncs)
            engine.step()
            steps += 1
            assert len(syncs) - before <= 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    totals = engine.telemetry.totals()
    assert totals["swap"] > 0 and totals["swap_in_bytes"] > 0, totals
    assert len(syncs) >= steps - 1       # every step that ran work synced exactly once
    engine.check_idle()


def test_phase_profile_reads_device_times_without_extra_syncs():
    engine = _engine(max_batch=8, num_gpu_blocks=200, cuda_graph_tokens=())   # prefill steps run eager
    engine.profile_phases = True
    for i in range(8):
        engine.add_request(list(range(10 + i, 40 + i)), SamplingParams(max_new_tokens=20, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    phases = engine.telemetry.phases
    assert phases and all(p["device_forward_s"] > 0 for p in phases)
    # eager steps (the prefill) time forward / probe / sample apart; a graph replay is one phase
    assert any(p.get("device_sample_s", -1) >= 0 and "device_probe_s" in p for p in phases)
    assert any("device_probe_s" not in p for p in phases)
    engine.check_idle()
