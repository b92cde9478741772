"""Latent Scaling on planted data, and the cost of the analysis pass, measured in one run.

1. Planted data (crossdiff_core.synthetic): shared, chat-only, base-only, weakly-shared (base writes
   ρ ∈ [0.2, 0.5] of the chat vector) and changed-direction features. An L1 and a BatchTopK crosscoder
   are trained on it and analysed. Each latent gets the planted class of the feature whose chat
   direction is closest to its chat decoder row (cosine > 0.9; else "unmatched"). "Chat-specific" is
   judged against that truth: precision = share of the selected latents that are planted chat-only,
   recall = share of the planted chat-only features with a selected latent; before (Δnorm class
   chat-only) and after the ν filters (fixed ν_ε < 0.2 & ν_r < 0.5; below the shared latents' 95%
   interval; both).
2. Timing: the full analysis pass (``analyze``: read, encode, decode, Latent Scaling, statistics,
   co-firing) against one plain encode pass (read, normalise, encode) over the same cache, alternated,
   best of ``--repeats``, wall and CPU time; for each trained crosscoder and for larger random
   BatchTopK/L1 crosscoders whose L0 is set by hand (``--big-*``).

    python bench/latent_scaling.py [--work runs/bench-latent-scaling] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from crossdiff_core.allocator import keep_freed_memory  # noqa: E402
from crossdiff_core.analysis import AnalysisConfig, analyze  # noqa: E402
from crossdiff_core.cache import ActivationCache  # noqa: E402
from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig, CrossCoderSettings  # noqa: E402
from crossdiff_core.synthetic import SyntheticConfig, load_truth, write_cache  # noqa: E402
from crossdiff_core.trainer import TrainConfig, train_crosscoder  # noqa: E402

PLANTED = dict(d_model=32, n_shared=48, n_chat_only=24, n_base_only=24, n_weakly_shared=24, n_changed=24,
               mean_active=4.0, n_tokens=120_000, shard_tokens=40_000, seq_len=64, seed=0)


def latent_truth(W_dec: torch.Tensor, truth, threshold: float = 0.9) -> np.ndarray:
    """Planted class of each latent, judged from the latent's side: the class of the planted feature
    whose chat direction is closest to the latent's chat decoder row, if that cosine > ``threshold``
    (else "unmatched"). Two latents splitting one chat-only feature both count as chat-only."""
    Wc = torch.nn.functional.normalize(W_dec.detach()[1].float(), dim=-1)
    cos = Wc @ truth.dir_chat.T  # [F, N]; dir_chat is a unit row, or zero for base-only features
    best, feat = cos.max(dim=1)
    lab = np.array(truth.classes(), dtype=object)[feat.numpy()]
    lab[(best <= threshold).numpy()] = "unmatched"
    return lab


def feature_recall(sel: np.ndarray, W_dec: torch.Tensor, truth, threshold: float = 0.9) -> float:
    """Share of planted chat-only features with at least one selected latent matched to them (cosine >
    threshold between the feature's chat direction and the latent's chat row)."""
    Wc = torch.nn.functional.normalize(W_dec.detach()[1].float(), dim=-1)
    co = torch.tensor([c == "chat_only" for c in truth.classes()])
    cos = truth.dir_chat[co] @ Wc.T  # [n_chat_only, F]
    hit = (cos > threshold) & torch.as_tensor(np.asarray(sel, dtype=bool).copy())[None, :]
    return float(hit.any(dim=1).float().mean())


def selection_report(table: pd.DataFrame, filters: dict, lab: np.ndarray, W_dec: torch.Tensor, truth) -> list[dict]:
    chat = (table["class"] == "chat_only").to_numpy()
    sets = {"Δnorm chat-only": chat, "+ fixed ν filter": filters["fixed"],
            "+ shared-interval filter": filters["data_driven"], "+ both filters": filters["both"]}
    rows = []
    for name, sel in sets.items():
        n = int(sel.sum())
        tp = int((sel & (lab == "chat_only")).sum())
        comp = {c: int((sel & (lab == c)).sum()) for c in ("chat_only", "weakly_shared", "shared", "changed_direction",
                                                           "base_only", "unmatched")}
        rows.append({"set": name, "n": n, "precision": tp / n if n else float("nan"),
                     "recall": feature_recall(sel, W_dec, truth), **comp})
    return rows


def nu_by_truth(table: pd.DataFrame, lab: np.ndarray) -> pd.DataFrame:
    """Median ν_ε, ν_r (and count) of the Δnorm chat-only latents, by planted class."""
    co = table[(table["class"] == "chat_only").to_numpy()].copy()
    co["truth"] = lab[co["latent"].to_numpy()]
    return co.groupby("truth").agg(n=("latent", "size"), nu_error_median=("nu_error", "median"),
                                   nu_recon_median=("nu_recon", "median"),
                                   nu_error_min=("nu_error", "min"), nu_error_max=("nu_error", "max"))


@torch.no_grad()
def encode_pass(model: CrossCoder, cache: ActivationCache, batch_size: int, *, sparse: bool = False) -> int:
    """The baseline: read every batch, normalise, encode. L1: dense ReLU codes (the cheapest form), or
    sparse codes with ``sparse``; BatchTopK: thresholded sparse codes. Returns the active codes seen."""
    nnz = 0
    for _, x in cache.iter_sequential(batch_size):
        if model.cfg.kind == "l1" and not sparse:
            nnz += int((model.encode(x) > 0).sum())
        else:
            nnz += model.encode_sparse(model.normalise(x), normalised=True).values.numel()
    return nnz


def time_pass(model: CrossCoder, cache: ActivationCache, batch_size: int, repeats: int) -> dict:
    """Best-of-``repeats`` wall and CPU (process) seconds of the passes, alternated. For L1 a second
    baseline produces sparse codes (``encode_sparse``, which adds a ``nonzero`` over ``[N, F]``)."""
    cfg = AnalysisConfig(batch_size=batch_size, progress=False, allow_other_cache=True)
    passes = {"encode": lambda: encode_pass(model, cache, batch_size),
              "analysis": lambda: analyze(model, cache, cfg)}
    if model.cfg.kind == "l1":
        passes["encode_sparse"] = lambda: encode_pass(model, cache, batch_size, sparse=True)
    t = {k: [] for k in passes}
    nnz = encode_pass(model.eval(), cache, batch_size)  # warm the page cache
    for _ in range(repeats):
        for name, fn in passes.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            t[name].append((time.perf_counter() - w, time.process_time() - c))
    best = {k: (min(v[0] for v in ts), min(v[1] for v in ts)) for k, ts in t.items()}
    return {"best": best, "l0": nnz / cache.n_tokens}


def train(cache_dir: Path, out: Path, kind: str, args) -> CrossCoder:
    if not (out / "model.safetensors").exists():
        tc = TrainConfig(tokens=args.tokens, batch_size=args.train_batch, lr=args.lr, progress=False,
                         val_every=0, checkpoint_every=0, val_tokens=4096, dead_tokens=args.dead_tokens, seed=0)
        t = time.perf_counter()
        tc.crosscoder = CrossCoderSettings(dict_size=args.dict_size, k=args.k, l1_coeff=args.l1_coeff,
                                           **({"threshold_decay": 0.99} if kind == "batchtopk" else {}))
        m = train_crosscoder(cache_dir, out, kind=kind, train=tc)
        print(f"trained {kind}: {time.perf_counter() - t:.0f} s, FVE base {m['fve_base']:.3f} chat "
              f"{m['fve_chat']:.3f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.3f}")
    return CrossCoder.load(out).eval()


def big_random(kind: str, d: int, F: int, k: int, cache: ActivationCache) -> CrossCoder:
    """A random crosscoder of a realistic size whose L0 is about ``k`` (BatchTopK: threshold set to the
    k-th score quantile of a sample; L1: encoder bias shifted to the same quantile)."""
    g = torch.Generator().manual_seed(0)
    cfg = CrossCoderConfig(kind=kind, d_model=d, dict_size=F, k=k if kind == "batchtopk" else None)
    m = CrossCoder(cfg, scales=cache.scales(), seed=0).eval()
    with torch.no_grad():
        m.W_enc.copy_(torch.randn(2, d, F, generator=g) / d**0.5)
        x = m.normalise(cache.read_rows(0, min(4096, cache.n_tokens)))
        pre = m.pre_activations(x)
        q = 1.0 - k / F
        if kind == "l1":
            m.b_enc.sub_(torch.quantile(pre.flatten()[:1 << 24], q))
        else:
            v = m.scores(pre)
            m.threshold.fill_(float(torch.quantile(v.flatten()[:1 << 24], q)))
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-latent-scaling")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--dict-size", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--l1-coeff", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=1_500_000)
    ap.add_argument("--train-batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dead-tokens", type=int, default=50_000, help="BatchTopK: AuxK revives latents unfired this long")
    ap.add_argument("--batch-size", type=int, default=4096, help="analysis batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big-d", type=int, default=256)
    ap.add_argument("--big-F", type=int, default=16384)
    ap.add_argument("--big-k", type=int, default=64)
    ap.add_argument("--big-tokens", type=int, default=32768)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 gives steadier ratios on a busy machine)")
    args = ap.parse_args()
    planted = dict(PLANTED)
    if args.quick:
        planted.update(n_tokens=20_000, shard_tokens=10_000)
        args.tokens, args.repeats, args.big_F, args.big_tokens = 100_000, 1, 2048, 8192
    work = Path(args.work)
    if args.threads:
        torch.set_num_threads(args.threads)
    # what training and analyze do on CPU anyway; set up front so that every timed pass runs with it
    kept = keep_freed_memory()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}, "
          f"freed memory kept: {kept}")

    # ---- 1. planted data -----------------------------------------------------------------------------
    cache_dir = work / "planted"
    scfg = SyntheticConfig(**planted)
    marker = cache_dir / "bench-config.json"
    if not marker.exists() or json.loads(marker.read_text()) != planted:
        write_cache(scfg, cache_dir)
        marker.write_text(json.dumps(planted))
    cache = ActivationCache(cache_dir)
    truth = load_truth(cache_dir)
    tag = f"F{args.dict_size}-t{args.tokens}-lr{args.lr}"
    models = {"l1": train(cache_dir, work / f"l1-{tag}-l{args.l1_coeff}", "l1", args),
              "batchtopk": train(cache_dir, work / f"batchtopk-{tag}-k{args.k}-dead{args.dead_tokens}", "batchtopk", args)}
    print(f"\nplanted: d={scfg.d_model}, features {scfg.counts}, {scfg.n_tokens} tokens; F={args.dict_size}, "
          f"L1 λ={args.l1_coeff}, BatchTopK k={args.k}")
    for kind, model in models.items():
        res = analyze(model, cache, AnalysisConfig(batch_size=args.batch_size, progress=False))
        lab = latent_truth(model.W_dec, truth)
        dd = res.summary["filters"]["data_driven"]
        ie, ir = ([None if v is None else round(v, 3) for v in dd[k]]
                  for k in ("shared_nu_error_interval", "shared_nu_recon_interval"))
        dc = res.summary["decoupling"]
        print(f"\n== {kind}: classes {res.summary['classes']}, decoupling pairs {dc['n_pairs']} "
              f"({dc['n_cofiring_pairs']} co-firing on > half the chat-only latent's tokens), "
              f"shared latents' 95% ν_ε interval {ie}, ν_r {ir} (over {dd['n_shared']} shared latents)")
        print("ν of the Δnorm chat-only latents by planted class:")
        print(nu_by_truth(res.table, lab).to_string(float_format=lambda v: f"{v:.3f}"))
        rep = pd.DataFrame(selection_report(res.table, res.filters, lab, model.W_dec, truth))
        print("chat-specific selections against the truth:")
        print(rep.to_string(index=False, float_format=lambda v: f"{v:.2f}"))

    # ---- 2. timing -----------------------------------------------------------------------------------
    print(f"\ntiming: analysis pass vs plain encode pass, batch {args.batch_size}, best of {args.repeats}")
    print(f"{'crosscoder':>34} {'tokens':>7} {'L0':>6} {'baseline':>13} {'encode s':>9} {'analysis s':>11} {'ratio':>6}"
          f" {'encode cpu s':>12} {'analysis cpu s':>14} {'cpu ratio':>9}")
    runs = [(f"planted {k} d={scfg.d_model} F={args.dict_size}", m, cache) for k, m in models.items()]
    if not args.skip_big:
        big_dir = work / f"random-d{args.big_d}-n{args.big_tokens}"
        bcfg = SyntheticConfig(d_model=args.big_d, n_shared=400, n_chat_only=100, n_base_only=100,
                               n_weakly_shared=100, n_changed=100, mean_active=16.0,
                               n_tokens=args.big_tokens, shard_tokens=32768, seed=1)
        if not (big_dir / "manifest.json").exists():
            write_cache(bcfg, big_dir)
        bcache = ActivationCache(big_dir)
        for kind in ("batchtopk", "l1"):
            runs.append((f"random {kind} d={args.big_d} F={args.big_F}",
                         big_random(kind, args.big_d, args.big_F, args.big_k, bcache), bcache))
    for name, m, c in runs:
        r = time_pass(m, c, args.batch_size, args.repeats)
        (aw, ac) = r["best"]["analysis"]
        for base in [k for k in r["best"] if k != "analysis"]:
            ew, ec = r["best"][base]
            print(f"{name:>34} {c.n_tokens:>7} {r['l0']:>6.1f} {base:>13} {ew:>9.3f} {aw:>11.3f} {aw / ew:>6.2f}"
                  f" {ec:>12.3f} {ac:>14.3f} {ac / ec:>9.2f}")
    print(f"load avg at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
