"""Stage 7, the scoreboard: every diffing method (each crosscoder kind ranked by Δnorm, by ν and by behaviour
tracking, the activation-difference lens, a random-direction control) scored the same way against the pair's known
behaviours: detection AUROC of its best direction, the behaviour rate when that direction steers each model,
and the KL gap its top set closes. One MLflow run per method beside the stage's run.
``python -m flows.scoreboard [--params FILE]``"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from crossdiff_core.data import DataConfig
from crossdiff_core.kl_eval import EvaluateConfig
from crossdiff_core.scoreboard import ScoreboardConfig, headline
from crossdiff_core.trainer import TrainConfig
from flows.common import DEFAULT_PARAMS, Layout, cli, load_params, section
from tasks import tracking
from tasks.io import write_json
from tasks.models import read_pair
from tasks.products import LATENTS, SCOREBOARD
from tasks.scoreboard import scoreboard_task
from tasks.steering import behaviours_for


@flow(name="crossdiff-scoreboard")
def scoreboard_flow(params_file: str = DEFAULT_PARAMS) -> dict:
    p = load_params(params_file)
    L, s = Layout(p), p["scoreboard"]
    cfg = section(p, "scoreboard", ScoreboardConfig)  # a typo fails before any work
    section(p, "evaluate", EvaluateConfig)
    kinds = section(p, "train", TrainConfig).kinds
    data = section(p, "data", DataConfig)  # the lens's plain text: what was cached
    spec = behaviours_for(read_pair(L.models))
    ccs = {k: (str(L.crosscoder(k)), str(L.analysis(k) / LATENTS)) for k in kinds}
    exp = p["tracking"]["experiment"]
    with tracking.stage_run("scoreboard", params=s, full_params=p, params_file=p["params_file"], experiment=exp) as run:
        for k, (cc, lat) in ccs.items():
            run.log_input(f"crosscoder_{k}", cc, context="crosscoder")
            run.log_input(f"latents_{k}", lat, context="analysis")
        if spec:
            run.log_input("behaviours", spec, context="prompts")
        for i, src in enumerate(p["evaluate"]["chats"]):
            if Path(src).exists():
                run.log_input(f"eval_chats_{i}", src, context="evaluation")
        if spec is None:  # nothing known to score against: say so (the report leaves the section out)
            board = {"format_version": 1, "skipped": "the pair has no behaviour spec (models.behaviours): the "
                     "scoreboard scores methods against known behaviours", "methods": [], "behaviours": []}
            write_json(board, L.scoreboard / SCOREBOARD)
        else:
            board = scoreboard_task(ccs, str(L.scoreboard), s, p["evaluate"], spec, list(data.text),
                                    data.text_column)
        numbers = headline(board)
        run.log_metrics(numbers)
        run.log_output("scoreboard", L.scoreboard)
    for rec in board["methods"]:  # one run per method: the MLflow UI compares them side by side
        with tracking.stage_run(f"scoreboard-{rec['name']}", params={"method": rec["name"], "family": rec["family"],
                                                                     "reading": rec.get("reading", "projection"),
                                                                     "supervised": rec.get("supervised", False),
                                                                     "description": rec["description"],
                                                                     "n_directions": cfg.n_directions,
                                                                     "directions": ", ".join(rec["labels"])},
                                full_params=p, params_file=p["params_file"], experiment=exp) as mr:
            mr.set_tags({"crossdiff.method": rec["name"], "crossdiff.method_family": rec["family"]})
            mr.log_metrics(numbers[rec["name"]])
    write_json(numbers, L.metric("scoreboard"))
    return numbers


if __name__ == "__main__":
    cli(scoreboard_flow, __doc__)
