#!/usr/bin/env bash
# The GPU checks of issue 14, one prepared script (under 10 minutes on one GPU):
#   1. the CUDA test subset (tests whose names contain "cuda"; they skip without CUDA, so this
#      script stops first if there is none: a skipped test checks nothing);
#   2. the paper-shape BatchTopK step, dense vs sparse, fp32 and bf16 autocast (bench/paper_scale.py);
#      on a GPU the dense step runs at the paper's batch too (B = 2048);
#   3. the activation cache read to the GPU: shuffled batches of a synthetic bf16 cache at the
#      paper's width (d = 2304), tokens/s and GB/s into device memory.
# Usage: bash bench/gpu_check.sh [python]   (default: .venv/bin/python; output: the figures, on stdout)
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=true
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch; nothing was checked" >&2
    exit 2
fi
date -u +"gpu_check %Y-%m-%dT%H:%M:%SZ"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'

echo "== 1. CUDA tests"
timeout 180 "$PY" -m pytest -q -rs -m cuda tests/

echo "== 2. paper-shape step (d=2304 F=73728 k=100, AuxK on 10% dead), dense vs sparse"
for dtype in float32 bfloat16; do
    echo "-- ${dtype}"
    timeout 280 "$PY" bench/paper_scale.py --device cuda --dtype "${dtype}" --rounds 1 \
        --steps 5 --paper-steps 3 --paper-dense-batch 2048
done

echo "== 3. cache reader to the GPU"
timeout 150 "$PY" - <<'EOF'
import tempfile, time

import numpy as np
import torch

from crossdiff_core.cache import ActivationCache, CacheWriter

d, n, shard_rows, batch = 2304, 262_144, 65_536, 4096
with tempfile.TemporaryDirectory() as tmp:
    w = CacheWriter(tmp, d_model=d, layer=0, dtype="bfloat16",
                    metadata={"models": {"base": "synthetic", "chat": "synthetic"}})
    noise = torch.randn(shard_rows, d)
    for i in range(n // shard_rows):
        toks = {"sequence": np.arange(shard_rows) // 128 + i * 512, "position": np.arange(shard_rows) % 128 + 1,
                "token_id": np.zeros(shard_rows, np.int32), "source": ["text"] * shard_rows,
                "is_template": np.zeros(shard_rows, bool), "is_assistant": np.zeros(shard_rows, bool)}
        w.write_shard(i, noise + i, noise - i, toks)
    w.finalize(n // shard_rows)
    cache = ActivationCache(tmp)
    for prefetch in (False, True):
        torch.cuda.synchronize()
        t = time.perf_counter()
        rows = 0
        for x in cache.shuffled_batches(batch, seed=0, dtype=torch.float32, device="cuda", prefetch=prefetch):
            rows += x.shape[0]
        torch.cuda.synchronize()
        el = time.perf_counter() - t
        print(f"cache -> cuda, prefetch={prefetch}: {rows / el:,.0f} tokens/s, "
              f"{rows * 2 * d * 2 / el / 1e9:.2f} GB/s of bf16 read (d={d}, batch {batch}, {rows} tokens)")
EOF
echo "gpu_check: done"
