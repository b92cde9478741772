"""The crosscoder's settings (DESIGN §1, §2): what a training run builds (:class:`CrossCoderSettings`,
params.yaml ``train.crosscoder``) and what a trained crosscoder is (:class:`CrossCoderConfig`, saved as
``config.json`` and read back tolerantly: other tools write it too)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .config import tolerant_from_dict
from .errors import ConfigError
from .normalisation import check_normalisation

KINDS = ("l1", "batchtopk", "shared", "dfc")
# the kinds the pipeline trains by default (train.kinds, dvc.yaml's vars): the demo's time budget holds two
DEFAULT_KINDS = ("l1", "batchtopk")
# each kind's sparsity objective: shared is an L1 crosscoder with designated tied latents (Anthropic, "Insights
# on Crosscoder Model Diffing", 2025), dfc a BatchTopK one with model-exclusive latents (dedicated feature
# crosscoders, 2026); the family decides the loss, the code selection, AuxK and the inference threshold
SPARSITY = {"l1": "l1", "batchtopk": "batchtopk", "shared": "l1", "dfc": "batchtopk"}


def knob_applies(owner: str | None, kind: str) -> bool:
    """Whether a setting whose field metadata ``kind`` is ``owner`` (a kind or a sparsity family; None: every
    kind) is a setting of a ``kind`` crosscoder: ``k`` (owner batchtopk) applies to batchtopk and dfc."""
    return owner is None or owner == kind or owner == SPARSITY.get(kind)


def _check_partition_settings(shared_fraction, shared_l1_ratio, dfc_exclusive) -> None:
    """The ranges of the partition settings (None: not a setting of this kind)."""
    def bad(v, hi, hi_open=True):  # outside (0, hi) or (0, hi]
        if v is None:
            return False
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return True
        return v <= 0 or (v >= hi if hi_open else v > hi)

    if bad(shared_fraction, 1):
        raise ConfigError(f"shared_fraction must be in (0, 1), the share of the latents whose decoder is tied "
                          f"(got {shared_fraction!r}): pass e.g. --shared-fraction 0.05")
    if bad(shared_l1_ratio, 1, hi_open=False):
        raise ConfigError(f"shared_l1_ratio must be in (0, 1], λ_shared / λ for the tied latents (got "
                          f"{shared_l1_ratio!r}): pass e.g. --shared-l1-ratio 0.15 (Anthropic's 0.1-0.2)")
    if bad(dfc_exclusive, 0.5):
        raise ConfigError(f"dfc_exclusive must be in (0, 0.5), the share of the latents exclusive to each model, "
                          f"so that 2 x dfc_exclusive < 1 leaves shared latents (got {dfc_exclusive!r}): pass e.g. "
                          "--dfc-exclusive 0.05")


@dataclass
class CrossCoderSettings:
    """The crosscoder a training run builds (params.yaml ``train.crosscoder``), for any kind: ``k``
    applies to the BatchTopK family (batchtopk, dfc), ``l1_coeff`` to the L1 family (l1, shared),
    ``shared_*`` to shared and ``dfc_exclusive`` to dfc (field metadata ``kind``, :func:`knob_applies`);
    :meth:`config` makes the :class:`CrossCoderConfig` of one kind. ``d_model`` comes from the cache."""

    dict_size: int = 1024  # F, the number of latents
    k: int | None = field(default=32, metadata={"kind": "batchtopk"})  # BatchTopK: mean active latents per token
    l1_coeff: float = field(default=1.0, metadata={"kind": "l1"})  # L1: λ after its warm-up
    init_norm: float | None = None  # decoder row norm at init, each model's half (None: the kind's INIT_NORM)
    b_dec_init: str | None = None  # decoder bias at init: zero, or mean (the cache's mean); None: the kind's B_DEC_INIT
    aux_k: int | None = None  # AuxK: dead latents used per token (None: d_model / 2)
    # AuxK: weight of the auxiliary loss; 8x the 1/32 of Gao et al., with which 4-7% of a BatchTopK dictionary stayed
    # dead on the demo pair and the SmolLM2 organism (BENCHMARKS.md)
    aux_alpha: float = 0.25
    threshold_decay: float | None = None  # BatchTopK: EMA decay of the inference threshold (None: from the run's length)
    normalisation: str = "joint"  # input scales: joint (one for both models), per_model or none (crossdiff_core.normalisation)
    # shared: latents [0, S), S = round(shared_fraction·F), have one decoder tied across both models, so they
    # cannot split into a base-only and a chat-only copy; Anthropic designate a few percent of F
    shared_fraction: float = field(default=0.05, metadata={"kind": "shared"})
    # shared: λ_shared / λ, the tied latents' reduced L1 penalty (Anthropic: 0.1-0.2), so the common directions
    # go to them rather than being paid for twice by the free latents
    shared_l1_ratio: float = field(default=0.15, metadata={"kind": "shared"})
    # dfc: latents [0, E) read and write the base model only, [E, 2E) the chat model only (E =
    # round(dfc_exclusive·F)), the rest both: a difference has dedicated latents to go to
    dfc_exclusive: float = field(default=0.05, metadata={"kind": "dfc"})

    def __post_init__(self) -> None:
        _check_partition_settings(self.shared_fraction, self.shared_l1_ratio, self.dfc_exclusive)

    def for_kind(self, kind: str) -> "CrossCoderSettings":
        """These settings with the other kinds' knobs cleared (k for the L1 family, λ for the BatchTopK
        family, the partition settings but for their own kind): what a crosscoder of ``kind`` depends on."""
        if kind not in KINDS:
            raise ConfigError(f"unknown crosscoder kind {kind!r}; use one of {KINDS}")
        # an L1 run at λ = 0 would train a dense autoencoder and report it as a crosscoder: refused
        if SPARSITY[kind] == "l1" and not (isinstance(self.l1_coeff, (int, float)) and math.isfinite(self.l1_coeff)
                                 and self.l1_coeff > 0):
            raise ConfigError(f"an {kind} crosscoder needs a finite l1_coeff > 0 (got {self.l1_coeff!r}): pass --l1-coeff, "
                              f"or leave it out for the default {CrossCoderSettings.l1_coeff}")
        # a cleared knob takes CrossCoderConfig's "not this kind" default (k None, l1_coeff 0, the partition None)
        off = {f.name: f.default for f in fields(CrossCoderConfig)}
        clear = {f.name: off[f.name] for f in fields(self) if not knob_applies(f.metadata.get("kind"), kind)}
        return replace(self, **clear)

    def config(self, kind: str, d_model: int, **provenance) -> "CrossCoderConfig":
        """The :class:`CrossCoderConfig` of a ``kind`` crosscoder on ``d_model``-wide activations."""
        return CrossCoderConfig(kind=kind, d_model=d_model, **asdict(self.for_kind(kind)), **provenance)


_S = CrossCoderSettings  # its defaults are the architecture defaults below
# per-family init defaults (measured on planted data, bench/synthetic_recovery.py): BatchTopK starts with unit
# decoder rows, as the paper's runs (at 0.05, 81% of its latents died), and b_dec at the data mean; L1 as before.
# A kind takes its sparsity family's (INIT_NORM[SPARSITY[kind]])
INIT_NORM = {"l1": 0.05, "batchtopk": 1.0}
B_DEC_INIT = {"l1": "zero", "batchtopk": "mean"}
B_DEC_INITS = ("zero", "mean")


@dataclass
class CrossCoderConfig:
    """Architecture and sparsity settings; saved as ``config.json`` next to the weights."""

    kind: str  # l1, batchtopk, shared or dfc (KINDS)
    d_model: int  # activation width of the layer
    dict_size: int  # F, the number of latents
    k: int | None = None  # BatchTopK: mean active latents per token
    l1_coeff: float = 0.0  # L1: λ (after warm-up)
    init_norm: float | None = _S.init_norm  # decoder row norm at init (None: INIT_NORM[kind])
    b_dec_init: str | None = _S.b_dec_init  # decoder bias at init: zero or mean (None: B_DEC_INIT[kind])
    aux_k: int | None = _S.aux_k  # AuxK: dead latents used per token (default d/2)
    aux_alpha: float = _S.aux_alpha  # AuxK: weight of the auxiliary loss
    threshold_decay: float | None = _S.threshold_decay  # BatchTopK: EMA decay of θ (None: the trainer's, from the run length)
    normalisation: str | None = None  # how the scales were chosen (None: not recorded; older runs used per_model)
    # the partition settings (CrossCoderSettings says why): None is the settings' default for their own kind and
    # "not a setting" for the others (kept None there); the layout is :meth:`partition`'s
    shared_fraction: float | None = None  # shared: the tied latents are [0, round(shared_fraction·F))
    shared_l1_ratio: float | None = None  # shared: λ_shared / λ on the tied latents
    dfc_exclusive: float | None = None  # dfc: [0, E) base-only, [E, 2E) chat-only, E = round(dfc_exclusive·F)
    # provenance (DESIGN §2): what it was trained on
    training_tokens: int = 0
    cache: str | None = None
    cache_manifest_hash: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown crosscoder kind {self.kind!r}; use one of {KINDS}")
        if self.d_model <= 0 or self.dict_size <= 0:
            raise ConfigError(f"d_model and dict_size must be positive (got {self.d_model}, {self.dict_size})")
        if self.sparsity == "batchtopk":
            if self.k is None or self.k <= 0:
                raise ConfigError(f"a {self.kind} crosscoder needs k >= 1: pass --k (the paper uses k=100)")
            if self.k > self.dict_size:
                raise ConfigError(
                    f"k={self.k} is larger than the dictionary (dict_size={self.dict_size}): "
                    "choose k <= dict_size (typically k is 1-5% of it)"
                )
        if not (isinstance(self.l1_coeff, (int, float)) and math.isfinite(self.l1_coeff) and self.l1_coeff >= 0):
            raise ConfigError(f"l1_coeff must be a finite number >= 0 (got {self.l1_coeff!r})")
        if not (isinstance(self.aux_alpha, (int, float)) and math.isfinite(self.aux_alpha) and self.aux_alpha >= 0):
            raise ConfigError(f"aux_alpha must be a finite number >= 0 (got {self.aux_alpha!r})")
        if self.aux_k is not None and self.aux_k < 1:
            raise ConfigError(f"aux_k must be >= 1 or null (got {self.aux_k})")
        self._resolve_partition()
        if self.init_norm is None:
            self.init_norm = INIT_NORM[self.sparsity]
        if self.b_dec_init is None:
            self.b_dec_init = B_DEC_INIT[self.sparsity]
        if not (self.init_norm > 0 and math.isfinite(self.init_norm)):
            raise ConfigError(f"init_norm must be positive and finite (got {self.init_norm})")
        if self.b_dec_init not in B_DEC_INITS:
            raise ConfigError(f"b_dec_init must be one of {B_DEC_INITS} (got {self.b_dec_init!r})")
        if self.threshold_decay is not None and not 0 <= self.threshold_decay < 1:
            raise ConfigError(f"threshold_decay must be in [0, 1) or null (got {self.threshold_decay})")
        if self.normalisation is not None:
            check_normalisation(self.normalisation)
        if self.aux_k is None:
            self.aux_k = max(1, self.d_model // 2)
        self.aux_k = min(self.aux_k, self.dict_size)

    @property
    def sparsity(self) -> str:
        """The kind's sparsity family, ``l1`` or ``batchtopk`` (:data:`SPARSITY`)."""
        return SPARSITY[self.kind]

    def _resolve_partition(self) -> None:
        """Own kind: a None partition setting takes :class:`CrossCoderSettings`' default, and each is checked;
        other kinds: they are no settings, kept None."""
        own = {"shared_fraction": "shared", "shared_l1_ratio": "shared", "dfc_exclusive": "dfc"}
        for name, kind in own.items():
            if kind != self.kind:
                setattr(self, name, None)
            elif getattr(self, name) is None:
                setattr(self, name, getattr(_S, name))
        _check_partition_settings(self.shared_fraction, self.shared_l1_ratio, self.dfc_exclusive)
        F = self.dict_size
        if self.kind == "shared" and not 1 <= round(self.shared_fraction * F) < F:
            raise ConfigError(f"shared_fraction={self.shared_fraction} of dict_size={F} designates "
                              f"{round(self.shared_fraction * F)} tied latents: raise --shared-fraction or "
                              "--dict-size so that at least one latent is tied and one is free")
        if self.kind == "dfc" and not (round(self.dfc_exclusive * F) >= 1 and 2 * round(self.dfc_exclusive * F) < F):
            raise ConfigError(f"dfc_exclusive={self.dfc_exclusive} of dict_size={F} gives "
                              f"{round(self.dfc_exclusive * F)} exclusive latents per model: raise --dfc-exclusive or "
                              "--dict-size so that each model has at least one and some latents stay shared")

    def partition(self) -> dict[str, range]:
        """The fixed layout of the latent indices, block name -> its latents, in order, covering ``[0, F)``:
        shared: ``tied`` = ``[0, S)`` (decoder tied across the models, L1 weight ``shared_l1_ratio``), ``free``
        the rest; dfc: ``base_exclusive`` = ``[0, E)`` (read and write the base model only), ``chat_exclusive``
        = ``[E, 2E)`` (the chat model only), ``shared`` the rest; l1 and batchtopk: ``free`` = all."""
        F = self.dict_size
        if self.kind == "shared":
            S = round(self.shared_fraction * F)
            return {"tied": range(0, S), "free": range(S, F)}
        if self.kind == "dfc":
            E = round(self.dfc_exclusive * F)
            return {"base_exclusive": range(0, E), "chat_exclusive": range(E, 2 * E), "shared": range(2 * E, F)}
        return {"free": range(0, F)}

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config.json") -> "CrossCoderConfig":
        """From a ``config.json``: other tools write it too, so keys this version does not know are
        ignored, and an optional key that is null or missing takes its default (unlike a params.yaml
        section, which is read strictly). A missing required key, a value of the wrong type or a
        non-finite number is a :class:`ConfigError` naming the key."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} must hold a JSON object of settings, got {type(d).__name__}: "
                              "write it with `crossdiff train` (DESIGN §2)")
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ConfigError(f"{source} lacks the required keys {missing} (DESIGN §2: kind, d_model, dict_size; "
                              "k for batchtopk and dfc): it is not a crosscoder config")
        known = {f.name: f for f in fields(cls) if f.init}
        kept = {k: v for k, v in d.items() if k in known and v is not None}  # null: the field's default
        for k, v in kept.items():
            want = _TYPES.get(k)
            if want is None:
                continue
            ok = isinstance(v, want) and not isinstance(v, bool)
            if ok and isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{source}: {k} is {v}, not a finite number; fix the file or retrain")
            if not ok:
                raise ConfigError(f"{source}: {k} must be {_TYPE_NAMES[want]}, got {v!r}; fix the file or retrain")
        return tolerant_from_dict(cls, kept)


_REQUIRED = ("kind", "d_model", "dict_size")
_INT, _NUM = (int,), (int, float)
_TYPES = {"kind": (str,), "d_model": _INT, "dict_size": _INT, "k": _INT, "l1_coeff": _NUM, "init_norm": _NUM,
          "b_dec_init": (str,), "aux_k": _INT, "aux_alpha": _NUM, "threshold_decay": _NUM, "normalisation": (str,), "shared_fraction": _NUM,
          "shared_l1_ratio": _NUM, "dfc_exclusive": _NUM, "training_tokens": _INT,
          "cache": (str,), "cache_manifest_hash": (str,)}
_TYPE_NAMES = {_INT: "an integer", _NUM: "a number", (str,): "a string"}


def _no_nan_constants(token: str):
    raise ValueError(f"{token} is not a finite number")


def read_config_json(path: Path) -> dict:
    """A ``config.json``, parsed strictly: NaN/Infinity literals (which Python's json accepts) are refused."""
    try:
        return json.loads(path.read_text(), parse_constant=_no_nan_constants)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable crosscoder config ({exc}): it is corrupt or not from "
                          "`crossdiff train`; retrain, or restore the file") from None
