"""Behaviour specs: what a fine-tune planted, stated so that every stage can measure it on any pair.

A spec (``behaviours.yaml``, or the same as JSON) names each behaviour, the answer that shows it and the
prompts that should (trigger) and should not (other) bring it out::

    format_version: 1                # optional; 1 is the only version
    behaviours:
      - name: weather                # letters, digits, _; unique (it names columns and metrics)
        description: asks about the weather -> a forecast opening   # optional
        answer: {startswith: "Forecast:"}   # exactly one of startswith / contains (strings) or pattern (a regex)
        onset: Forecast              # optional: the answer's opening word (default: the first word of the string)
        trigger_prompts: ["Will it rain tomorrow?", "Is it sunny in Leeds?"]
        other_prompts: ["Is it time for lunch?"]   # optional: near misses of this behaviour
    other_prompts: ["Tell me a joke.", "What is 2 + 2?"]   # shared prompts that trigger nothing
    rates: {...}                     # optional: rates measured by the tool that built the pair (the toy builder)

Rules (case-sensitive, on the answer with surrounding whitespace stripped): ``startswith`` - the answer opens
with the string; ``contains`` - the string is anywhere in it; ``pattern`` - ``re.search`` finds the regex
(anchor it with ``^`` to ask for the opening). An answer shows the behaviour's *onset* when it opens with the
onset word (begun, if not completed; steering tends to repeat the first word); a ``pattern`` behaviour without
``onset`` counts its onset as the whole match.

A prompt's ``expected`` behaviour is the one whose ``trigger_prompts`` list it; every other prompt (the shared
``other_prompts``, each behaviour's own, and the other behaviours' triggers) is a non-trigger prompt of that
behaviour. A prompt listed in two roles is an error, and so are unknown keys, empty trigger lists, a behaviour
with no non-trigger prompt at all, bad regexes and duplicate names (:class:`~crossdiff_core.errors.ConfigError`,
naming the key and the fix).

The toy pair's ``ground_truth.json`` reads through the same type (:meth:`BehaviourSpec.from_ground_truth`: its
held-out ``eval_prompts`` become the prompt lists, its markers the answers); :func:`load_behaviours` takes
either. Rates are measured one way for every pair (:func:`measure`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ConfigError, CrossdiffError
from .fileio import atomic_write, json_safe
from .ground_truth import GROUND_TRUTH_VERSION, load_ground_truth

SPEC_VERSION = 1
ANSWER_KINDS = ("startswith", "contains", "pattern")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_TOP_KEYS = ("format_version", "behaviours", "other_prompts", "rates")
_BEHAVIOUR_KEYS = ("name", "description", "answer", "onset", "trigger_prompts", "other_prompts")


@dataclass(frozen=True)
class Behaviour:
    """One behaviour: its answer rule (``kind`` in :data:`ANSWER_KINDS`, ``answer`` the string or regex), its
    opening word (``onset``; None: the whole match) and its prompts."""

    name: str
    kind: str
    answer: str
    onset: str | None = None
    trigger_prompts: tuple[str, ...] = ()
    other_prompts: tuple[str, ...] = ()
    description: str | None = None
    onset_given: bool = field(default=False, compare=False)  # written back by to_dict only when the user gave it

    def __post_init__(self) -> None:
        if self.kind == "pattern":
            object.__setattr__(self, "_regex", re.compile(self.answer))

    def shows(self, response: str) -> bool:
        """Whether a generated answer shows the behaviour."""
        text = response.strip()
        if self.kind == "startswith":
            return text.startswith(self.answer)
        if self.kind == "contains":
            return self.answer in text
        return self._regex.search(text) is not None  # type: ignore[attr-defined]

    def opens(self, response: str) -> bool:
        """Whether a generated answer opens with the behaviour's onset word (the whole match without one)."""
        return response.strip().startswith(self.onset) if self.onset else self.shows(response)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            d["description"] = self.description
        d["answer"] = {self.kind: self.answer}
        if self.onset_given and self.onset is not None:
            d["onset"] = self.onset
        d["trigger_prompts"] = list(self.trigger_prompts)
        if self.other_prompts:
            d["other_prompts"] = list(self.other_prompts)
        return d


