"""Stage 7, the report: latent cards for every crosscoder, then one self-contained HTML page comparing
them (plus figures and report.json). ``python -m flows.report [--params FILE]``"""

from __future__ import annotations

from prefect import flow

from flows.common import DEFAULT_PARAMS, Layout, cli, kinds, load_params, section
from flows.evaluate import KL_FILE
from tasks import tracking
from tasks.analysis import LATENTS
from tasks.io import write_json
from tasks.models import read_pair
from tasks.reporting import cards_task, report_task
from tasks.steering import STEERING, TRACKING

CARDS = "cards"


@flow(name="crossdiff-report")
def report_flow(params_file: str = DEFAULT_PARAMS) -> dict:
    p = load_params(params_file)
    L, r = Layout(p), p["report"]
    gt = read_pair(L.models).get("ground_truth")
    with tracking.stage_run("report", params=r, full_params=p, params_file=p["params_file"],
                            experiment=p["tracking"]["experiment"]) as run:
        run.log_input("cache", L.cache, context="cards")
        runs = {}
        for kind in kinds(p):
            paths = {"latents": str(L.analysis(kind) / LATENTS), "crosscoder": str(L.crosscoder(kind)),
                     "kl": str(L.evaluate / kind / KL_FILE), "steering": str(L.steer / kind / STEERING),
                     "tracking": str(L.steer / kind / TRACKING) if gt else None}
            for role in ("latents", "kl", "steering"):
                run.log_input(f"{role}_{kind}", paths[role], context="report")
            paths["cards"] = cards_task(paths["crosscoder"], paths["latents"], str(L.cache),
                                        str(L.report / CARDS / f"{kind}.json"), r.get("cards"),
                                        steering=paths["steering"], tracking=paths["tracking"])
            runs[kind] = paths
        out = report_task(runs, str(L.report), title=section(p, "report").title, ground_truth=gt)
        run.log_output("report", L.report)
        run.set_tags({"report.html": out["html"]})
        numbers = {"report": out["html"], "crosscoders": list(runs)}
        write_json(numbers, L.metric("report"))
    return numbers


if __name__ == "__main__":
    cli(report_flow, __doc__)
