"""Why dfc's exclusive latents die: an initial head start for them, measured on a planted world.

At init an exclusive latent reads one model and writes one half, so its BatchTopK score
relu(pre) · Σ_m ||d_j^m|| starts below a shared-block latent's (which reads both models and writes two
halves). This trains dfc crosscoders on the `crossdiff synth` world of bench/synthetic_recovery.py (d=64,
320 planted features, k=8, F=1024, 1M tokens) with the exclusive latents' one half scaled at init, encoder row
by `enc` and decoder row by `dec` (the crosscoder's own init for (1, 1)), and reports per block of the
partition: latents that never fire on the whole cache, how often the live exclusive latents fire, how well
they match any planted feature (the best cosine of their decoder row with a planted direction in their
model), and which block the recovered planted features' latents lie in.

The head start is applied by scaling the freshly built crosscoder's weights (a wrapper around
`CrossCoder.__init__`), not by a setting: it is a diagnosis, not a knob (BENCHMARKS.md says why).

    python bench/dfc_exclusive.py [--variants 1,1 1,2 2,2] [--train-tokens N] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_recovery as sr  # noqa: E402  (train_and_score: the recovery bench's own scoring)

from crossdiff_core import crosscoder as ccm  # noqa: E402
from crossdiff_core.cache import ActivationCache  # noqa: E402
from crossdiff_core.synthetic import PLANTED_CLASSES, SyntheticConfig, load_truth, write_cache  # noqa: E402
from crossdiff_core.trainer import TrainConfig  # noqa: E402

EXCLUSIVE = (("base_exclusive", 0), ("chat_exclusive", 1))  # block, the model it reads and writes


def head_start(enc: float, dec: float):
    """A wrapper of ``CrossCoder.__init__`` that scales a dfc crosscoder's exclusive rows at init."""
    orig = ccm.CrossCoder.__init__

    def init(self, cfg, **kw):
        orig(self, cfg, **kw)
        if cfg.kind == "dfc":
            with torch.no_grad():
                for name, _ in EXCLUSIVE:
                    r = cfg.partition()[name]
                    self.W_dec[:, r.start:r.stop] *= dec
                    self.W_enc_rows[r.start:r.stop] *= enc
    return orig, init


def fire_counts(model, cache: Path) -> tuple[torch.Tensor, int]:
    """``[F]`` tokens each latent fires on over the whole cache (inference threshold), and the token count."""
    F = model.cfg.dict_size
    cnt, n = torch.zeros(F, dtype=torch.float64), 0
    for _, x in ActivationCache(cache).iter_sequential(8192, dtype=torch.float32):
        with torch.no_grad():
            c = model.encode_sparse(x)
        cnt += torch.bincount(c.latents, minlength=F).double()
        n += x.shape[0]
    return cnt, n


def block_report(model, truth, cnt: torch.Tensor, n: int) -> dict:
    W = model.W_dec.detach().float()
    Wn = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = {}
    for name, r in model.partition().items():
        c = cnt[r.start:r.stop]
        alive = c > 0
        rec = {"size": len(r), "dead": int((~alive).sum()),
               "alive_freq_median": float((c[alive] / n).median()) if alive.any() else float("nan")}
        half = dict(EXCLUSIVE).get(name)
        if half is not None:  # the best cosine of each live exclusive row with a planted direction in its model
            dirs = truth.dir_base if half == 0 else truth.dir_chat
            best = (dirs @ Wn[half, r.start:r.stop].T).max(0).values[alive]
            rec |= {"alive_best_cos_median": float(best.median()) if len(best) else float("nan"),
                    "alive_cos_over_0.9": int((best > 0.9).sum())}
        out[name] = rec
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["1,1", "1.414,2", "2,2"],
                    help="enc,dec scale pairs for the exclusive rows at init (1,1: the crosscoder's own init)")
    ap.add_argument("--n-tokens", type=int, default=200_000)
    ap.add_argument("--train-tokens", type=int, default=1_024_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dfc-bench-") as tmp:
        work = Path(tmp)
        cache = work / "cache"
        write_cache(SyntheticConfig(n_tokens=a.n_tokens, seed=a.seed), cache)
        truth = load_truth(cache)
        tc = TrainConfig(tokens=a.train_tokens, batch_size=1024, lr=3e-3, seed=a.seed, val_every=50,
                         checkpoint_every=0, dead_tokens=100_000, progress=False)
        rows = []
        for v in a.variants:
            enc, dec = (float(s) for s in v.split(","))
            orig, init = head_start(enc, dec)
            ccm.CrossCoder.__init__ = init
            try:
                r = sr.train_and_score(cache, work / f"dfc-{v}", truth, kind="dfc", dict_size=1024, k=8,
                                       l1_coeff=1.0, tc=tc, label=f"enc x{enc:g}, dec x{dec:g}")
            finally:
                ccm.CrossCoder.__init__ = orig
            model = ccm.CrossCoder.load(work / f"dfc-{v}").eval()
            r["per_block"] = block_report(model, truth, *fire_counts(model, cache))
            rows.append(r)
            print(f"{r['label']}: done in {r['seconds']:.0f} s", flush=True)
    print(f"\ndfc, k=8, F=1024, {a.train_tokens:,} training tokens, {a.n_tokens:,}-token planted world; "
          f"{time.perf_counter() - t_all:.0f} s on {torch.get_num_threads()} threads")
    print(f"{'exclusive rows at init':24s}{'FVE b/c':>13s}{'recovery':>10s}  per block: dead / size, live latents' "
          "median firing frequency, their median best cosine with a planted direction, how many exceed 0.9")
    for r in rows:
        print(f"{r['label']:24s}{r['fve_base']:>7.3f}/{r['fve_chat']:.3f}{r['recovery']['overall']:>10.3f}")
        for name, b in r["per_block"].items():
            extra = (f"  best cos {b['alive_best_cos_median']:.2f}, {b['alive_cos_over_0.9']} > 0.9"
                     if "alive_best_cos_median" in b else "")
            print(f"{'':26s}{name:16s} dead {b['dead']:>4d} / {b['size']:<5d} live freq {b['alive_freq_median']:.1e}{extra}")
    print("\nrecovered planted features by the block of their latent (base-exclusive / chat-exclusive / shared)")
    for r in rows:
        print(f"  {r['label']:22s} " + "; ".join(
            f"{sr.SHORT[c]}: " + "/".join(str(r["blocks"][c][n]) for n in ("base_exclusive", "chat_exclusive", "shared"))
            for c in PLANTED_CLASSES))


if __name__ == "__main__":
    main()
