"""Which input normalisation keeps shared features shared: per_model vs joint vs none, side by side.

Planted worlds (crossdiff_core.synthetic, d = 64, 320 features in five classes) where the chat model's mean
squared norm is ``--ratio²`` (default 1.74, the real fine-tune of issue 12) times the base's:

- ``equal``: no growth (the control);
- ``massive``: the growth sits in ``--massive-dims`` axis dimensions of the chat activations (a near-constant
  offset per token, as massive activations are); every planted feature writes the same vector as before,
  so a shared feature is equal in both models' own units;
- ``uniform``: ``chat_gain = ratio``: the chat model is the base model scaled up, every feature included.

For each world and convention it trains a small crosscoder of each kind (F = 512, ~0.5M tokens), analyses
it (crossdiff_core.analysis), and reports, over the planted SHARED features that were recovered, the
median Δnorm, the share in the shared band [0.4, 0.6] and the median ν_ε, ν_r of their latents, plus
recovery per planted class (synthetic.score), FVE and L0.

    python bench/normalisation.py                # the BENCHMARKS.md run
    python bench/normalisation.py --quick        # smaller, to check it runs
    python bench/normalisation.py --kinds l1 --worlds massive uniform
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from crossdiff_core.analysis import AnalysisConfig, analyze
from crossdiff_core.cache import ActivationCache, CacheWriter
from crossdiff_core.crosscoder import CrossCoder, CrossCoderSettings
from crossdiff_core.normalisation import NORMALISATIONS
from crossdiff_core.synthetic import (PLANTED_CLASSES, SyntheticConfig, generate_shard, load_truth, make_truth,
                                      score)
from crossdiff_core.trainer import TrainConfig, train_crosscoder

WORLDS = ("equal", "massive", "uniform")
SHORT = {"shared": "shared", "chat_only": "chat-only", "base_only": "base-only", "weakly_shared": "weak",
         "changed_direction": "changed", "overall": "overall"}


def write_world(cfg: SyntheticConfig, out: Path, *, world: str, ratio: float, massive_dims: int,
                jitter: float = 0.1) -> None:
    """A synthetic cache for ``world``; ``massive`` adds ``x_c[:, :k] += m (1 + jitter ε)`` with ``m`` set so that
    ``E||x_c||² = ratio² E||x_b||²``."""
    if world == "uniform":
        cfg = replace(cfg, chat_gain=ratio)
    truth = make_truth(cfg)
    writer = CacheWriter(out, d_model=cfg.d_model, layer=0, dtype="float32",
                         metadata={"models": {"base": "synthetic:base", "chat": f"synthetic:chat-{world}"},
                                   "source": "synthetic", "world": world})
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    m = None
    for i in range(cfg.n_shards):
        base, chat, tokens = generate_shard(cfg, truth, i)
        if world == "massive":
            if m is None:  # from the first shard: the added mean square (ratio² − 1) q_b over k dims
                q_b, q_c = float(base.pow(2).sum(1).mean()), float(chat.pow(2).sum(1).mean())
                m = ((ratio ** 2 * q_b - q_c) / massive_dims / (1 + jitter ** 2)) ** 0.5
            chat[:, :massive_dims] += m * (1 + jitter * torch.randn(chat.shape[0], massive_dims, generator=g))
        writer.write_shard(i, base, chat, tokens)
    writer.finalize(cfg.n_shards)
    truth.save(out)


def measure(cache: Path, out: Path, truth, *, kind: str, convention: str, tc: TrainConfig, dict_size: int,
            k: int, l1_coeff: float, b_dec_init: str | None = None) -> dict:
    t0 = time.perf_counter()
    tc = replace(tc, crosscoder=CrossCoderSettings(dict_size=dict_size, k=k, l1_coeff=l1_coeff,
                                                   normalisation=convention, b_dec_init=b_dec_init))
    m = train_crosscoder(cache, out, kind=kind, train=tc)
    model = CrossCoder.load(out).eval()
    table = analyze(model, ActivationCache(cache), AnalysisConfig(progress=False)).table
    s = score(model, truth)
    rec = s.pop("matches")
    shared = rec[(rec["planted_class"] == "shared") & rec["recovered"]]
    lat = table.set_index("latent").loc[shared["latent"].to_numpy()]
    dn, ne, nr = (lat[c].to_numpy() for c in ("delta_norm", "nu_error", "nu_recon"))

    def med(v: np.ndarray) -> float:
        v = v[np.isfinite(v)]
        return float(np.median(v)) if v.size else float("nan")

    live = table["class"] != "dead"
    return {"kind": kind, "convention": convention, "scales": model.scales.tolist(),
            "fve_base": m["fve_base"], "fve_chat": m["fve_chat"], "l0": m["l0"],
            "shared_dn_median": med(dn), "shared_in_band": float(((dn >= 0.4) & (dn <= 0.6)).mean()) if dn.size else 0.0,
            "shared_nu_error_median": med(ne), "shared_nu_recon_median": med(nr),
            "live_dn_median": float(table.loc[live, "delta_norm"].median()),
            "dead_fraction": float((~live).mean()),
            "chat_only_latents": int((table["class"] == "chat_only").sum()),
            "recovery": s["recovery"], "seconds": time.perf_counter() - t0}


def print_table(world: str, ratio_seen: float, results: list[dict]) -> None:
    print(f"\nworld {world}: measured s_c/s_b (per model) = {ratio_seen:.3f}")
    heads = [f"{r['kind']}/{r['convention']}" for r in results]
    print(f"{'':28s}" + "".join(f"{h:>17s}" for h in heads))
    rows = [("s_b, s_c", lambda r: f"{r['scales'][0]:.2f}, {r['scales'][1]:.2f}"),
            ("FVE base / chat", lambda r: f"{r['fve_base']:.3f}/{r['fve_chat']:.3f}"),
            ("L0", lambda r: f"{r['l0']:.1f}"),
            ("shared: median Δnorm", lambda r: f"{r['shared_dn_median']:.3f}"),
            ("shared: in [0.4, 0.6]", lambda r: f"{r['shared_in_band']:.0%}"),
            ("shared: median ν_ε", lambda r: f"{r['shared_nu_error_median']:.3f}"),
            ("shared: median ν_r", lambda r: f"{r['shared_nu_recon_median']:.3f}"),
            ("live latents: median Δnorm", lambda r: f"{r['live_dn_median']:.3f}"),
            ("chat-only latents", lambda r: f"{r['chat_only_latents']}"),
            ("dead fraction", lambda r: f"{r['dead_fraction']:.3f}")]
    rows += [(f"recovery {SHORT[c]}", (lambda c: lambda r: f"{r['recovery'][c]:.3f}")(c))
             for c in PLANTED_CLASSES + ("overall",)]
    rows += [("seconds", lambda r: f"{r['seconds']:.0f}")]
    for label, fmt in rows:
        print(f"{label:28s}" + "".join(f"{fmt(r):>17s}" for r in results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=WORLDS)
    ap.add_argument("--conventions", nargs="+", default=list(NORMALISATIONS), choices=NORMALISATIONS)
    ap.add_argument("--kinds", nargs="+", default=["l1", "batchtopk"], choices=["l1", "batchtopk"])
    ap.add_argument("--ratio", type=float, default=1.32, help="target s_c/s_b (sqrt of the mean-square ratio)")
    ap.add_argument("--massive-dims", type=int, default=2)
    ap.add_argument("--n-tokens", type=int, default=131_072)
    ap.add_argument("--train-tokens", type=int, default=512_000)
    ap.add_argument("--dict-size", type=int, default=512)
    ap.add_argument("--l1-coeff", type=float, default=5.0)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--b-dec-init", default=None, choices=["zero", "mean"], help="decoder bias init (default: per kind)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.n_tokens, a.train_tokens = 32_768, 65_536
    tc = TrainConfig(tokens=a.train_tokens, batch_size=1024, lr=a.lr, seed=a.seed, val_every=0, checkpoint_every=0,
                     dead_tokens=100_000, progress=False)
    out = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="norm-bench-") as tmp:
        for world in a.worlds:
            cache = Path(tmp) / world / "cache"
            write_world(SyntheticConfig(n_tokens=a.n_tokens, shard_tokens=32_768, seed=a.seed), cache, world=world,
                        ratio=a.ratio, massive_dims=a.massive_dims)
            truth = load_truth(cache)
            stats = ActivationCache(cache).manifest["stats"]
            seen = (stats["chat"]["mean_sq_norm"] / stats["base"]["mean_sq_norm"]) ** 0.5
            res = []
            for kind in a.kinds:
                for conv in a.conventions:
                    r = measure(cache, Path(tmp) / world / f"{kind}-{conv}", truth, kind=kind, convention=conv, tc=tc,
                                dict_size=a.dict_size, k=a.k, l1_coeff=a.l1_coeff, b_dec_init=a.b_dec_init)
                    print(f"  {world} {kind} {conv}: shared Δnorm {r['shared_dn_median']:.3f}, "
                          f"ν_ε {r['shared_nu_error_median']:.3f} ({r['seconds']:.0f} s)", flush=True)
                    res.append(r)
            print_table(world, seen, res)
            out[world] = {"ratio": seen, "results": res}
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s on {torch.get_num_threads()} threads "
          f"({a.train_tokens:,} training tokens per crosscoder, F={a.dict_size})")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "worlds": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
