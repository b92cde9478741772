"""The stage before the cache, where the change lives: for every block, the KL of patching the base
model's block output into the chat model, on chat data (``locate.chats``) and behaviour prompts
(``models.behaviours`` as pair.json records it, default the toy pair's ground truth), and a recommended layer. Writes
``<paths.locate>/locate.json``, ``locate.png`` and ``recommended.json``; ``cache.layer: auto`` caches the
recommended block (with an int ``cache.layer`` the sweep is still made, for the report, and the cache
ignores it). ``python -m flows.locate [--params FILE]``"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from crossdiff_core.locate import LocateConfig
from flows.common import DEFAULT_PARAMS, Layout, cli, load_params, section
from tasks import tracking
from tasks.io import write_json
from tasks.locating import locate_task
from tasks.models import read_pair
from tasks.products import LOCATE, PLOT
from tasks.steering import behaviours_for


@flow(name="crossdiff-locate")
def locate_flow(params_file: str = DEFAULT_PARAMS) -> dict:
    p = load_params(params_file)
    L, s = Layout(p), p["locate"]
    cfg = section(p, "locate", LocateConfig)  # a typo fails before any work
    pair = read_pair(L.models)
    spec = behaviours_for(pair)
    with tracking.stage_run("locate", params=s, full_params=p, params_file=p["params_file"],
                            experiment=p["tracking"]["experiment"]) as run:
        run.log_input("models", L.models, context="models")
        for i, src in enumerate(cfg.chats):
            if isinstance(src, str) and Path(src).exists():
                run.log_input(f"chats_{i}", src, context="locate")
        if spec:
            run.log_input("behaviours", spec, context="prompts")
        numbers = locate_task(pair, s, spec, str(L.locate))
        run.log_metrics(numbers)
        run.log_output("locate", L.locate, artifact=False)
        for name in (LOCATE, PLOT):
            run.log_artifact(L.locate / name, "locate")
        write_json(numbers, L.metric("locate"))
    return numbers


if __name__ == "__main__":
    cli(locate_flow, __doc__)
