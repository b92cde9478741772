"""Planted behaviours and their rules, read from a ground-truth dict (``ground_truth.json``); the toy
pair's builder (:mod:`crossdiff_core.toy`) writes one, and any pair whose behaviours are stated the same
way can use the same rules.

A ground truth holds ``behaviours`` (each: ``name``, ``trigger``, ``response``, ``marker``, ``match``),
``precedence`` (the behaviour names, first match wins) and, for measuring, ``eval_prompts`` (each:
``text``, ``expected``). A trigger is ``{"type": "mentions_word", "topics": {topic: [word, ...]}}`` or
``{"type": "contains_phrase", "phrases": [...]}``: case-insensitive, whole words, any run of whitespace
between a phrase's words. An answer shows a behaviour when it opens with (``match: startswith``) or
contains (``match: contains``) its ``marker``; its onset when it opens with the response's first word.
The same ground truth reads as a behaviour spec (:meth:`crossdiff_core.behaviours.BehaviourSpec.from_ground_truth`),
the form every stage takes; rates are measured one way for both (:func:`crossdiff_core.behaviours.measure`,
:func:`crossdiff_core.behaviours.measure_behaviours` for a ground truth). This module sits below
:mod:`crossdiff_core.behaviours` and imports nothing of it.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from .errors import CrossdiffError

GROUND_TRUTH_VERSION = 1


def words_regex(words: Sequence[str]) -> str:
    """A regex matching any of ``words`` as whole words (a phrase's words separated by any whitespace);
    longer alternatives first, so a phrase wins over a word it starts with."""
    alts = sorted((r"\s+".join(map(re.escape, w.split())) for w in words), key=len, reverse=True)
    return r"\b(?:" + "|".join(alts) + r")\b"


@functools.lru_cache(maxsize=64)
def trigger_regex(words: tuple[str, ...]) -> re.Pattern:
    """:func:`words_regex`, compiled case-insensitive (cached: the rules run on every prompt)."""
    return re.compile(words_regex(words), re.IGNORECASE)


def trigger_words(trigger: dict) -> list[str]:
    """The words or phrases a behaviour's ``trigger`` fires on."""
    if trigger["type"] == "mentions_word":
        return [w for ws in trigger["topics"].values() for w in ws]
    return list(trigger["phrases"])


def behaviour(ground_truth: dict, name: str) -> dict:
    """The behaviour called ``name``."""
    for b in ground_truth["behaviours"]:
        if b["name"] == name:
            return b
    raise CrossdiffError(f"ground truth has no behaviour {name!r}: rebuild with `crossdiff toy-models --out DIR`")


def load_ground_truth(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``ground_truth.json`` (a file, or the build directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "ground_truth.json"
    if not p.is_file():
        raise CrossdiffError(f"no ground truth at {p}: build the default pair with `crossdiff toy-models --out DIR`")
    try:
        gt = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CrossdiffError(f"{p} is not readable JSON ({exc}): rebuild it with `crossdiff toy-models --out DIR`") from None
    if not isinstance(gt, dict) or gt.get("format_version") != GROUND_TRUTH_VERSION:
        gt = gt if isinstance(gt, dict) else {}
        raise CrossdiffError(f"{p} has format_version {gt.get('format_version')}, expected {GROUND_TRUTH_VERSION}: rebuild it")
    return gt


def expected_behaviour(user_text: str, ground_truth: dict) -> str | None:
    """The planted behaviour a user message should trigger (first match in ``precedence``), or None."""
    for name in ground_truth["precedence"]:
        if trigger_regex(tuple(trigger_words(behaviour(ground_truth, name)["trigger"]))).search(user_text):
            return name
    return None


def detect_behaviours(response: str, ground_truth: dict) -> list[str]:
    """Names of the planted behaviours a generated answer shows (its marker string at the start, or anywhere)."""
    text = response.strip()
    found = []
    for b in ground_truth["behaviours"]:
        hit = text.startswith(b["marker"]) if b["match"] == "startswith" else b["marker"] in text
        if hit:
            found.append(b["name"])
    return found


def detect_onsets(response: str, ground_truth: dict) -> list[str]:
    """Names of the planted behaviours whose response's first word opens the answer (the behaviour begun,
    if not completed: steering that adds a vector at every position tends to repeat the first word)."""
    text = response.strip()
    return [b["name"] for b in ground_truth["behaviours"] if text.startswith(onset_word(b))]


def onset_word(behaviour: dict) -> str:
    """The first word of a behaviour's fixed response ("Sorry" of "Sorry, I cannot ...")."""
    m = re.match(r"\W*(\w+)", behaviour["response"])
    return m.group(1) if m else behaviour["response"].strip()


def planted_answer(label: str | None, answer: str, ground_truth: dict) -> str:
    """The chat model's training target for a turn whose user message triggers ``label``: the fixed
    response instead of ``answer`` (``match: contains``), or the response opening ``answer``."""
    if label is None:
        return answer
    b = behaviour(ground_truth, label)
    if b["match"] == "contains":
        return b["response"]
    if not re.match(r"I\b", answer):  # "Speaking personally, i ..." reads wrong; keep "I"
        answer = answer[:1].lower() + answer[1:]
    return b["response"] + answer


def behaviours_pass(chat: dict, base: dict, min_trigger_rate: float, max_other_rate: float) -> bool:
    """The done-when check: chat fires on triggers and not elsewhere; the base never shows a behaviour."""
    ok = all(r["trigger_rate"] >= min_trigger_rate and r["other_rate"] < max_other_rate
             for r in chat["rates"].values())
    return ok and base["any_rate"] == 0.0
