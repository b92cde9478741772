"""Where the fine-tune's change lives: the layer sweep of :mod:`crossdiff_core.locate` on the pair of the
models stage, written as ``locate.json``, its plot and ``recommended.json`` (what ``cache.layer: auto`` reads)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from .io import write_json
from .products import LOCATE, PLOT, RECOMMENDED  # noqa: F401  (the locate products' names)


@task(name="locate", cache_policy=NONE)
def locate_task(pair: dict, settings: dict, behaviours: str | None, out_dir: str) -> dict:
    """:func:`crossdiff_core.locate.locate` on ``pair`` (pair.json) -> ``out_dir``; returns its headline
    numbers. ``settings``: params.yaml's ``locate`` section; ``behaviours``: the spec it runs on (None: none)."""
    from crossdiff_core.locate import LocateConfig, locate, locate_headline, write_locate

    cfg = LocateConfig.from_dict(settings)
    res = locate(pair["base"], pair["chat"], cfg=cfg, behaviours=behaviours or None,
                 base_revision=pair.get("base_revision"), chat_revision=pair.get("chat_revision"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_locate(res, out / LOCATE, out / PLOT)
    # deterministic given the settings (no timings): a locate re-run with the same result reruns no cache
    keys = ("recommended_layer", "recommended_by", "rule", "recommended_by_behaviour", "n_layers")
    write_json({k: res[k] for k in keys if k in res}, out / RECOMMENDED)
    return locate_headline(res)
