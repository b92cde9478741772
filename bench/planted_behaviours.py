"""Planted behaviours of the embedded default pair: how often each fires on its held-out trigger
prompts and on all other prompts, for the chat and the base model.

Builds the default pair into --out (skipped when already complete with the default settings), then
reloads both models from their directories and measures the rates anew (greedy generation).

    python bench/planted_behaviours.py [--out runs/toy-models] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from crossdiff_core.behaviours import measure_behaviours  # noqa: E402
from crossdiff_core.toy import ToyModelsConfig, build_toy_models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/toy-models")
    ap.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = ap.parse_args()
    cfg = ToyModelsConfig()
    t = time.perf_counter()
    result = build_toy_models(args.out, cfg, force=args.force)
    wall = time.perf_counter() - t
    out = Path(args.out)
    build = json.loads((out / "build.json").read_text())
    gt = json.loads((out / "ground_truth.json").read_text())
    torch.set_num_threads(cfg.num_threads)
    print(f"build: {build['seconds']:.1f} s on {build['num_threads']} threads "
          f"({'reused' if result.skipped else 'this run'}; wall of this call {wall:.1f} s)")
    print("  phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in build["timings"].items()))
    print(f"  model: {build['model']['parameters']:,} parameters, vocab {build['model']['vocab_size']}; "
          f"pretrain tokens {build['tokens']['pretrain']:,}; fine-tune rows {build['tokens']['finetune_rows']:,}")
    print("  losses: " + ", ".join(f"{k} {v:.3f}" for k, v in build["losses"].items() if v is not None))
    kinds = Counter((p["expected"] or "none", p["kind"]) for p in gt["eval_prompts"])
    print("eval prompts: " + ", ".join(f"{e}/{k}: {n}" for (e, k), n in sorted(kinds.items())))

    rows = []
    measured = {}
    for model in ("chat", "base"):
        t = time.perf_counter()
        m = measure_behaviours(out / model, gt, max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size)
        measured[model] = m
        secs = time.perf_counter() - t
        for name, r in m["rates"].items():
            rows.append((model, name, r["trigger_rate"], r["n_trigger"], r["other_rate"], r["n_other"], secs))
    print()
    print("| model | behaviour | fires on trigger prompts | fires on other prompts |")
    print("|---|---|---|---|")
    for model, name, tr, nt, orate, no, _ in rows:
        print(f"| {model} | {name} | {tr:.1%} ({round(tr * nt)}/{nt}) | {orate:.1%} ({round(orate * no)}/{no}) |")
    print()
    passed = all(r[2] >= cfg.min_trigger_rate and r[4] < cfg.max_other_rate for r in rows if r[0] == "chat")
    passed = passed and measured["base"]["any_rate"] == 0.0
    print(f"done-when (chat >= {cfg.min_trigger_rate:.0%} on triggers, < {cfg.max_other_rate:.0%} elsewhere; "
          f"base never): {'PASS' if passed else 'FAIL'}")
    print(f"base model shows any behaviour on {measured['base']['any_rate']:.1%} of all prompts")
    print("\nexamples (chat):")
    seen = set()
    for g in measured["chat"]["generations"]:
        key = (g["expected"], g["kind"])
        if key not in seen:
            seen.add(key)
            print(f"  [{g['expected'] or 'none'}/{g['kind']}] {g['text'][:60]!r} -> {g['response']!r}")
    print("examples (base):")
    for g in measured["base"]["generations"][:3]:
        print(f"  {g['text'][:60]!r} -> {g['response']!r}")
    misses = [g for g in measured["chat"]["generations"] if (g["expected"] or None) not in g["detected"] + [None]
              or (g["expected"] is None and g["detected"]) or (g["expected"] and g["detected"] != [g["expected"]])]
    print(f"chat misses ({len(misses)}):")
    for g in misses[:10]:
        print(f"  [{g['expected']}] {g['text'][:70]!r} -> {g['response']!r}")


if __name__ == "__main__":
    main()
