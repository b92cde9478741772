"""Stage 2, the activation cache: both models' block-L activations on the text and chat data.

The shard plan is cut into ``cache.slices`` round-robin slices, one flow run each
(``crossdiff-cache-slice``); with ``cache.deployment`` set they run as deployments on the work pool's
workers (all writing into one shared cache directory), else here one after the other. A merge then
writes tokens.parquet and the one manifest. Re-running resumes: complete shards are kept.

``cache.layer``: a block index, or ``auto``: the ``recommended_layer`` of the locate stage
(``<paths.locate>/recommended.json``). dvc.yaml makes the stage depend on that file either way (DVC
deps cannot follow a setting): with an int layer a changed recommendation reruns the stage, which then
finds its cache complete and only merges again. The pipeline caches one layer; several layers from one
forward pass are ``crossdiff cache --layer A --layer B``. ``cache.overwrite``: the cache files are deleted
before the slices start. ``python -m flows.cache [--params FILE]``"""

from __future__ import annotations

from prefect import flow

from crossdiff_core.caching import CacheConfig, resolve_layer
from crossdiff_core.config import result_settings
from crossdiff_core.data import DataConfig
from flows.common import DEFAULT_PARAMS, Layout, cli, load_params, section, stage_key
from tasks import tracking
from tasks.caching import cache_slice, merge_cache, overwrite_cache
from tasks.io import prepare_out, write_json
from tasks.models import read_pair
from tasks.products import RECOMMENDED


@flow(name="crossdiff-cache-slice")
def cache_slice_flow(index: int, n_slices: int, params_file: str = DEFAULT_PARAMS) -> dict:
    """One slice of the shard plan into the cache directory (what a worker runs)."""
    p = load_params(params_file)
    L = Layout(p)
    return cache_slice(read_pair(L.models), p["data"], cache_settings(p), str(L.cache), index, n_slices)


def cache_settings(p: dict) -> dict:
    """params.yaml's ``cache`` section with ``layer`` resolved to a block index (``auto``: the locate stage's);
    the ``data`` section is read strictly too (a typo fails before any work)."""
    section(p, "data", DataConfig)
    layer = section(p, "cache", CacheConfig).layer
    return {**p["cache"], "layer": resolve_layer(layer, Layout(p).locate / RECOMMENDED)}


def _run_slices_remotely(deployment: str, n: int, params_file: str, poll_s: float = 5.0) -> list[dict]:
    """One flow run of ``deployment`` per slice, all started at once; wait for them all."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from crossdiff_core.errors import CrossdiffError

    started = [run_deployment(deployment, parameters={"index": i, "n_slices": n, "params_file": params_file},
                              timeout=0) for i in range(n)]
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(r.id) for r in started]
            if all(r.state is not None and r.state.is_final() for r in runs):
                break
            time.sleep(poll_s)
    failed = [r.name for r in runs if not r.state.is_completed()]
    if failed:
        raise CrossdiffError(f"cache slice runs {failed} did not complete: see their logs in the Prefect UI; "
                             "re-running the cache stage resumes them (complete shards are kept)")
    return [{"slice": i, "flow_run": str(r.id)} for i, r in enumerate(runs)]


@flow(name="crossdiff-cache")
def cache_flow(params_file: str = DEFAULT_PARAMS) -> dict:
    p = load_params(params_file)
    L, c = Layout(p), cache_settings(p)
    cfg = CacheConfig.from_dict(c)
    pair = read_pair(L.models)
    n = cfg.slices
    with tracking.stage_run("cache", params={"cache": c, "data": p["data"]}, full_params=p,
                            params_file=p["params_file"], experiment=p["tracking"]["experiment"]) as run:
        models_md5 = run.log_input("models", L.models, context="models")
        if p["cache"].get("layer") == "auto":
            run.log_input("locate", L.locate / RECOMMENDED, context="layer")
            run.set_tags({"cache.layer_from": str(L.locate / RECOMMENDED)})
        # the neutral settings (crossdiff_core.config) do not change what is cached
        kept = prepare_out(L.cache, stage_key(pair, models_md5, p["data"], result_settings(CacheConfig, cfg)))
        kept = not overwrite_cache(c, str(L.cache)) and kept
        if cfg.deployment:
            slices = _run_slices_remotely(cfg.deployment, n, p["params_file"])
        else:
            slices = [cache_slice_flow(i, n, p["params_file"]) for i in range(n)]
        merged = merge_cache(pair, p["data"], c, str(L.cache))
        run.log_cache_lineage(L.cache)
        run.log_output("cache", L.cache, artifact=False)
        run.log_artifact(L.cache / "manifest.json", "cache")
        computed = sum(len(s.get("computed", [])) for s in slices)
        metrics = {**merged, "resumed": kept, "shards_computed": computed,
                   "tokens_per_s": sum(s.get("tokens_per_s", 0.0) for s in slices)}
        run.log_metrics(metrics)
        write_json(metrics, L.metric("cache"))
    return metrics


if __name__ == "__main__":
    cli(cache_flow, __doc__)
