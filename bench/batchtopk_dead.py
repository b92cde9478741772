"""BatchTopK's dead latents on a real cache: AuxK's weight and dead window, each variant trained and analysed.

Trains one BatchTopK crosscoder per variant on an existing activation cache with a params file's ``train``
section (only the variant's knobs changed), then counts the latents that never fire on the whole cache, as
the analysis stage counts them (class ``dead``), beside the held-out FVE. On the SmolLM2 organism's block-19
cache (``python -m flows.pipeline --params params-smollm2.yaml`` writes it):

    python bench/batchtopk_dead.py --cache artifacts/cache --params params-smollm2.yaml --out runs/dead

Figures: BENCHMARKS.md, "BatchTopK's dead latents on the organism".
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import yaml

from crossdiff_core.analysis import run_analysis
from crossdiff_core.trainer import TrainConfig, train_crosscoder

# variant -> overrides of the params file's train section (crosscoder knobs under "crosscoder"); the first is
# the trainer's defaults (Gao et al.'s AuxK weight 1/32, a 200k-token dead window)
VARIANTS = {
    f"aux_alpha {name}, dead_tokens {w // 1000}k": {"crosscoder": {"aux_alpha": alpha}, "dead_tokens": w}
    for name, alpha in (("1/32", 1 / 32), ("0.25", 0.25)) for w in (200_000, 50_000)
}


def settings(train: dict, override: dict) -> TrainConfig:
    t = copy.deepcopy(train)
    for k, v in override.items():
        if k == "crosscoder":
            t["crosscoder"].update(v)
        else:
            t[k] = v
    t["progress"] = False
    return TrainConfig.for_kind(t, "batchtopk")  # the pipeline's own mapping of a params train section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="activation cache directory")
    ap.add_argument("--params", required=True, help="params file whose train section is the starting point")
    ap.add_argument("--out", required=True, help="scratch directory: one crosscoder per variant")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"any of {list(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train = yaml.safe_load(Path(args.params).read_text())["train"]
    rows = []
    for name in args.variants:
        tc = settings(train, VARIANTS[name])
        out = Path(args.out) / name.replace(" ", "_").replace(",", "").replace("/", "-")
        t0 = time.perf_counter()
        train_crosscoder(args.cache, out, kind="batchtopk", train=tc)
        seconds = time.perf_counter() - t0
        summary = run_analysis(out, args.cache, out / "latents.parquet").summary
        m = json.loads((out / "metrics.json").read_text())
        rows.append({"variant": name, "aux_alpha": tc.crosscoder.aux_alpha, "dead_tokens": tc.dead_tokens,
                     "dead": summary["dead"], "dead_fraction": summary["dead"] / tc.crosscoder.dict_size,
                     "dead_train_fraction": m["dead_train_fraction"], "fve_base": m["fve_base"],
                     "fve_chat": m["fve_chat"], "l0": m["l0"], "train_s": round(seconds)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| variant | dead on the cache | unfired, last window | FVE base / chat | train s |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['dead']} ({r['dead_fraction']:.2%}) | {r['dead_train_fraction']:.2%} | "
              f"{r['fve_base']:.4f} / {r['fve_chat']:.4f} | {r['train_s']} |")


if __name__ == "__main__":
    main()
