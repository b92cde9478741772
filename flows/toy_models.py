"""Stage 1, the model pair: build the embedded toy pair and export its corpora, or record a hub pair.
Writes ``<paths.models>/pair.json`` for the later stages. ``python -m flows.toy_models [--params FILE]``"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import flow

from crossdiff_core.errors import ConfigError
from crossdiff_core.toy.config import CorpusConfig, ToyModelsConfig
from flows.common import DEFAULT_PARAMS, Layout, cli, load_params, section
from tasks import tracking
from tasks.io import write_json
from tasks.models import build_toy_pair, export_toy_corpus, write_pair

SOURCES = ("toy", "hub")


@dataclass
class ModelsConfig:
    """The model pair (params.yaml ``models``): the embedded toy pair, or two hub models."""

    source: str = "toy"  # toy: build the embedded pair (crossdiff_core.toy); hub: use base/chat below
    base: str | None = None  # hub: model id or local directory
    chat: str | None = None  # hub: the fine-tuned model
    base_revision: str | None = None  # hub: pin a commit for an exactly repeatable run
    chat_revision: str | None = None
    # behaviour spec (behaviours.yaml, README "Behaviour specs") the locate and steer stages use, recorded in
    # pair.json; None: the toy pair's ground truth (source toy), else none
    behaviours: str | None = None
    toy: ToyModelsConfig = field(default_factory=ToyModelsConfig)  # the toy pair's build
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # the toy pair's cache and evaluation data

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"models.source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "hub" and not (self.base and self.chat):
            raise ConfigError("models.source is hub: set models.base and models.chat (hub ids or local directories)")


@flow(name="crossdiff-toy-models")
def toy_models_flow(params_file: str = DEFAULT_PARAMS) -> dict:
    p = load_params(params_file)
    L, m, cfg = Layout(p), p["models"], section(p, "models", ModelsConfig)
    with tracking.stage_run("toy_models", params={"models": m}, full_params=p, params_file=p["params_file"],
                            experiment=p["tracking"]["experiment"]) as run:
        if cfg.source == "toy":
            toy_dir = L.models / "toy"
            built = build_toy_pair(str(toy_dir), m.get("toy") or {})
            exported = export_toy_corpus(str(toy_dir), str(L.models / "data"), m.get("corpus"))
            gt = str(toy_dir / "ground_truth.json")
            pair = {"source": "toy", "base": str(toy_dir / "base"), "chat": str(toy_dir / "chat"),
                    "base_revision": None, "chat_revision": None, "ground_truth": gt,
                    "behaviours": cfg.behaviours or gt}
            metrics = {"passed": built["passed"], "build_seconds": built["seconds"], "rates": built["rates"], **exported}
            for name in ("build.json", "ground_truth.json"):
                run.log_artifact(toy_dir / name, "models")
        else:
            pair = {"source": "hub", "base": cfg.base, "chat": cfg.chat, "base_revision": cfg.base_revision,
                    "chat_revision": cfg.chat_revision, "ground_truth": None, "behaviours": cfg.behaviours}
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
