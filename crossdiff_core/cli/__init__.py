"""The `crossdiff` command line. Each command is a thin wrapper over a core function; the commands live in one
module per stage and register themselves on ``common.app`` when imported."""

from __future__ import annotations

from .common import (  # noqa: F401  (the settings' defaults the options show, and the shared helpers)
    ANALYZE, CACHE, CARDS, CROSSCODER, DATA, EVALUATE, ORGANISM, STEER, TRAIN, _fail, _named, _not_for_kind, app,
)

# in pipeline order, the order `crossdiff --help` lists the commands in
from . import pairs  # noqa: E402,F401,I001
from . import caches  # noqa: E402,F401
from . import training  # noqa: E402,F401
from . import analysis  # noqa: E402,F401
from . import evaluation  # noqa: E402,F401

__all__ = ["app"]
