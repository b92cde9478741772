"""Stage 6, steering: add ``a · max_act · d_chat`` of chosen latents of the ``--kind`` crosscoder at
layer L while the base and chat models generate; with a behaviour spec (``models.behaviours`` as pair.json
records it, default the toy pair's ground truth), also which latents track its behaviours and whether
steering raises them. ``python -m flows.steer --kind KIND``"""

from __future__ import annotations

from prefect import flow

from crossdiff_core.kl_eval import EvaluateConfig
from crossdiff_core.steering import SteerConfig
from flows.common import DEFAULT_PARAMS, Layout, cli, load_params, section
from tasks import tracking
from tasks.io import write_json
from tasks.models import read_pair
from tasks.products import LATENTS
from tasks.steering import behaviours_for, steer_task


@flow(name="crossdiff-steer")
def steer_flow(kind: str, params_file: str = DEFAULT_PARAMS) -> dict:
    p = load_params(params_file)
    L, s = Layout(p), p["steer"]
    section(p, "steer", SteerConfig)  # a typo fails before any work
    e = section(p, "evaluate", EvaluateConfig)  # the held-out chats, when steer has no prompts of its own
    out = L.steer / kind
    spec = behaviours_for(read_pair(L.models))
    with tracking.stage_run(f"steer-{kind}", params={"kind": kind, **s}, full_params=p,
                            params_file=p["params_file"], experiment=p["tracking"]["experiment"]) as run:
        run.log_input("crosscoder", L.crosscoder(kind), context="crosscoder")
        run.log_input("latents", L.analysis(kind) / LATENTS, context="analysis")
        if spec:
            run.log_input("behaviours", spec, context="prompts")
        numbers = steer_task(str(L.crosscoder(kind)), str(L.analysis(kind) / LATENTS), str(out), s, spec,
                             fallback_chats={"chats": e.chats, "messages_column": e.messages_column})
        run.log_metrics(numbers)
        run.log_output("steer", out)
        write_json(numbers, L.metric(f"steer_{kind}"))
    return numbers


if __name__ == "__main__":
    cli(steer_flow, __doc__, kind=True)