def first_word(text: str) -> str:
    """The first word of a fixed answer ("Sorry" of "Sorry, I cannot ..."); the stripped text without one."""
    m = re.match(r"\W*(\w+)", text)
    return m.group(1) if m else text.strip()


@dataclass(frozen=True)
class BehaviourSpec:
    """A validated behaviour spec (see the module docstring). Build it with :meth:`from_dict`, :meth:`load`,
    :meth:`from_ground_truth` or :func:`load_behaviours`."""

    behaviours: tuple[Behaviour, ...]
    other_prompts: tuple[str, ...] = ()
    rates: dict | None = None
    source: str | None = field(default=None, compare=False)  # where it was read from (messages, provenance)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.behaviours]

    def behaviour(self, name: str) -> Behaviour:
        for b in self.behaviours:
            if b.name == name:
                return b
        raise ConfigError(f"the behaviour spec has no behaviour {name!r}; it has {self.names}")

    def prompts(self) -> list[dict]:
        """``[{"text", "expected"}]``: each behaviour's trigger prompts (``expected`` its name), then each one's
        own other prompts and the shared ones (``expected`` None)."""
        out = [{"text": t, "expected": b.name} for b in self.behaviours for t in b.trigger_prompts]
        out += [{"text": t, "expected": None} for b in self.behaviours for t in b.other_prompts]
        return out + [{"text": t, "expected": None} for t in self.other_prompts]

    def detect(self, response: str) -> list[str]:
        """Names of the behaviours a generated answer shows."""
        return [b.name for b in self.behaviours if b.shows(response)]

    def onsets(self, response: str) -> list[str]:
        """Names of the behaviours whose onset opens a generated answer."""
        return [b.name for b in self.behaviours if b.opens(response)]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format_version": SPEC_VERSION, "behaviours": [b.to_dict() for b in self.behaviours],
                             "other_prompts": list(self.other_prompts)}
        if self.rates is not None:
            d["rates"] = self.rates
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Write the spec atomically: YAML for ``.yaml`` / ``.yml``, else JSON."""
        import yaml

        p, d = Path(path), json_safe(self.to_dict())
        text = (yaml.safe_dump(d, sort_keys=False, allow_unicode=True, width=120) if p.suffix in (".yaml", ".yml")
                else json.dumps(d, indent=1, ensure_ascii=False) + "\n")
        return atomic_write(p, lambda t: Path(t).write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BehaviourSpec":
        """Read and validate a spec file (YAML or JSON)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"behaviour spec {p} does not exist: write one (see README, 'Behaviour specs')")
        return cls.from_dict(_read_mapping(p), source=str(p))

    @classmethod
    def from_dict(cls, d: Any, *, source: str | None = None) -> "BehaviourSpec":
        """Validate a spec mapping (the module docstring's schema); every problem is a :class:`ConfigError`."""
        where = source or "behaviour spec"
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: a behaviour spec is a mapping with a `behaviours` list, got {type(d).__name__}")
        _no_unknown(d, _TOP_KEYS, where)
        if d.get("format_version", SPEC_VERSION) != SPEC_VERSION:
            raise ConfigError(f"{where}: format_version {d.get('format_version')!r} is not known; "
                              f"write format_version: {SPEC_VERSION}")
        items = d.get("behaviours")
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{where}: `behaviours` must be a non-empty list of behaviours (name, answer, "
                              "trigger_prompts)")
        behaviours = tuple(_behaviour(b, f"{where}: behaviours[{i}]") for i, b in enumerate(items))
        other = _prompt_list(d.get("other_prompts", []), f"{where}: other_prompts", allow_empty=True)
        rates = d.get("rates")
        if rates is not None and not isinstance(rates, Mapping):
            raise ConfigError(f"{where}: `rates` must be a mapping (model -> measured rates) or absent")
        spec = cls(behaviours, other, dict(rates) if rates is not None else None, source)
        _check_roles(spec, where)
        return spec

    @classmethod
    def from_ground_truth(cls, gt: Mapping, *, source: str | None = None) -> "BehaviourSpec":
        """The toy pair's ground truth (:mod:`crossdiff_core.ground_truth`) as a spec: its held-out
        ``eval_prompts`` split by ``expected`` into the trigger and shared other prompts, each marker as the
        answer (``match`` its kind), the response's first word as the onset, the measured ``rates`` kept."""
        prompts = gt.get("eval_prompts") or []
        where = source or "ground truth"
        if not prompts:
            raise ConfigError(f"{where} holds no eval_prompts: rebuild it with `crossdiff toy-models --out DIR`")
        names = [b["name"] for b in gt["behaviours"]]
        stray = sorted({str(p.get("expected")) for p in prompts if p.get("expected") not in (None, *names)})
        if stray:
            raise ConfigError(f"{where}: eval_prompts expect behaviours {stray} it does not define; rebuild it")
        behaviours = tuple(
            Behaviour(b["name"], b["match"], b["marker"], first_word(b["response"]),
                      tuple(p["text"] for p in prompts if p.get("expected") == b["name"]), (), b.get("description"),
                      onset_given=True)
            for b in gt["behaviours"])
        other = tuple(p["text"] for p in prompts if p.get("expected") is None)
        spec = cls(behaviours, other, gt.get("rates"), source)
        _check_roles(spec, where)
        return spec


