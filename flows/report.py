"""Stage 7, the report: latent cards for every crosscoder, then one self-contained HTML page comparing
them (plus figures and report.json). ``python -m flows.report [--params FILE]``"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import flow

from crossdiff_core.cards import CardsConfig
from crossdiff_core.report.page import TITLE
from crossdiff_core.trainer import TrainConfig
from flows.common import DEFAULT_PARAMS, Layout, cli, load_params, section
from tasks import tracking
from tasks.io import write_json
from tasks.models import read_pair
from tasks.products import KL_FILE, LATENTS, LOCATE, SCOREBOARD, STEERING, TRACKING
from tasks.reporting import cards_task, report_task

CARDS = "cards"


@dataclass
class ReportConfig:
    """The report stage (params.yaml ``report``)."""

    title: str = TITLE  # page title
    cards: CardsConfig = field(default_factory=CardsConfig)  # the latent cards


@flow(name="crossdiff-report")
def report_flow(params_file: str = DEFAULT_PARAMS) -> dict:
    p = load_params(params_file)
    L, r = Layout(p), p["report"]
    cfg = section(p, "report", ReportConfig)  # a typo fails before any work
    kinds = section(p, "train", TrainConfig).kinds  # the crosscoders the pipeline trained
    pair = read_pair(L.models)
    gt = pair.get("behaviours") or pair.get("ground_truth")  # the pair's behaviour spec (the toy pair's ground truth)
    with tracking.stage_run("report", params=r, full_params=p, params_file=p["params_file"],
                            experiment=p["tracking"]["experiment"]) as run:
        run.log_input("cache", L.cache, context="cards")
        runs = {}
        for kind in kinds:
            paths = {"latents": str(L.analysis(kind) / LATENTS), "crosscoder": str(L.crosscoder(kind)),
                     "kl": str(L.evaluate / kind / KL_FILE), "steering": str(L.steer / kind / STEERING),
                     "tracking": str(L.steer / kind / TRACKING) if (L.steer / kind / TRACKING).is_file() else None}
            for role in ("latents", "kl", "steering"):
                run.log_input(f"{role}_{kind}", paths[role], context="report")
            paths["cards"] = cards_task(paths["crosscoder"], paths["latents"], str(L.cache),
                                        str(L.report / CARDS / f"{kind}.json"), r.get("cards"),
                                        steering=paths["steering"], tracking=paths["tracking"])
            runs[kind] = paths
        loc = L.locate / LOCATE  # the layer sweep (the locate stage runs before the cache)
        if loc.is_file():
            run.log_input("locate", loc, context="report")
        board = L.scoreboard / SCOREBOARD
        if board.is_file():
            run.log_input("scoreboard", board, context="report")
        out = report_task(runs, str(L.report), title=cfg.title, ground_truth=gt,
                          locate=str(loc) if loc.is_file() else None, scoreboard=str(board) if board.is_file() else None)
        run.log_output("report", L.report)
        run.set_tags({"report.html": out["html"]})
        numbers = {"report": out["html"], "crosscoders": list(runs)}
        write_json(numbers, L.metric("report"))
    return numbers


if __name__ == "__main__":
    cli(report_flow, __doc__)
