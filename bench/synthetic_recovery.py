"""Planted-feature recovery: every crosscoder kind at matched L0 on synthetic data.

Writes a `crossdiff synth` cache (d=64, 320 planted features in five classes), trains one crosscoder of
each kind on it with the project's trainer (l1, shared: L1 with tied designated latents at a reduced
penalty, batchtopk, dfc: BatchTopK with latents exclusive to each model), and scores them against the
planted truth: FVE, L0, dead fraction, recovery per planted class (a decoder row with cosine > 0.9), the
confusion of planted class vs Δnorm class of the matched latent, and for shared/dfc which block of the
partition the matched latents lie in. The paper's effect (Complete Shrinkage): L1 labels many
weakly-shared features (base at 0.2–0.5 of chat) chat-only; BatchTopK does not. λ is searched for both
L1-family kinds so that their L0 ≈ k (matched L0); the partition settings are the defaults
(CrossCoderSettings: shared_fraction, shared_l1_ratio, dfc_exclusive).

BatchTopK is trained twice, side by side: with today's defaults and with the old recipe (decoder rows at
0.05, zero b_dec, the inference threshold's EMA at 0.999), which left 47–70% of its latents dead. The dead
fraction is reported as the analysis sees it (never firing on the whole cache at inference), on the
held-out tokens, and over training (the trainer's history: `dead_fraction` on the held-out tokens,
`dead_train_fraction` = unfired for `--dead-tokens`).

    python bench/synthetic_recovery.py                 # the BENCHMARKS.md run: k = 8 (the planted features
                                                       # active per token), λ searched so that L1's and
                                                       # shared's L0 ≈ 8
    python bench/synthetic_recovery.py --no-search --l1-coeff 1.5   # BatchTopK's k = L1's measured L0
    python bench/synthetic_recovery.py --quick         # smaller, to check it runs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from crossdiff_core.crosscoder import SPARSITY, CrossCoder, CrossCoderSettings
from crossdiff_core.decoder_norms import CLASSES, class_codes
from crossdiff_core.cache import ActivationCache
from crossdiff_core.metrics import evaluate
from crossdiff_core.synthetic import (PLANTED_CLASSES, SyntheticConfig, ideal_delta_norm, load_truth, score,
                                      write_cache)
from crossdiff_core.trainer import TrainConfig, train_crosscoder

SHORT = {"shared": "shared", "chat_only": "chat-only", "base_only": "base-only", "weakly_shared": "weak",
         "changed_direction": "changed", "other": "other", "dead": "dead"}
# the BatchTopK recipe before issue 12 (what left most latents dead), for the side-by-side column
OLD_BATCHTOPK = {"init_norm": 0.05, "b_dec_init": "zero", "threshold_decay": 0.999}


def train_and_score(cache: Path, out: Path, truth, *, kind: str, dict_size: int, k: int | None, l1_coeff: float,
                    tc: TrainConfig, label: str | None = None, recipe: dict | None = None) -> dict:
    t0 = time.perf_counter()
    tc = replace(tc, crosscoder=CrossCoderSettings(dict_size=dict_size, k=k, l1_coeff=l1_coeff, **(recipe or {})))
    m = train_crosscoder(cache, out, kind=kind, train=tc)
    secs = time.perf_counter() - t0
    model = CrossCoder.load(out).eval()
    c = ActivationCache(cache)
    everywhere = evaluate(model, (x for _, x in c.iter_sequential(8192, dtype=torch.float32)))  # what analysis counts
    s = score(model, truth)
    matches = s.pop("matches")
    # which block of the partition the matched latents of the recovered features lie in (shared, dfc)
    block_of = {j: name for name, r in model.partition().items() for j in r}
    rec = matches[matches["recovered"]]
    s["blocks"] = {c: {b: int((rec.loc[rec["planted_class"] == c, "latent"].map(block_of) == b).sum())
                       for b in model.partition()} for c in PLANTED_CLASSES}
    history = json.loads((out / "history.json").read_text())
    return {"kind": kind, "label": label or kind, "k": k, "l1_coeff": l1_coeff, "recipe": recipe or "defaults",
            "fve_base": m["fve_base"], "fve_chat": m["fve_chat"], "l0": m["l0"], "dead_fraction": m["dead_fraction"],
            "dead_cache": everywhere["dead_fraction"], "dead_train": m["dead_train_fraction"], "seconds": secs,
            "dead_history": [(h["step"], h["dead_fraction"], h["dead_train_fraction"]) for h in history], **s}


def search_lambda(cache: Path, work: Path, *, target_l0: float, dict_size: int, tc: TrainConfig,
                  lams: list[float], kind: str = "l1") -> tuple[float, list[tuple[float, float]]]:
    """Short runs of an L1-family ``kind`` at each λ; interpolate log λ linearly in log L0 to hit ``target_l0``."""
    pts = []

    def run(lam):
        m = train_crosscoder(cache, work / f"search-{kind}-{len(pts)}", kind=kind,
                             train=replace(tc, crosscoder=CrossCoderSettings(dict_size=dict_size, l1_coeff=lam)))
        pts.append((lam, m["l0"]))
        print(f"  {kind} λ search: λ={lam:g} -> L0 {m['l0']:.1f}", flush=True)

    for lam in lams:
        run(lam)
    # widen the bracket (x4 a step, at most 3 more runs) until it holds the target: shared's tied latents pay
    # a fraction of λ, so its λ for a given L0 can lie well outside L1's bracket
    for _ in range(3):
        lo, hi = min(pts), max(pts)
        if min(p[1] for p in pts) <= target_l0 <= max(p[1] for p in pts):
            break
        run(hi[0] * 4 if min(p[1] for p in pts) > target_l0 else lo[0] / 4)
    pts.sort()
    x = [math.log(p[0]) for p in pts]
    y = [math.log(p[1]) for p in pts]
    t = math.log(target_l0)
    for (x0, y0), (x1, y1) in zip(zip(x, y), zip(x[1:], y[1:])):
        if min(y0, y1) <= t <= max(y0, y1) and y0 != y1:
            return math.exp(x0 + (t - y0) * (x1 - x0) / (y1 - y0)), pts
    # outside the bracket: extrapolate from the nearest two
    (x0, y0), (x1, y1) = ((x[0], y[0]), (x[1], y[1])) if t > max(y) else ((x[-2], y[-2]), (x[-1], y[-1]))
    return math.exp(x0 + (t - y0) * (x1 - x0) / (y1 - y0)), pts


def _knob(r: dict) -> str:
    return f"λ={r['l1_coeff']:.3g}" if SPARSITY[r["kind"]] == "l1" else f"k={r['k']}"


def print_table(results: list[dict]) -> None:
    print()
    print(f"{'':26s}" + "".join(f"{r['label'] + ' ' + _knob(r):>18s}" for r in results))
    rows = [("FVE base", "fve_base", "{:.3f}"), ("FVE chat", "fve_chat", "{:.3f}"), ("L0", "l0", "{:.1f}"),
            ("dead, whole cache", "dead_cache", "{:.3f}"), ("dead, held-out tokens", "dead_fraction", "{:.3f}"),
            ("dead, training window", "dead_train", "{:.3f}"), ("train seconds", "seconds", "{:.0f}")]
    for label, key, fmt in rows:
        print(f"{label:26s}" + "".join(f"{fmt.format(r[key]):>18s}" for r in results))
    for c in PLANTED_CLASSES + ("overall",):
        print(f"{'recovery ' + SHORT.get(c, c):26s}" + "".join(f"{r['recovery'][c]:>18.3f}" for r in results))
    print(f"{'weak labelled chat-only':26s}" + "".join(
        f"{r['confusion']['weakly_shared']['chat_only']:>11d} / {sum(r['confusion']['weakly_shared'].values()):<4d}"
        for r in results))
    print(f"{'weak mean Δnorm':26s}" + "".join(f"{r['mean_delta_norm']['weakly_shared']:>18.3f}" for r in results))
    print("\nthe partition's blocks holding the matched latents (recovered features), per planted class")
    for r in results:
        if len(r["blocks"][PLANTED_CLASSES[0]]) > 1:
            print(f"  {r['label']:10s} " + "; ".join(
                f"{SHORT[c]}: " + ", ".join(f"{b} {n}" for b, n in r["blocks"][c].items()) for c in PLANTED_CLASSES))
    print("\ndead fraction over training (step: held-out / training window)")
    for r in results:
        print(f"  {r['label']:16s} " + "  ".join(f"{s}: {d:.2f}/{w:.2f}" for s, d, w in r["dead_history"]))
    for r in results:
        name = f"{r['label']} ({_knob(r)})"
        print(f"\nconfusion, {name}: planted class (rows) x Δnorm class of the matched latent (recovered features)")
        print(f"{'':12s}" + "".join(f"{SHORT[c]:>11s}" for c in CLASSES))
        for c in PLANTED_CLASSES:
            print(f"{SHORT[c]:12s}" + "".join(f"{r['confusion'][c][d]:>11d}" for d in CLASSES))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-tokens", type=int, default=200_000, help="synthetic tokens in the cache")
    ap.add_argument("--train-tokens", type=int, default=4_096_000, help="training tokens per crosscoder")
    ap.add_argument("--dict-size", type=int, default=1024)
    ap.add_argument("--l1-coeff", type=float, default=5.0, help="L1 λ (normalised units; the search's centre)")
    ap.add_argument("--k", type=int, default=8,
                    help="BatchTopK k; 0: the L1 crosscoder's measured L0, rounded (matched L0 after the fact)")
    ap.add_argument("--search", action=argparse.BooleanOptionalAction, default=True,
                    help="with k > 0: first search λ (short runs at λ/2, λ, 2λ) so that L1's and shared's L0 ≈ k")
    ap.add_argument("--kinds", nargs="+", default=["l1", "shared", "batchtopk", "dfc", "batchtopk-old"],
                    choices=["l1", "shared", "batchtopk", "dfc", "batchtopk-old"], help="what to train (default: all)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dead-tokens", type=int, default=100_000, help="BatchTopK: a latent unfired this long is dead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    ap.add_argument("--work", default=None, help="keep the cache and crosscoders here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.n_tokens, a.train_tokens = 40_000, 102_400

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="synth-bench-") as tmp:
        work = Path(a.work or tmp)
        cache = work / "cache"
        t0 = time.perf_counter()
        cfg = SyntheticConfig(n_tokens=a.n_tokens, seed=a.seed)
        write_cache(cfg, cache)
        truth = load_truth(cache)
        print(f"synthetic cache: {a.n_tokens:,} tokens, d={cfg.d_model}, planted {cfg.counts} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)

        # validation every ~5% of the run: the dead fraction over training
        tc = TrainConfig(tokens=a.train_tokens, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                         val_every=max(1, a.train_tokens // a.batch_size // 20), checkpoint_every=0,
                         dead_tokens=a.dead_tokens, progress=False)
        lams = {}
        for kind in ("l1", "shared"):
            lams[kind] = a.l1_coeff
            if kind in a.kinds and a.k and a.search:
                short = TrainConfig(**{**tc.__dict__, "tokens": max(a.batch_size, a.train_tokens // 3)})
                lams[kind], _ = search_lambda(cache, work, target_l0=a.k, dict_size=a.dict_size, tc=short,
                                              lams=[a.l1_coeff / 2, a.l1_coeff, a.l1_coeff * 2], kind=kind)
                print(f"  {kind} λ search picked λ={lams[kind]:.3g} for target L0 {a.k}", flush=True)
        results = {}
        for kind in ("l1", "shared"):
            if kind in a.kinds:
                results[kind] = train_and_score(cache, work / kind, truth, kind=kind, dict_size=a.dict_size, k=None,
                                                l1_coeff=lams[kind], tc=tc)
                print(f"{kind} done: L0 {results[kind]['l0']:.2f} ({results[kind]['seconds']:.0f} s)", flush=True)
        # matched L0: BatchTopK's k is the L1 crosscoder's measured L0 unless --k fixes it
        k = a.k if a.k else max(1, round(results["l1"]["l0"] if "l1" in results else 8))
        for label, kind, recipe in (("batchtopk", "batchtopk", None), ("dfc", "dfc", None),
                                    ("batchtopk-old", "batchtopk", OLD_BATCHTOPK)):
            if label in a.kinds:
                r = results[label] = train_and_score(cache, work / label, truth, kind=kind, dict_size=a.dict_size,
                                                     k=k, l1_coeff=0.0, tc=tc, label=label, recipe=recipe)
                print(f"{label} done: L0 {r['l0']:.2f}, dead {r['dead_cache']:.3f} ({r['seconds']:.0f} s)", flush=True)
        first = next(iter(results))
        ideal = class_codes(ideal_delta_norm(truth, CrossCoder.load(work / first).scales))  # the scales it trained with
        results = list(results.values())

    print_table(results)
    print("\na perfect dictionary (decoder norms = planted write norms / s_m) would give, per planted class:")
    for i, c in enumerate(PLANTED_CLASSES):
        sel = ideal[truth.class_code == i]
        print(f"  {SHORT[c]:10s} " + ", ".join(f"{SHORT[d]} {int((sel == j).sum())}" for j, d in enumerate(CLASSES)
                                             if int((sel == j).sum())))
    total = time.perf_counter() - t_start
    print("\nL0 and recovered weakly-shared features labelled chat-only: " + "; ".join(
        f"{r['label']} {r['l0']:.1f}, {r['chat_only_share']['weakly_shared']:.0%}" for r in results))
    print(f"total time {total:.0f} s on {torch.get_num_threads()} threads "
          f"({a.train_tokens:,} training tokens per crosscoder, F={a.dict_size}, batch {a.batch_size})")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results, "total_seconds": total}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