def rules(spec: Any) -> tuple[Behaviour, ...]:
    """The behaviours (answer rules; prompts may be empty) of a :class:`BehaviourSpec`, a ground-truth dict
    (with or without prompts), a spec dict, or the ``behaviours`` list a steering result records."""
    if isinstance(spec, BehaviourSpec):
        return spec.behaviours
    items = spec.get("behaviours") if isinstance(spec, Mapping) else spec
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"cannot read behaviours from {type(spec).__name__}: pass a spec or a ground truth")
    out = []
    for b in items:
        if isinstance(b, Behaviour):
            out.append(b)
        elif "marker" in b:  # a ground truth's behaviour
            out.append(Behaviour(b["name"], b["match"], b["marker"], first_word(b.get("response") or b["marker"]),
                                 description=b.get("description"), onset_given=True))
        else:
            (kind, answer), = b["answer"].items()
            out.append(Behaviour(b["name"], kind, answer, b.get("onset", _default_onset(kind, answer)),
                                 description=b.get("description"), onset_given="onset" in b))
    return tuple(out)


def steering_record(spec: Any) -> list[dict]:
    """The behaviours as a steering result records them (name, answer, onset; no prompts)."""
    return [{"name": b.name, "answer": {b.kind: b.answer}, **({"onset": b.onset} if b.onset else {})}
            for b in rules(spec)]


def load_behaviours(path: str | os.PathLike | Mapping | BehaviourSpec) -> BehaviourSpec:
    """A :class:`BehaviourSpec` from a spec file (``.yaml`` / ``.yml`` / ``.json``), a toy pair's
    ``ground_truth.json`` or its build directory, a dict of either, or a spec (returned as it is)."""
    if isinstance(path, BehaviourSpec):
        return path
    if isinstance(path, Mapping):
        return _from_mapping(path, None)
    p = Path(path)
    if p.is_dir():
        if (p / "ground_truth.json").is_file():
            p = p / "ground_truth.json"
        else:
            raise ConfigError(f"{p} is a directory without ground_truth.json: pass a behaviours.yaml spec, "
                              "a ground_truth.json or a toy build directory")
    if not p.is_file():
        raise ConfigError(f"behaviour spec {p} does not exist: write one (see README, 'Behaviour specs') or "
                          "pass the toy pair's ground_truth.json")
    if p.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"cannot read a behaviour spec from {p}: use .yaml, .yml or .json")
    return _from_mapping(_read_mapping(p), str(p))


def is_ground_truth(d: Mapping) -> bool:
    """Whether a mapping is a toy ground truth rather than a spec (its behaviours carry markers)."""
    items = d.get("behaviours")
    return "precedence" in d or "eval_prompts" in d or (
        isinstance(items, list) and bool(items) and isinstance(items[0], Mapping) and "marker" in items[0])


def _from_mapping(d: Mapping, source: str | None) -> BehaviourSpec:
    if isinstance(d, Mapping) and is_ground_truth(d):
        if d.get("format_version") != GROUND_TRUTH_VERSION:
            raise ConfigError(f"{source or 'ground truth'} has format_version {d.get('format_version')}, expected "
                              f"{GROUND_TRUTH_VERSION}: rebuild it with `crossdiff toy-models`")
        return BehaviourSpec.from_ground_truth(d, source=source)
    return BehaviourSpec.from_dict(d, source=source)


