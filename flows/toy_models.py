"""Stage 1, the model pair: build the embedded toy pair and export its corpora, or record a hub pair.
Writes ``<paths.models>/pair.json`` for the later stages. ``python -m flows.toy_models [--params FILE]``"""

from __future__ import annotations

from prefect import flow

from flows.common import DEFAULT_PARAMS, Layout, cli, load_params, section
from tasks import tracking
from tasks.io import write_json
from tasks.models import build_toy_pair, export_toy_corpus, write_pair


@flow(name="crossdiff-toy-models")
def toy_models_flow(params_file: str = DEFAULT_PARAMS) -> dict:
    p = load_params(params_file)
    L, m, cfg = Layout(p), p["models"], section(p, "models")
    with tracking.stage_run("toy_models", params={"models": m}, full_params=p, params_file=p["params_file"],
                            experiment=p["tracking"]["experiment"]) as run:
        if cfg.source == "toy":
            toy_dir = L.models / "toy"
            built = build_toy_pair(str(toy_dir), m.get("toy") or {})
            exported = export_toy_corpus(str(toy_dir), str(L.models / "data"), m.get("corpus"))
            pair = {"source": "toy", "base": str(toy_dir / "base"), "chat": str(toy_dir / "chat"),
                    "base_revision": None, "chat_revision": None, "ground_truth": str(toy_dir / "ground_truth.json")}
            metrics = {"passed": built["passed"], "build_seconds": built["seconds"], "rates": built["rates"], **exported}
            for name in ("build.json", "ground_truth.json"):
                run.log_artifact(toy_dir / name, "models")
        else:
            pair = {"source": "hub", "base": cfg.base, "chat": cfg.chat, "base_revision": cfg.base_revision,
                    "chat_revision": cfg.chat_revision, "ground_truth": None}
            metrics = {"passed": None}
        write_pair(str(L.models), pair)
        run.set_tags({"lineage.models.base": pair["base"], "lineage.models.chat": pair["chat"],
                      "lineage.models.base_revision": pair["base_revision"],
                      "lineage.models.chat_revision": pair["chat_revision"]})
        run.log_metrics(metrics)
        run.log_output("models", L.models, artifact=False)
        run.log_artifact(L.models / "pair.json", "models")
        write_json(metrics, L.metric("toy_models"))
    return metrics


if __name__ == "__main__":
    cli(toy_models_flow, __doc__)
