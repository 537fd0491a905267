"""Streamed text through the engine (issue 23): with stop strings that span token boundaries, the
text deltas of every step concatenate to the final text, nothing past a stop string's first
character is ever streamed, and the final text ends before the stop string. Real SmolLM2-135M on
CPU, greedy, serial and overlapped loops."""
import pytest
import torch

from trail.engine import LLMEngine
from trail.engine_config import EngineConfig
from trail.models.loader import load_hf, load_tokenizer
from trail.request import FinishReason, SamplingParams


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_hf(smollm2_dir, device="cpu", dtype=torch.float32), load_tokenizer(smollm2_dir)


def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_streamed_deltas_equal_the_final_text_with_stop_strings(smollm2, overlap):
    model, tok = smollm2
    engine = LLMEngine(model, tok, EngineConfig(policy="fcfs", max_batch=4, max_model_len=256,
                                                prefill_tokens_per_s=1e3, overlap=overlap))
    prompts = [_chat(tok, "Describe a quiet place where you like to read."),
               _chat(tok, "Name three colours and say why you like them."),
               _chat(tok, "Write one sentence about the sea.")]
    # first, unstopped: pick stop strings that occur in the output and cross token boundaries
    free = engine.generate(prompts, SamplingParams(max_new_tokens=48), progress=False)
    stops = []
    for out in free:
        ids = out.token_ids
        pieces = [tok.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
        bounds = sorted({len(p) for p in pieces})
        full = out.text
        # a 4-character window starting 2 characters before a token boundary, well inside the text
        b = next(x for x in bounds if 12 <= x <= len(full) - 4)
        stops.append(full[b - 2:b + 2])
    streamed, finals = {}, {}
    for i, (p, stop) in enumerate(zip(prompts, stops)):
        engine.add_request(p, SamplingParams(max_new_tokens=48, stop=(stop, "zzzz never")), request_id=100 + i)
    while engine.has_unfinished():
        for out in engine.step():
            streamed[out.request_id] = streamed.get(out.request_id, "") + out.text_delta
            if out.finished:
                finals[out.request_id] = out
    for i, (stop, ref) in enumerate(zip(stops, free)):
        out = finals[100 + i]
        assert out.finish_reason == FinishReason.STOP
        assert streamed[100 + i] == out.text
        cut = ref.text.index(stop)
        assert out.text == ref.text[:cut], (stop, out.text, ref.text)
    engine.check_idle()
