"""Crosscoder training throughput against this machine's matmul limit, measured in one run.

For each shape (d, F, B), mode (L1; BatchTopK with AuxK on 10% dead latents) and dtype (fp32; bf16
autocast) it times full optimisation steps (loss, backward, clipping, Adam) on in-memory batches, and
divides by the tokens/s that a large GEMM of the same dtype would reach for the reference cost of
24·d·F FLOPs per token (encoder and decoder, forward and backward).

    python bench/train_throughput.py [--steps 6] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.trainer import optimisation_step


def gemm_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Sustained FLOP/s of an n×n×n matmul in ``dtype`` (best of ``reps``)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_rate(kind: str, d: int, F: int, B: int, k: int, dtype: torch.dtype, steps: int,
              warmup: int = 2) -> tuple[float, float]:
    """(tokens/s, L0) of full training steps."""
    torch.manual_seed(0)
    cfg = CrossCoderConfig(kind=kind, d_model=d, dict_size=F, k=k, l1_coeff=0.05, init_norm=0.1)
    model = CrossCoder(cfg, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(B, 2, d)
    dead = None
    if kind == "batchtopk":
        dead = torch.zeros(F, dtype=torch.bool)
        dead[torch.randperm(F, generator=torch.Generator().manual_seed(1))[: F // 10]] = True
    cd = None if dtype == torch.float32 else dtype
    for _ in range(warmup):
        out = optimisation_step(model, opt, x, l1_coeff=0.05, dead=dead, grad_clip=1.0, compute_dtype=cd)
    t = time.perf_counter()
    for _ in range(steps):
        out = optimisation_step(model, opt, x, l1_coeff=0.05, dead=dead, grad_clip=1.0, compute_dtype=cd)
    el = time.perf_counter() - t
    return steps * B / el, float(out.l0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one tiny shape (a smoke run)")
    args = ap.parse_args()
    shapes = [(256, 4096, 2048, 32), (576, 8192, 1024, 64)]
    if args.quick:
        shapes = [(64, 512, 256, 8)]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    # CPUs without native bf16 (AVX2 only) run bf16 GEMMs on a slow fallback path: size that run to match
    slow_bf16 = gemm_flops(torch.bfloat16, n=256, reps=1) < 20e9
    limits = {torch.float32: gemm_flops(torch.float32),
              torch.bfloat16: gemm_flops(torch.bfloat16, n=512 if slow_bf16 else 2048, reps=2 if slow_bf16 else 5)}
    if slow_bf16:
        print("this CPU has no native bf16 matmul: bf16 rows use B/16 and 1 timed step")
    for dt, fl in limits.items():
        print(f"matmul limit {str(dt):>15}: {fl / 1e9:6.1f} GFLOP/s")
    print(f"\n{'d':>4} {'F':>5} {'B':>5} {'mode':>14} {'dtype':>8} {'tok/s':>9} {'limit tok/s':>11} {'ratio':>6} {'L0':>7}")
    for d, F, B, k in shapes:
        for kind in ("l1", "batchtopk"):
            for dt in (torch.float32, torch.bfloat16):
                small = slow_bf16 and dt == torch.bfloat16
                rate, l0 = step_rate(kind, d, F, B // 16 if small else B, k, dt, 1 if small else args.steps,
                                     warmup=1 if small else 2)
                lim = limits[dt] / (24 * d * F)
                mode = "L1" if kind == "l1" else f"BatchTopK+AuxK k={k}"
                print(f"{d:>4} {F:>5} {B:>5} {mode:>14} {str(dt).removeprefix('torch.'):>8} {rate:9,.0f} "
                      f"{lim:11,.0f} {rate / lim:6.2f} {l0:7.1f}", flush=True)
    # the limit again after the runs: a drifting (loaded) machine shows here
    print(f"matmul limit re-measured  torch.float32: {gemm_flops(torch.float32) / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
