"""Settings: one dataclass per params.yaml section, read strictly, each default stated once.

Each dataclass lives in the module of the idea it configures (``TrainConfig`` in trainer.py, ...);
params.yaml states the embedded default and tests/test_config.py checks that it and the dataclasses
agree. A field declared with :func:`neutral` does not change what its stage produces (progress bars,
devices, batch sizes of streaming passes, checkpoint cadence): the trainer's resume check, the flows'
stage keys and dvc.yaml's ``params:`` lists leave it out (:func:`result_settings`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")
RESULT = "result"  # field metadata key: False when the setting leaves the stage's products unchanged


def neutral(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that does not change the result (see the module docstring)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RESULT: False})


def nested(cls: type) -> dict[str, type]:
    """Fields of ``cls`` whose type is itself a settings dataclass: name -> that class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if isinstance(hints.get(f.name), type) and dataclasses.is_dataclass(hints[f.name])}


def from_dict(cls: type[T], d: Mapping[str, Any] | None, *, section: str | None = None) -> T:
    """``cls`` from a params.yaml section: an unknown key is a :class:`ConfigError` naming the valid ones
    (a typo would otherwise be ignored); nested sections become their own dataclasses."""
    section = section or cls.__name__
    if d is None:
        d = {}
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ConfigError(f"{section} must be a mapping of settings, got {d!r}: fix it in params.yaml")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown {section} settings {unknown}; the valid keys of {section} are {names}: "
                          "fix the spelling in params.yaml")
    kw = dict(d)
    for name, sub in nested(cls).items():
        if name in kw:
            kw[name] = from_dict(sub, kw[name], section=f"{section}.{name}")
    try:
        return cls(**kw)
    except TypeError as err:  # a required setting is missing
        raise ConfigError(f"{section}: {err}; add it to params.yaml") from None


def tolerant_from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
    """``cls`` from a file another tool may have written (e.g. a crosscoder's config.json): keys ``cls``
    does not know are ignored, so files with extra provenance still load."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in d.items() if k in known})


def defaults(cls: type) -> dict[str, Any]:
    """The default of every field of ``cls`` that has one (nested dataclasses as dicts), without
    constructing ``cls`` (some need settings that have no default)."""
    out: dict[str, Any] = {}
    sub = nested(cls)
    for f in dataclasses.fields(cls):
        if f.name in sub:
            out[f.name] = defaults(sub[f.name])
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def is_result(f: dataclasses.Field) -> bool:
    return f.metadata.get(RESULT, True)


def result_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the fields of ``cls`` that change the result (nested sections recursed into)."""
    sub = nested(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        if not is_result(f):
            continue
        if f.name in sub:
            out += result_fields(sub[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def result_settings(cls: type, values: Any) -> dict[str, Any]:
    """The result-changing part of ``values`` (an instance of ``cls``, or a dict such as an older
    checkpoint's ``asdict``), nested like ``cls``; keys ``values`` lacks are left out."""
    d = dataclasses.asdict(values) if dataclasses.is_dataclass(values) else dict(values)
    sub = nested(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not is_result(f) or f.name not in d:
            continue
        v = d[f.name]
        out[f.name] = result_settings(sub[f.name], v) if f.name in sub and isinstance(v, Mapping) else v
    return out
