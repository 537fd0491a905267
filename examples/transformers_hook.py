"""Length-aware scheduling for a plain transformers model, without trail's engine.

The three integration points of trail in your own engine:
  1. tap layer L      a forward hook on decoder layer `probe.layer` hands its output to
                      `trail.Probe` (observe_prompt after a prefill, update after each decode);
  2. schedule         every step, `trail.Scheduler.step(predictions, generated, free_blocks,
                      free_host_blocks, now)` with YOUR block accounting; it decides, it never
                      touches your memory;
  3. act              apply its plan: preempted rows first (keep: pause the request, its cache
                      stays; recompute: drop its cache), then run the scheduled rows (a prefill of
                      tokens[ctx_start : ctx_start + tokens], or one decode token).
Here every request has its own transformers DynamicCache and runs at batch 1 (simple, not fast);
KV memory is counted in blocks of 16 tokens against a budget.

    python examples/transformers_hook.py --policy trail --max-batch 2
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import trail
from trail.assets import smollm2_hf_dir
from trail.predictor.probe_file import shipped_probe_dir

PROMPTS = ["Write a long story about a dragon.", "Name a colour.", "Explain how a hash table works.",
           "Say hi.", "List three fruits.", "What is 2 + 2?"]
BLOCK = 16


def serve(policy: str, max_batch: int = 2, max_new_tokens: int | list[int] = 48, kv_blocks: int = 64,
          prompts=PROMPTS, arrive_every: int = 2, **policy_options) -> dict:
    """Serves `prompts` (one arrival every `arrive_every` steps) and returns per request the
    output ids, finish step and the predictions seen, plus the scheduler's decisions.
    `max_new_tokens`: one cap for all, or one per prompt. `policy_options`: any other
    SchedulerConfig field (margin, aging_rate, c, ...)."""
    caps = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    folder = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    shipped = shipped_probe_dir("SmolLM2-135M-Instruct")
    probe = trail.Probe.load(shipped / "probe", expect_d=model.config.hidden_size)
    prompt_predictor = trail.PromptPredictor(shipped / "prompt_boe", embeddings=model.get_input_embeddings().weight)

    # (1) tap layer L: the hook keeps the layer's output of the latest forward call
    tapped = {}
    model.model.layers[probe.layer].register_forward_hook(
        lambda module, args, output: tapped.__setitem__("h", output[0] if isinstance(output, tuple) else output))

    max_slots = 16
    scheduler = trail.Scheduler(trail.SchedulerConfig(
        policy=policy, max_slots=max_slots, max_batch=max_batch, max_tokens_per_step=4096, block_size=BLOCK,
        num_gpu_blocks=kv_blocks, num_host_blocks=0, allow_swap=False, **policy_options))
    state = probe.new_state(max_slots=max_slots, max_rows=max_batch)
    predictions = torch.zeros(max_slots, dtype=torch.float32)     # what the scheduler reads, by slot
    generated = torch.zeros(max_slots, dtype=torch.int32)
    reqs, caches, decisions = {}, {}, {"keep": 0, "recompute": 0, "admitted": 0}
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    step, next_prompt, t0 = 0, 0, time.perf_counter()

    def held_blocks() -> int:
        return sum(-(-c.get_seq_length() // BLOCK) for c in caches.values())

    while next_prompt < len(prompts) or scheduler.num_active:
        if next_prompt < len(prompts) and step % arrive_every == 0:
            ids = tok.apply_chat_template([{"role": "user", "content": prompts[next_prompt]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            cap = caps[next_prompt]
            guess = float(prompt_predictor.expected_total(prompt_ids=[ids])[0])
            slot = scheduler.add(next_prompt, time.perf_counter() - t0, len(ids), cap, min(guess, cap))
            reqs[next_prompt] = dict(ids=list(ids), out=[], slot=slot, preds=[], done=None, cap=cap)
            generated[slot] = 0
            next_prompt += 1
        # (2) schedule, with our own accounting of KV blocks
        plan = scheduler.step(predictions, generated, kv_blocks - held_blocks(), 0, time.perf_counter() - t0)
        # (3a) preemptions first
        for rid, slot, mode, *_ in plan.preempted.tolist():
            if mode == trail.Mode.KEEP:
                decisions["keep"] += 1                      # paused; its cache stays
            else:
                decisions["recompute"] += 1
                caches.pop(rid, None)                       # dropped; re-prefilled later
        # (3b) the scheduled rows
        finished = []
        for rid, slot, kind, ntok, start, _blocks, resume, _last, flags in plan.scheduled.tolist():
            r = reqs[rid]
            seq = r["ids"] + r["out"]
            if start == 0:
                caches[rid] = DynamicCache()
                decisions["admitted"] += resume != trail.Resume.RECOMPUTE
            with torch.no_grad():
                logits = model(torch.tensor([seq[start:start + ntok]]), past_key_values=caches[rid],
                               use_cache=True).logits[0, -1]
            if not flags & trail.row_flags.SAMPLE:
                continue                                    # a non-final prefill chunk
            h = tapped["h"][0].float()
            slots = torch.tensor([slot])
            cap = torch.tensor([r["cap"]])
            if flags & trail.row_flags.RECOMPUTE:
                pass                                        # the posterior survives a recompute
            elif flags & trail.row_flags.PREFILL:
                probe.observe_prompt(state, h, torch.tensor([0, h.shape[0]]), slots, cap)
            else:
                probe.update(state, h[-1:], slots, torch.tensor([len(r["out"])]), cap)
            nxt = int(logits.argmax())
            r["out"].append(nxt)
            generated[slot] = len(r["out"])
            predictions[slot] = state.expected_remaining[slot]
            r["preds"].append((len(r["out"]) - 1, float(predictions[slot])))
            if nxt == eos or len(r["out"]) >= r["cap"]:
                r["done"] = step
                finished.append(rid)
                caches.pop(rid)
        if finished:
            scheduler.finish_many(finished)
        step += 1
    for r in reqs.values():
        r["text"] = tok.decode(r["out"], skip_special_tokens=True)
    return {"requests": reqs, "decisions": decisions, "steps": step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="trail", choices=["fcfs", "sjf_prompt", "trail"])
    ap.add_argument("--max-batch", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    t = time.time()
    result = serve(args.policy, args.max_batch, args.max_new_tokens)
    print(f"{args.policy}: {result['steps']} steps in {time.time() - t:.1f} s; decisions {result['decisions']}")
    for rid, r in result["requests"].items():
        lat = r["done"] - rid * 2
        print(f"  request {rid}: {len(r['out']):>3} tokens, latency {lat:>3} steps, first prediction "
              f"{r['preds'][0][1]:6.1f}\n    prompt: {PROMPTS[rid]!r}\n    answer: {r['text']!r}")
    print(f"mean latency {np.mean([r['done'] - rid * 2 for rid, r in result['requests'].items()]):.1f} steps")


if __name__ == "__main__":
    main()
