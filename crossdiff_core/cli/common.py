"""What the `crossdiff` commands share: the typer app, the settings' defaults, and the helpers for errors and
option values. The command modules import from here and register themselves on ``app``."""

from __future__ import annotations

import typer

from ..analysis import AnalysisConfig
from ..caching import CacheConfig
from ..cards import CardsConfig
from ..config import defaults
from ..crosscoder import CrossCoderSettings
from ..data import DataConfig
from ..kl_eval import EvaluateConfig
from ..organism import OrganismConfig
from ..report.page import TITLE
from ..scoreboard import ScoreboardConfig
from ..steering import SteerConfig
from ..trainer import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="crossdiff: diff a base and a fine-tuned model with crosscoders.")

# every option's default is its config dataclass's (stated once, there); the settings dataclasses are
# imported above for that, the work each command does is imported inside it
TRAIN, CROSSCODER, ANALYZE = defaults(TrainConfig), defaults(CrossCoderSettings), defaults(AnalysisConfig)
DATA, CACHE, EVALUATE = defaults(DataConfig), defaults(CacheConfig), defaults(EvaluateConfig)
STEER, CARDS, ORGANISM = defaults(SteerConfig), defaults(CardsConfig), defaults(OrganismConfig)
SCOREBOARD = defaults(ScoreboardConfig)


# options several commands take with the same meaning (a fresh OptionInfo per command)
def _crosscoder_opt():
    return typer.Option(..., help="trained crosscoder directory")


def _latents_opt():
    return typer.Option(..., help="its latents.parquet (crossdiff analyze)")

def _base_opt():
    return typer.Option(None, help="base model (default: the one the crosscoder's training cache records)")


def _chat_opt():
    return typer.Option(None, help="chat model (default: from the training cache)")


def _layer_opt():
    return typer.Option(None, help="block L (default: from the training cache)")


def _progress_opt():
    return typer.Option(True, help="show a progress bar")


def _fail(err: Exception) -> None:
    """Print a crossdiff error as one clear line and exit 2 (no traceback for bad input)."""
    typer.secho(f"error: {' '.join(str(err).split())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _not_for_kind(ctx: typer.Context, kind: str) -> None:
    """Refuse an option given on the command line that a ``kind`` crosscoder has no use for (``--k`` for the L1
    family, ``--l1-coeff`` for the BatchTopK family, ``--shared-*`` but for shared, ``--dfc-exclusive`` but for
    dfc: the field metadata ``kind`` of :class:`CrossCoderSettings`, read by
    :func:`~crossdiff_core.crosscoder_config.knob_applies`); it would be silently dropped, or recorded in
    config.json as if it had mattered."""
    import dataclasses

    from ..crosscoder_config import KINDS, knob_applies
    from ..errors import ConfigError

    if kind not in KINDS:
        raise ConfigError(f"unknown crosscoder kind {kind!r}: --kind takes one of {', '.join(KINDS)}")
    for f in dataclasses.fields(CrossCoderSettings):
        owner = f.metadata.get("kind")
        # by name: typer vendors its own click, whose ParameterSource is another enum than click's
        given = getattr(ctx.get_parameter_source(f.name), "name", None) in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")
        if given and not knob_applies(owner, kind):
            raise ConfigError(f"--{f.name.replace('_', '-')} applies to {owner} crosscoders only, not to --kind {kind}: "
                              "leave it out")


def _named(values: list[str] | None, option: str) -> dict[str, str]:
    """`NAME=PATH` values of a repeatable option -> {name: path}."""
    from ..errors import ConfigError

    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{option} takes NAME=PATH (e.g. {option} L1=runs/l1/latents.parquet), got {v!r}")
        out[name] = path
    return out


def _apply_sets(settings: dict, items: list[str], example: str) -> dict:
    """Apply repeatable `--set KEY=VALUE` items (each VALUE read as YAML) to ``settings``, in order."""
    import yaml

    from ..errors import ConfigError

    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE (e.g. --set {example})")
        try:
            settings[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not YAML ({' '.join(str(exc).split())})") from None
    return settings


def _alphas(alphas: str) -> tuple[float, ...]:
    """`--alphas "a,b,c"` -> (a, b, c); an empty item is skipped."""
    from ..errors import ConfigError

    try:
        return tuple(float(a) for a in alphas.split(",") if a.strip())
    except ValueError as exc:
        raise ConfigError(f"--alphas must be comma-separated numbers, got {alphas!r}") from exc
