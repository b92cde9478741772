"""Stage 5, causal evaluation: how much of the chat model's behaviour each set of the ``--kind``
crosscoder's latents carries (the KL gap on held-out conversations). ``python -m flows.evaluate --kind KIND``"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from crossdiff_core.kl_eval import EvaluateConfig
from flows.common import DEFAULT_PARAMS, Layout, cli, load_params, section
from tasks import tracking
from tasks.evaluation import kl_gap_task
from tasks.io import write_json
from tasks.products import KL_FILE, LATENTS


@flow(name="crossdiff-evaluate")
def evaluate_flow(kind: str, params_file: str = DEFAULT_PARAMS) -> dict:
    p = load_params(params_file)
    L, e = Layout(p), p["evaluate"]
    cfg = section(p, "evaluate", EvaluateConfig)  # a typo fails before any work
    out = L.evaluate / kind
    with tracking.stage_run(f"evaluate-{kind}", params={"kind": kind, **e}, full_params=p,
                            params_file=p["params_file"], experiment=p["tracking"]["experiment"]) as run:
        run.log_input("crosscoder", L.crosscoder(kind), context="crosscoder")
        run.log_input("latents", L.analysis(kind) / LATENTS, context="analysis")
        for i, src in enumerate(cfg.chats):
            if Path(src).exists():
                run.log_input(f"eval_chats_{i}", src, context="evaluation")
        numbers = kl_gap_task(str(L.crosscoder(kind)), str(L.analysis(kind) / LATENTS), str(out / KL_FILE), e)
        run.log_metrics(numbers)
        run.log_output("evaluate", out)
        write_json(numbers, L.metric(f"evaluate_{kind}"))
    return numbers


if __name__ == "__main__":
    cli(evaluate_flow, __doc__, kind=True)
