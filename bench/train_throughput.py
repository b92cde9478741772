"""Crosscoder training throughput against this machine's matmul limit, measured in one run.

For each shape (d, F, B), mode (L1; BatchTopK with AuxK on 10% dead latents) and dtype (fp32; bf16
autocast) it times full optimisation steps (loss, backward, clipping, Adam) on in-memory batches, and
divides by the tokens/s that a large GEMM of the same dtype would reach for the reference cost of
24·d·F FLOPs per token (encoder and decoder, forward and backward).

Each configuration runs with glibc's default malloc and with ``crossdiff_core.allocator.keep_freed_memory``
(what the trainer does on CPU), each in a fresh process, alternated over ``--rounds`` rounds (best kept),
so the two columns are measured side by side under the same machine load.

    python bench/train_throughput.py [--steps 5] [--rounds 2] [--quick] [--products auto|dense|sparse]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from crossdiff_core.allocator import keep_freed_memory
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
              warmup: int = 2, products: str = "auto") -> tuple[float, float]:
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
        out = optimisation_step(model, opt, x, l1_coeff=0.05, dead=dead, grad_clip=1.0, compute_dtype=cd,
                                products=products)
    t = time.perf_counter()
    for _ in range(steps):
        out = optimisation_step(model, opt, x, l1_coeff=0.05, dead=dead, grad_clip=1.0, compute_dtype=cd,
                                products=products)
    el = time.perf_counter() - t
    return steps * B / el, float(out.l0)


def measure(shapes, steps: int, malloc: str, products: str = "auto") -> dict:
    """One process's figures: the GEMM limits and, per configuration, tokens/s and L0."""
    if malloc == "keep" and not keep_freed_memory():
        print("keep_freed_memory is not available here (not glibc)", file=sys.stderr)
    # CPUs without native bf16 (AVX2 only) run bf16 GEMMs on a slow fallback path: size that run to match
    slow_bf16 = gemm_flops(torch.bfloat16, n=256, reps=1) < 20e9
    limits = {"float32": gemm_flops(torch.float32),
              "bfloat16": gemm_flops(torch.bfloat16, n=512 if slow_bf16 else 2048, reps=2 if slow_bf16 else 5)}
    rows = []
    for d, F, B, k in shapes:
        for kind in ("l1", "batchtopk"):
            for dt in (torch.float32, torch.bfloat16):
                small = slow_bf16 and dt == torch.bfloat16
                rate, l0 = step_rate(kind, d, F, B // 16 if small else B, k, dt, 1 if small else steps,
                                     warmup=1 if small else 2, products=products)
                rows.append({"d": d, "F": F, "B": B, "k": k, "kind": kind, "dtype": str(dt).removeprefix("torch."),
                             "rate": rate, "l0": l0})
    # the limit again after the runs: a drifting (loaded) machine shows here
    limits["float32_after"] = gemm_flops(torch.float32)
    return {"limits": limits, "rows": rows, "slow_bf16": slow_bf16}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one tiny shape (a smoke run)")
    ap.add_argument("--products", default="auto", choices=("auto", "dense", "sparse"),
                    help="the step's products (crossdiff_core.sparse_step; auto: by code density)")
    ap.add_argument("--child", choices=("default", "keep"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes = [(256, 4096, 2048, 32), (576, 8192, 1024, 64)]
    if args.quick:
        shapes = [(64, 512, 256, 8)]
    if args.child:
        print(json.dumps(measure(shapes, args.steps, args.child, args.products)))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, products {args.products}")
    runs: dict[str, list[dict]] = {"default": [], "keep": []}
    for r in range(args.rounds):
        for malloc in ("default", "keep"):
            cmd = [sys.executable, __file__, "--child", malloc, "--steps", str(args.steps),
                   "--products", args.products] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[malloc].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}, malloc {malloc}: done", flush=True)
    if runs["default"][0]["slow_bf16"]:
        print("this CPU has no native bf16 matmul: bf16 rows use B/16 and 1 timed step")
    limits = {dt: max(run["limits"][dt] for rr in runs.values() for run in rr) for dt in ("float32", "bfloat16")}
    lo32 = min(min(run["limits"]["float32"], run["limits"]["float32_after"]) for rr in runs.values() for run in rr)
    for dt, fl in limits.items():
        print(f"matmul limit {dt:>9}: {fl / 1e9:6.1f} GFLOP/s (best of all runs)")
    print(f"float32 limit drifted down to {lo32 / 1e9:.1f} GFLOP/s within the runs (load)")
    print(f"\n{'d':>4} {'F':>5} {'B':>5} {'mode':>20} {'dtype':>8} {'tok/s default':>13} {'tok/s keep':>10} "
          f"{'keep/default':>12} {'limit tok/s':>11} {'ratio':>6} {'L0':>6}")
    for i, row in enumerate(runs["default"][0]["rows"]):
        best = {m: max(run["rows"][i]["rate"] for run in rr) for m, rr in runs.items()}
        lim = limits[row["dtype"]] / (24 * row["d"] * row["F"])
        mode = "L1" if row["kind"] == "l1" else f"BatchTopK+AuxK k={row['k']}"
        print(f"{row['d']:>4} {row['F']:>5} {row['B']:>5} {mode:>20} {row['dtype']:>8} {best['default']:13,.0f} "
              f"{best['keep']:10,.0f} {best['keep'] / best['default']:12.2f} {lim:11,.0f} {best['keep'] / lim:6.2f} "
              f"{runs['keep'][0]['rows'][i]['l0']:6.1f}")
    print("ratio: tokens/s with keep_freed_memory (the trainer's CPU default) / the limit's tokens/s")


if __name__ == "__main__":
    main()
