"""Analysis of the 2026-11-27b predictor GPU run: paired per-request MAE of the new and shipped
probes on the same 1,033 test requests, ratios to the prompt-only baselines, ranking, the
cross-dataset table and the leakage / seen-ids checks. Run from the repo root after extracting
predictor_results.tar.gz (main job's files at the root, the cross job's under cross/):

    mkdir -p /tmp/gr && tar -C /tmp/gr -xzf bench/results/predictor/gpu_run_2026-11-27b/predictor_results.tar.gz
    python bench/results/predictor/gpu_run_2026-11-27b/analysis.py /tmp/gr

Prints markdown tables and writes analysis.json next to this file.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from trail.predictor import bins as B
from trail.predictor.ranking import spearman
from trail.predictor.trace import read_trace

HERE = Path(__file__).parent
NEW_TRACE = HERE / "trace.jsonl.gz"
OLD_TRACE = Path("bench/results/predictor/trace.jsonl.gz")  # the shipped probe's training trace
NBOOT = 20000


def signflip_p(diff, B_=NBOOT, seed=1, chunk=2000):
    """Two-sided paired randomization test (random sign flips) of mean(diff) = 0."""
    rng = np.random.default_rng(seed)
    obs = abs(diff.mean())
    hits = 0
    for i in range(0, B_, chunk):
        s = rng.choice([-1.0, 1.0], size=(min(chunk, B_ - i), len(diff)))
        hits += int((np.abs((s * diff).mean(1)) >= obs - 1e-12).sum())
    return float((hits + 1) / (B_ + 1))


def boot_ci(diff, B_=NBOOT, seed=0, chunk=2000):
    rng = np.random.default_rng(seed)
    m = []
    for i in range(0, B_, chunk):
        idx = rng.integers(0, len(diff), size=(min(chunk, B_ - i), len(diff)))
        m.append(diff[idx].mean(1))
    m = np.concatenate(m)
    return float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5)), float((m >= 0).mean())


def per_request(npz):
    d = np.load(npz)
    cu, L, p = d["cu"], d["output_len"], d["pred"].astype(np.float64)
    mae = np.array([np.abs(p[cu[i]:cu[i + 1]] - (L[i] - np.arange(L[i]))).mean() for i in range(len(L))])
    return d, mae


def ev(root, name):
    return json.loads((root / "eval" / name / "eval.json").read_text())


def main(root):
    root = Path(root)
    out = {}
    dn, mn = per_request(root / "recorded_test_new.npz")
    ds, ms = per_request(root / "cross" / "recorded_test_shipped.npz")
    same = {k: bool(np.array_equal(dn[k], ds[k])) for k in ("ids", "split", "prompt_len", "output_len", "hit_cap", "cu")}
    assert all(same.values()), same
    out["npz_identical_fields"] = same
    out["npz_meta"] = {"new": json.loads(str(dn["meta"])), "shipped": json.loads(str(ds["meta"]))}
    ids = dn["ids"]
    sg = np.char.startswith(ids, "sharegpt")
    eos = ~dn["hit_cap"]
    print(f"npz: {len(ids)} requests, identical {sorted(same)} in both files; {sg.sum()} sharegpt, "
          f"{(~sg).sum()} alpaca, {eos.sum()} eos; splits {dict(Counter(dn['split'].tolist()))}")
    # the npz MAE reproduces the eval tables
    e_new, e_shp = ev(root, "new_on_test"), ev(root / "cross", "shipped_on_test")
    out["reproduces_eval"] = {"new": [float(mn.mean()), e_new["methods"]["(vi) filter"]["mae"]],
                              "shipped": [float(ms.mean()), e_shp["methods"]["(vi) filter"]["mae"]]}
    print("npz filter MAE vs eval.json:", out["reproduces_eval"])

    # ---- (a) paired MAE
    groups = {"all": np.ones(len(ids), bool), "sharegpt": sg, "alpaca": ~sg, "all, eos only": eos,
              "sharegpt, eos only": sg & eos, "alpaca, eos only": ~sg & eos}
    out["mae"] = {}
    print("\n| requests | n | new MAE | shipped MAE | new - shipped | 95% CI (paired bootstrap) | new better on | sign-flip p |")
    print("|---|---|---|---|---|---|---|---|")
    for g, m in groups.items():
        diff = mn[m] - ms[m]
        lo, hi, p_ge0 = boot_ci(diff)
        w = signflip_p(diff)
        win = float((diff < 0).mean())
        rel = float(ms[m].mean() / mn[m].mean())
        out["mae"][g] = {"n": int(m.sum()), "new": float(mn[m].mean()), "shipped": float(ms[m].mean()),
                         "diff": float(diff.mean()), "ci95": [lo, hi], "boot_frac_diff_ge_0": p_ge0,
                         "new_better_fraction": win, "signflip_p": w, "shipped_over_new": rel}
        print(f"| {g} | {m.sum()} | {mn[m].mean():.2f} | {ms[m].mean():.2f} | {diff.mean():+.2f} | "
              f"[{lo:+.2f}, {hi:+.2f}] | {100 * win:.0f}% | {w:.4f} |")

    # ---- (b) ratios to the prompt-only baselines (eval summaries; boe_ft exists for the new run only)
    print("\n| split | new filter | new every1 | shipped filter | shipped every1 | boe (new run) x new filter | "
          "boe_ft x new filter | shipped boe x shipped filter | boe_ft x shipped filter |")
    print("|---|---|---|---|---|---|---|---|---|")
    out["ratios"] = {}
    for sp, nn, sn in (("all", "new_on_test", "shipped_on_test"), ("sharegpt", "new_on_test_sharegpt", "shipped_on_test_sharegpt"),
                       ("alpaca", "new_on_test_alpaca", "shipped_on_test_alpaca")):
        a, b = ev(root, nn), ev(root / "cross", sn)
        M = lambda e, k: e["methods"][k]["mae"]  # noqa: E731
        nf, sf = M(a, "(vi) filter"), M(b, "(vi) filter")
        boe, boe_ft, sboe = M(a, "(i) trail_baseline[boe]"), M(a, "(i) trail_baseline[boe_ft]"), M(b, "(i) trail_baseline[boe]")
        r = {"n": a["requests"], "new_filter": nf, "new_every1": M(a, "(v) trail_every1"), "shipped_filter": sf,
             "shipped_every1": M(b, "(v) trail_every1"), "boe": boe, "boe_ft": boe_ft, "shipped_boe": sboe,
             "boe_over_new": boe / nf, "boe_ft_over_new": boe_ft / nf, "shipped_boe_over_shipped": sboe / sf,
             "boe_ft_over_shipped": boe_ft / sf, "boe_ft_over_new_every1": boe_ft / M(a, "(v) trail_every1"),
             "goal_2p5x_vs_boe_ft_met": bool(boe_ft / nf >= 2.5),
             "new_filter_mae_needed_for_2p5x": boe_ft / 2.5}
        out["ratios"][sp] = r
        print(f"| {sp} ({r['n']}) | {nf:.2f} | {r['new_every1']:.2f} | {sf:.2f} | {r['shipped_every1']:.2f} | "
              f"{boe:.2f} ({boe / nf:.2f}x) | {boe_ft:.2f} ({boe_ft / nf:.2f}x) | {sboe:.2f} ({sboe / sf:.2f}x) | "
              f"{boe_ft / sf:.2f}x |")

    # ---- (c) ranking
    print("\n| split | admission: new boe | boe_ft | new prefill probe | shipped boe | shipped prefill probe | "
          "alive (filter): new | shipped | npz check: prompt_pred new / shipped |")
    print("|---|---|---|---|---|---|---|---|---|")
    out["ranking"] = {}
    L = dn["output_len"]
    for sp, m, nn, sn in (("all", groups["all"], "new_on_test", "shipped_on_test"),
                          ("sharegpt", sg, "new_on_test_sharegpt", "shipped_on_test_sharegpt"),
                          ("alpaca", ~sg, "new_on_test_alpaca", "shipped_on_test_alpaca")):
        a, b = ev(root, nn)["ranking"], ev(root / "cross", sn)["ranking"]
        r = {"new_boe": a["admission"]["boe"]["spearman"], "boe_ft": a["admission"]["boe_ft"]["spearman"],
             "new_prefill": a["admission"]["prefill_probe"]["spearman"], "shipped_boe": b["admission"]["boe"]["spearman"],
             "shipped_prefill": b["admission"]["prefill_probe"]["spearman"],
             "alive_new": a["alive"]["(vi) filter"]["spearman"], "alive_shipped": b["alive"]["(vi) filter"]["spearman"],
             "npz_prompt_pred_new": spearman(dn["prompt_pred"][m], L[m]),
             "npz_prompt_pred_shipped": spearman(ds["prompt_pred"][m], L[m])}
        out["ranking"][sp] = r
        print(f"| {sp} | {r['new_boe']:.3f} | {r['boe_ft']:.3f} | {r['new_prefill']:.3f} | {r['shipped_boe']:.3f} | "
              f"{r['shipped_prefill']:.3f} | {r['alive_new']:.3f} | {r['alive_shipped']:.3f} | "
              f"{r['npz_prompt_pred_new']:.3f} / {r['npz_prompt_pred_shipped']:.3f} |")

    # ---- (d) cross-dataset
    print("\n| test set | n | new (both sources) | sharegpt_only | alpaca_only | shipped (old trace) |")
    print("|---|---|---|---|---|---|")
    out["cross"] = {}
    for ts in ("sharegpt", "alpaca"):
        r = {"new": ev(root, f"new_on_test_{ts}"), "sharegpt_only": ev(root / "cross", f"sharegpt_only_on_test_{ts}"),
             "alpaca_only": ev(root / "cross", f"alpaca_only_on_test_{ts}"), "shipped": ev(root / "cross", f"shipped_on_test_{ts}")}
        row = {k: {"filter_mae": e["methods"]["(vi) filter"]["mae"], "filter_mae_eos": e["methods"]["(vi) filter"]["mae_eos"],
                   "alive_spearman": e["ranking"]["alive"]["(vi) filter"]["spearman"],
                   "admission_prefill": e["ranking"]["admission"]["prefill_probe"]["spearman"],
                   "admission_boe": e["ranking"]["admission"]["boe"]["spearman"], "n": e["requests"]} for k, e in r.items()}
        out["cross"][ts] = row
        c = lambda k: f"{row[k]['filter_mae']:.2f} / {row[k]['alive_spearman']:.3f}"  # noqa: E731
        print(f"| test {ts} | {row['new']['n']} | {c('new')} | {c('sharegpt_only')} | {c('alpaca_only')} | {c('shipped')} |")
    e = ev(root / "cross", "sharegpt_only_on_all_alpaca")
    out["cross"]["sharegpt_only_on_all_alpaca"] = {"n": e["requests"], "filter_mae": e["methods"]["(vi) filter"]["mae"],
                                                   "alive_spearman": e["ranking"]["alive"]["(vi) filter"]["spearman"]}
    # training-set sizes of the cross probes
    for name in ("probes_sharegpt_only", "probes_alpaca_only"):
        spec = json.loads((root / "cross" / name / "probe.json").read_text())
        out["cross"][name + "_training"] = {"requests": spec["training"].get("requests"),
                                            "rows": spec["training"].get("rows"), "alpha": spec.get("alpha"),
                                            "eps": spec.get("eps"), "best_epoch": spec["training"].get("best_epoch")}
    print("cross probes' training:", {k: v for k, v in out["cross"].items() if k.endswith("_training")})

    # ---- (e) leakage and seen ids
    new = read_trace(NEW_TRACE, validate=False)
    old = read_trace(OLD_TRACE, validate=False)
    print(f"\nnew trace {len(new)} requests ({new.settings.get('backend')}), old trace {len(old)} ({old.settings.get('backend')})")
    test = set(ids.tolist())
    newby = new.by_id()
    assert test <= set(newby)
    assert all(B.split_of(i) == "test" for i in test)
    id_ok = sum(r.id == f"{r.source}-{hashlib.sha1(r.prompt.encode()).hexdigest()[:16]}" for r in new.records)
    oldby = old.by_id()
    old_text = {r.prompt.strip(): r for r in old.records}
    old_pids = {tuple(r.prompt_ids): r for r in old.records}
    by_id = [i for i in test if i in oldby]
    by_text = [i for i in test if newby[i].prompt.strip() in old_text]
    by_pids = [i for i in test if tuple(newby[i].prompt_ids) in old_pids]
    any_match = set(by_id) | set(by_text) | set(by_pids)
    old_splits = Counter(B.split_of((oldby.get(i) or old_text.get(newby[i].prompt.strip()) or old_pids[tuple(newby[i].prompt_ids)]).id)
                         for i in any_match)
    diff_id_same_text = [i for i in by_text if old_text[newby[i].prompt.strip()].id != i]
    shared = set(newby) & set(oldby)
    shared_splits = Counter(B.split_of(i) for i in shared)
    same_len = sum(newby[i].output_len == oldby[i].output_len for i in shared)
    same_len_test = sum(newby[i].output_len == oldby[i].output_len for i in by_id)
    old_sources = Counter(r.source for r in old.records)
    old_train_sources = Counter(r.source for r in old.records if B.split_of(r.id) == "train")
    out["leakage"] = {"test_requests": len(test), "ids_are_source_sha1_prompt16": f"{id_ok}/{len(new)}",
                      "test_in_old_trace_by_id": len(by_id), "by_prompt_text": len(by_text), "by_prompt_ids": len(by_pids),
                      "any": len(any_match), "old_split_of_matches": dict(old_splits),
                      "same_text_different_id": len(diff_id_same_text),
                      "shared_ids_all_splits": len(shared), "shared_split_counts": dict(shared_splits),
                      "shared_same_output_len": same_len, "test_matches_same_output_len": same_len_test,
                      "old_trace_sources": dict(old_sources), "old_trace_train_sources": dict(old_train_sources)}
    print("leakage:", out["leakage"])
    # seen ids recorded in the new probe (and the cross probes): none of the test ids may be there
    out["seen_ids"] = {}
    tr_ids = [r.id for r in new.records if B.split_of(r.id) in ("train", "val")]
    for name, path in (("new", root / "probes" / "probe.json"),
                       ("sharegpt_only", root / "cross" / "probes_sharegpt_only" / "probe.json"),
                       ("alpaca_only", root / "cross" / "probes_alpaca_only" / "probe.json")):
        spec = json.loads(path.read_text())
        text = spec.get("training", {}).get("seen_ids")
        if not text:
            out["seen_ids"][name] = "no seen_ids field"
            continue
        seen = B.decode_id_set(text)
        test_hit = [i for i in test if B.id_hash32(i) in seen]
        hits_by_src = Counter(r.source for r in new.records if B.id_hash32(r.id) in seen)
        trval_in = sum(B.id_hash32(i) in seen for i in tr_ids)
        out["seen_ids"][name] = {"seen_hashes": len(seen), "test_ids_in_seen": len(test_hit),
                                 "train_val_ids_of_new_trace_in_seen": f"{trval_in}/{len(tr_ids)}",
                                 "new_trace_ids_in_seen_by_source": dict(hits_by_src),
                                 "training_requests": spec["training"].get("requests")}
        print(f"seen_ids {name}:", out["seen_ids"][name])
    (HERE / "analysis.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gr")
