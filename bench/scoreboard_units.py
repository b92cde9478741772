"""The scoreboard's steering under several steering units, on a finished pipeline run.

Run from the checkout that holds the run's artifacts (after `make demo`, or the organism's pipeline): it
rebuilds the scoreboard (crossdiff_core.scoreboard.build_scoreboard) from the params file's crosscoders,
behaviour spec and held-out conversations once per unit in `--units`, at the coefficients `--alphas`, and
prints per method and behaviour the AUROC, the direction's scale and, per a, the rates on the trigger and
on the other prompts in each model. The pipeline's own artifacts are not touched; each board is written
to `--out` (one JSON per unit).

    python bench/scoreboard_units.py [--params params.yaml] [--units peak,spread] [--alphas 0.25,0.5,1,2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crossdiff_core.kl_eval import EvaluateConfig  # noqa: E402
from crossdiff_core.scoreboard import ScoreboardConfig, build_scoreboard  # noqa: E402
from flows.common import Layout, load_params  # noqa: E402
from flows.sections import read_all  # noqa: E402
from tasks.models import read_pair  # noqa: E402
from tasks.products import LATENTS  # noqa: E402
from tasks.steering import behaviours_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--units", default="peak,spread", help="comma-separated steering units (scoreboard.steer_unit)")
    ap.add_argument("--alphas", default="0.25,0.5,1,2", help="comma-separated steering coefficients")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-scoreboard-units", help="directory for the boards (one JSON per unit)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = load_params(a.params)
    L, cfgs = Layout(p), read_all(p)
    spec = behaviours_for(read_pair(L.models))
    if spec is None:
        sys.exit("error: the pair has no behaviour spec (models.behaviours): nothing to steer toward")
    ccs = {k: (str(L.crosscoder(k)), str(L.analysis(k) / LATENTS)) for k in cfgs["train"].kinds}  # as flows.scoreboard
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for unit in a.units.split(","):
        t = time.perf_counter()
        settings = dict(p["scoreboard"], steer_unit=unit, alphas=[float(x) for x in a.alphas.split(",")],
                        progress=False)
        board, _, _ = build_scoreboard(ccs, behaviours=spec, evaluate=EvaluateConfig.from_dict(p["evaluate"]),
                                       text=list(cfgs["data"].text), text_column=cfgs["data"].text_column,
                                       cfg=ScoreboardConfig.from_dict(settings))
        (out / f"scoreboard-{unit}.json").write_text(json.dumps(board, default=str))
        unsteered = {m: {b: round(v["rate"], 2) for b, v in r.items()} for m, r in board["unsteered"].items()}
        print(f"== unit {unit}: {time.perf_counter() - t:.0f} s, block {board['layer']}, {board['n_prompts']} prompts; "
              f"unsteered pooled rates {unsteered}")
        print("   per a: trigger rate / other rate")
        for m in board["methods"]:
            for b, v in m["behaviours"].items():
                runs = {model: " ".join(f"{x['alpha']:g}: {x['trigger_rate']:.2f}/{x['other_rate']:.2f}"
                                        for x in v["steer"][model]["runs"]) for model in v["steer"]}
                print(f"  {m['name']:16s} {b:16s} AUROC {v['auroc']:.2f}  {v['best_label']:14s} r_chat "
                      f"{v['steer_scale']['chat']:7.2f} | " + " | ".join(f"{model} {r}" for model, r in runs.items()))


if __name__ == "__main__":
    main()