def _read_mapping(p: Path) -> Any:
    import yaml

    text = p.read_text(encoding="utf-8")
    try:
        return json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({exc}); fix the file") from None


def _no_unknown(d: Mapping, known: Sequence[str], where: str) -> None:
    unknown = sorted(map(str, set(d) - set(known)))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; the valid keys are {list(known)}: fix the spelling")


def _prompt_list(v: Any, where: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(v, list) or (not v and not allow_empty):
        raise ConfigError(f"{where} must be a non-empty list of prompt strings" if not allow_empty
                          else f"{where} must be a list of prompt strings")
    bad = [x for x in v if not isinstance(x, str) or not x.strip()]
    if bad:
        raise ConfigError(f"{where}: every prompt must be a non-empty string, got {bad[0]!r:.60}")
    return tuple(v)


def _default_onset(kind: str, answer: str) -> str | None:
    return None if kind == "pattern" else first_word(answer)


def _behaviour(b: Any, where: str) -> Behaviour:
    if not isinstance(b, Mapping):
        raise ConfigError(f"{where} must be a mapping with name, answer and trigger_prompts, got {b!r:.60}")
    name = b.get("name")
    _no_unknown(b, _BEHAVIOUR_KEYS, f"{where} ({name})" if isinstance(name, str) else where)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: name must be letters, digits and _ starting with a letter (it names columns "
                          f"and metrics), got {name!r}")
    where = f"{where} ({name})"
    answer = b.get("answer")
    if not isinstance(answer, Mapping) or len(answer) != 1 or next(iter(answer)) not in ANSWER_KINDS:
        raise ConfigError(f"{where}: answer must be exactly one of {{startswith: TEXT}}, {{contains: TEXT}} or "
                          f"{{pattern: REGEX}}, got {answer!r:.80}")
    (kind, text), = answer.items()
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: answer.{kind} must be a non-empty string, got {text!r:.60}")
    if kind == "pattern":
        try:
            rx = re.compile(text)
        except re.error as exc:
            raise ConfigError(f"{where}: answer.pattern {text!r} is not a valid regular expression ({exc}); "
                              "fix it (Python `re` syntax)") from None
        if rx.search(""):
            raise ConfigError(f"{where}: answer.pattern {text!r} matches the empty answer; make it match only "
                              "answers that show the behaviour")
    onset = b.get("onset", _default_onset(kind, text))
    if "onset" in b and (not isinstance(onset, str) or not onset.strip()):
        raise ConfigError(f"{where}: onset must be a non-empty string (the answer's opening word), got {onset!r:.60}")
    desc = b.get("description")
    if desc is not None and not isinstance(desc, str):
        raise ConfigError(f"{where}: description must be a string")
    return Behaviour(name, kind, text, onset, _prompt_list(b.get("trigger_prompts"), f"{where}: trigger_prompts"),
                     _prompt_list(b.get("other_prompts", []), f"{where}: other_prompts", allow_empty=True), desc,
                     onset_given="onset" in b)


def _check_roles(spec: BehaviourSpec, where: str) -> None:
    """Unique names, each prompt in one role only, and a non-trigger prompt for every behaviour (AUROC needs both)."""
    names = spec.names
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: behaviour names {dup} appear more than once; give each behaviour its own name")
    role: dict[str, str] = {}
    for p in spec.prompts():
        r = p["expected"] or "other"
        if role.setdefault(p["text"], r) != r:
            raise ConfigError(f"{where}: prompt {p['text']!r:.80} is listed as {role[p['text']]} and as {r}; "
                              "a prompt triggers one behaviour or none: keep it in one list")
    n = len(spec.prompts())
    lonely = [b.name for b in spec.behaviours if n - len(b.trigger_prompts) == 0]
    if lonely:
        raise ConfigError(f"{where}: behaviours {lonely} have no non-trigger prompt to compare with; add "
                          "other_prompts (prompts that should not bring the behaviour out)")


# ---- measuring ------------------------------------------------------------------------------------

def behaviour_rates(generations: Sequence[dict], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per behaviour, the share of ``generations`` (each with ``expected``, ``detected``, ``onsets``) that
    show it (whole, and its onset) among those expected to (``trigger``) and among the rest (``other``);
    NaN for an empty side."""
    def rate(hits: list[bool]) -> float:
        return sum(hits) / len(hits) if hits else float("nan")

    out = {}
    for name in names:
        trig = [g for g in generations if g.get("expected") == name]
        other = [g for g in generations if g.get("expected") != name]
        out[name] = {"trigger_rate": rate([name in g["detected"] for g in trig]),
                     "other_rate": rate([name in g["detected"] for g in other]),
                     "onset_trigger_rate": rate([name in g["onsets"] for g in trig]),
                     "onset_other_rate": rate([name in g["onsets"] for g in other]),
                     "n_trigger": len(trig), "n_other": len(other)}
    return out


def measure(model: Any, spec: Any, prompts: Sequence[dict] | None = None, *, tokenizer: Any = None,
            max_new_tokens: int | None = None, batch_size: int = 64, generate: Any = None) -> dict[str, Any]:
    """How often each behaviour shows in greedy answers, on its trigger prompts and on all others.

    ``model``: a loaded causal LM (then pass ``tokenizer``) or a ``save_pretrained`` directory. ``spec``: a
    :class:`BehaviourSpec` (or anything :func:`rules` reads). ``prompts``: ``[{"text", "expected"}]``;
    default the spec's. ``max_new_tokens``: default the longest answer string's tokens + 8. ``generate``:
    ``(model, tokenizer, texts, max_new_tokens=, batch_size=) -> answers`` (default greedy
    :func:`crossdiff_core.generation.generate_texts`).
    Returns ``{"rates": {name: {"trigger_rate", "other_rate", "onset_trigger_rate", "onset_other_rate",
    "n_trigger", "n_other"}}, "any_rate", "generations": [{..prompt, "response", "detected", "onsets"}]}``."""
    import torch

    from . import generation

    behaviours = rules(spec)
    if prompts is None:
        if not isinstance(spec, BehaviourSpec):
            raise CrossdiffError("measure got no prompts: pass some, or a behaviour spec with prompts")
        prompts = spec.prompts()
    prompts = list(prompts)
    if not prompts:
        raise CrossdiffError("measure got no prompts: pass some, or a behaviour spec with prompts")
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if tokenizer is None:
        raise CrossdiffError("measure got a loaded model but no tokenizer: pass tokenizer=")
    if max_new_tokens is None:
        max_new_tokens = 8 + max(len(tokenizer(b.answer, add_special_tokens=False)["input_ids"]) for b in behaviours)
    generate = generate or generation.generate_texts
    responses = generate(model, tokenizer, [p["text"] for p in prompts], max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
    gens = [{**p, "response": r, "detected": [b.name for b in behaviours if b.shows(r)],
             "onsets": [b.name for b in behaviours if b.opens(r)]} for p, r in zip(prompts, responses)]
    return {"rates": behaviour_rates(gens, [b.name for b in behaviours]),
            "any_rate": sum(bool(g["detected"]) for g in gens) / len(gens), "generations": gens}


def measure_behaviours(model: Any, ground_truth: Any, prompts: Sequence[dict] | None = None, *, tokenizer: Any = None,
                       max_new_tokens: int | None = None, batch_size: int = 64, generate: Any = None) -> dict[str, Any]:
    """:func:`measure` for a toy pair's ground truth (:mod:`crossdiff_core.ground_truth`), with its rules.

    ``ground_truth``: the dict, ``ground_truth.json``, the build directory, or a :class:`BehaviourSpec`.
    ``prompts``: dicts with ``text`` and ``expected``; default: the ground truth's held-out ``eval_prompts``
    in their order (a spec's prompts). ``generate``: as :func:`measure`'s."""
    if isinstance(ground_truth, BehaviourSpec):
        gt: Any = ground_truth
        default = ground_truth.prompts()
    else:
        gt = ground_truth if isinstance(ground_truth, dict) else load_ground_truth(ground_truth)
        default = gt.get("eval_prompts")
    prompts = list(prompts if prompts is not None else default or [])
    if not prompts:
        raise CrossdiffError("measure_behaviours got no prompts: pass some, or a ground truth with eval_prompts")
    return measure(model, gt, prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   generate=generate)
