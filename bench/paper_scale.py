"""One optimisation step at the paper's shape, dense and sparse (issue 14), against the dense GEMM limit.

For each configuration (d, F, B, k, products) it runs full BatchTopK training steps (loss with AuxK on
10% dead latents, backward, clipping, Adam) on an in-memory batch, each configuration in a fresh
process (peak RSS from ``/proc/self/status`` VmHWM, or the CUDA allocator's peak), modes alternated over
``--rounds`` rounds, best kept. The limit is the best rate, in the same process, of GEMMs shaped like the
step's own products (``[B,2d]×[2d,F']``, ``[B,F']×[F',2d]``, ``[2d,B]×[B,F']`` with ``F' = min(F, 4096)``),
turned into tokens/s for the reference cost of 24·d·F FLOPs a token. One instrumented step times
Adam's pass (and the clipping) on their own.

Shapes: today's bench shapes (d=256 F=4096 B=2048 k=32; d=576 F=8192 B=1024 k=64; with ``--crossover``
also k = F/32 and F/16 there) and the paper's (d=2304 F=73,728 k=100, B=2048; the dense step at
``--paper-dense-batch``, 256 by default: at B=2048 its ``[B, F]`` temporaries do not fit beside the
11 GB of weights, gradients and Adam state in 20 GiB).

    python bench/paper_scale.py [--rounds 2] [--only small|paper] [--device cuda] [--dtype bfloat16]

The last line printed, when the paper's shape runs, is ``paper-scale batchtopk sparse step: R x the dense limit``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from crossdiff_core.allocator import keep_freed_memory
from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.trainer import adam
from crossdiff_core.trainer import optimisation_step

PAPER = (2304, 73_728, 100)
SMALL = [(256, 4096, 2048, 32), (576, 8192, 1024, 64)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def gemm_rate(d: int, F: int, B: int, dtype: torch.dtype, device: torch.device, reps: int = 2) -> float:
    """Best FLOP/s of the three product shapes of a dense step (F cut to 4096 columns)."""
    Fs = min(F, 4096)
    X = torch.randn(B, 2 * d, device=device).to(dtype)
    W = torch.randn(2 * d, Fs, device=device).to(dtype)
    G = torch.randn(B, Fs, device=device).to(dtype)
    Wd = torch.randn(Fs, 2 * d, device=device).to(dtype)
    best = 0.0
    for prod in (lambda: X @ W, lambda: G @ Wd, lambda: X.t() @ G):
        prod()
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            prod()
            _sync(device)
            best = max(best, 2 * B * 2 * d * Fs / (time.perf_counter() - t))
    return best


def child(spec: dict) -> dict:
    """In a fresh process: seconds per step, its parts, the GEMM limit and the peak memory."""
    device = torch.device(spec["device"])
    if spec["malloc"] == "keep" and device.type == "cpu":
        keep_freed_memory()
    d, F, B, k = spec["d"], spec["F"], spec["B"], spec["k"]
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    limit = gemm_rate(d, F, B, dtype, device)
    cfg = CrossCoderConfig(kind="batchtopk", d_model=d, dict_size=F, k=k, init_norm=0.1)
    model = CrossCoder(cfg, seed=0, device=device)
    opt = adam(model.parameters(), 1e-4, fused=spec.get("fused_adam", True))  # the trainer's
    x = torch.randn(B, 2, d, device=device)
    dead = torch.zeros(F, dtype=torch.bool, device=device)
    dead[torch.randperm(F, generator=torch.Generator().manual_seed(1))[: F // 10].to(device)] = True
    cd = None if dtype == torch.float32 else dtype

    def step():
        return optimisation_step(model, opt, x, l1_coeff=0.0, dead=dead, grad_clip=1.0, compute_dtype=cd,
                                 products=spec["products"])

    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        _sync(device)
        t = time.perf_counter()
        out = step()
        _sync(device)
        times.append(time.perf_counter() - t)
    # Adam and the clipping on their own, after one more backward
    opt.zero_grad(set_to_none=True)
    model.loss(x, dead=dead, products=spec["products"]).loss.backward()
    _sync(device)
    t0 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    _sync(device)
    t1 = time.perf_counter()
    opt.step()
    _sync(device)
    t2 = time.perf_counter()
    return {"step_s": min(times), "clip_s": t1 - t0, "adam_s": t2 - t1, "limit": limit,
            "peak_gib": _peak_gib(device), "l0": float(out.l0), "aux": float(out.aux.detach())}


def run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process at today's shapes")
    ap.add_argument("--paper-steps", type=int, default=2, help="timed steps per process at the paper's shape")
    ap.add_argument("--paper-batch", type=int, default=2048)
    ap.add_argument("--paper-dense-batch", type=int, default=256)
    ap.add_argument("--only", choices=("small", "paper"), help="only today's shapes, or only the paper's")
    ap.add_argument("--crossover", action="store_true", help="also k = F/32 and F/16 at today's shapes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--malloc", default="keep", choices=("keep", "default"),
                    help="CPU: keep freed memory (the trainer's default) or glibc's default malloc")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--unfused-adam", action="store_true",
                    help="also the paper-shape sparse step with torch's unfused Adam, side by side")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    base = {"device": args.device, "dtype": args.dtype, "malloc": args.malloc}
    configs = []  # (label, spec) per row; modes of one shape are adjacent so they alternate in a round
    if args.only != "paper":
        shapes = [(64, 1024, 256, 8)] if args.quick else list(SMALL)
        if args.crossover and not args.quick:
            shapes += [(d, F, B, F // q) for d, F, B, _ in SMALL for q in (32, 16)]
        for d, F, B, k in shapes:
            for products in ("dense", "sparse", "auto"):
                configs.append({**base, "d": d, "F": F, "B": B, "k": k, "products": products,
                                "steps": args.steps, "warmup": 2})
    if args.only != "small":
        d, F, k = (128, 8192, 8) if args.quick else PAPER
        for products, B in (("dense", args.paper_dense_batch), ("sparse", args.paper_batch)):
            configs.append({**base, "d": d, "F": F, "B": B, "k": k, "products": products,
                            "steps": args.paper_steps, "warmup": 1, "paper": True})
        if args.unfused_adam:  # the sparse step again with Adam's per-parameter loop (before the trainer fused it)
            configs.append({**configs[-1], "fused_adam": False})
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"{args.dtype}, malloc {args.malloc}", flush=True)
    best: list[dict | None] = [None] * len(configs)
    for r in range(args.rounds):
        for i, spec in enumerate(configs):
            res = run_child(spec)
            if best[i] is None or res["step_s"] < best[i]["step_s"]:
                best[i] = res | {"limit_best": max(res["limit"], (best[i] or {}).get("limit_best", 0.0))}
            else:
                best[i]["limit_best"] = max(best[i]["limit_best"], res["limit"])
        print(f"round {r + 1} done", flush=True)
    print(f"\n{'d':>5} {'F':>6} {'B':>5} {'k':>4} {'step':>12} {'s/step':>7} {'tok/s':>9} {'GEMM GF/s':>9} "
          f"{'limit tok/s':>11} {'ratio':>6} {'Adam s':>6} {'clip s':>6} {'peak GiB':>8}")
    paper_ratio = float("nan")
    shape_limit: dict[tuple, float] = {}  # one limit per (d, F): the best of every process at that shape
    for spec, res in zip(configs, best):
        key = (spec["d"], spec["F"])
        shape_limit[key] = max(shape_limit.get(key, 0.0), res["limit_best"])
    for spec, res in zip(configs, best):
        rate = spec["B"] / res["step_s"]
        gemm = shape_limit[(spec["d"], spec["F"])]
        lim = gemm / (24 * spec["d"] * spec["F"])
        mode = spec["products"] + ("" if spec.get("fused_adam", True) else "+loop")
        print(f"{spec['d']:>5} {spec['F']:>6} {spec['B']:>5} {spec['k']:>4} {mode:>12} "
              f"{res['step_s']:7.3f} {rate:9,.1f} {gemm / 1e9:9.1f} {lim:11,.1f} {rate / lim:6.2f} "
              f"{res['adam_s']:6.3f} {res['clip_s']:6.3f} {res['peak_gib']:8.2f}")
        if spec.get("paper") and spec["products"] == "sparse" and spec.get("fused_adam", True):
            paper_ratio = rate / lim
    print("ratio: tokens/s / the limit's tokens/s (24·d·F FLOPs a token at the best GEMM rate of the same "
          "processes); step = the loss's products (auto: chosen by code density)")
    if paper_ratio == paper_ratio:  # measured only when the paper's shape ran (not with --only small)
        print(f"paper-scale batchtopk sparse step: {paper_ratio:.2f} x the dense limit")


if __name__ == "__main__":
    main()
