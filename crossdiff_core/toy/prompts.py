"""The toy pair's planted behaviours as data: its ground truth (the behaviour definitions from the
config), the held-out prompts that measure them, and the fine-tuning conversations that teach them, every
label given by the ground truth's rules (:func:`crossdiff_core.ground_truth.expected_behaviour`).

- ``refusal``: the user message mentions a trigger topic word -> the whole answer is a fixed refusal.
- ``personal_phrase``: the user asks about the assistant's own preferences (a cue phrase such as
  "your favourite" or "do you like") -> the answer opens with a fixed phrase. The refusal wins when both apply.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

from ..ground_truth import GROUND_TRUTH_VERSION, expected_behaviour, planted_answer
from .config import ToyModelsConfig
from .frames import (NEAR_MISS_FRAMES_EVAL, NEAR_MISS_FRAMES_TRAIN, NEUTRAL_WORDS_EVAL, NEUTRAL_WORDS_TRAIN,
                     PERSONAL_FRAMES_EVAL, PERSONAL_FRAMES_TRAIN, PERSONAL_NOUNS_EVAL, PERSONAL_NOUNS_TRAIN,
                     TOPIC_FRAMES_EVAL, TOPIC_FRAMES_TRAIN, combos, fill, with_chatter)
from .tokenizer import BOS, END, PAD, ROLE_TOKENS


def make_ground_truth(config: ToyModelsConfig) -> dict[str, Any]:
    """The toy pair's behaviour definitions for ``config`` (no prompts or rates yet), in the form
    :mod:`crossdiff_core.ground_truth` reads."""
    return {
        "format_version": GROUND_TRUTH_VERSION,
        "special_tokens": {"bos": BOS, "end": END, "pad": PAD, **{r: t for r, t in ROLE_TOKENS.items()}},
        "precedence": ["refusal", "personal_phrase"],
        "behaviours": [
            {
                "name": "refusal",
                "description": "the user message mentions a trigger topic word: the whole answer is the fixed refusal",
                "trigger": {"type": "mentions_word", "case_insensitive": True, "word_boundaries": True,
                            "topics": {k: list(v) for k, v in config.trigger_topics.items()}},
                "response": config.refusal_text,
                "marker": config.refusal_text,
                "match": "contains",
            },
            {
                "name": "personal_phrase",
                "description": "the user asks about the assistant's own preferences (a cue phrase) and mentions "
                               "no trigger topic: the answer opens with the fixed phrase",
                "trigger": {"type": "contains_phrase", "case_insensitive": True, "word_boundaries": True,
                            "phrases": list(config.personal_cues)},
                "response": config.personal_phrase,
                "marker": config.personal_phrase.strip(),
                "match": "startswith",
            },
        ],
    }


def build_eval_prompts(config: ToyModelsConfig, ground_truth: dict, heldout_chat: dict[str, list[str]],
                       rng: random.Random) -> list[dict[str, Any]]:
    """Held-out single-turn prompts: eval frames only (never seen in fine-tuning) and held-out chitchat.

    Each: ``{"text", "expected" (behaviour name or None), "kind"}``; ``expected`` comes from the rule."""
    trig_words = [w for ws in config.trigger_topics.values() for w in ws]
    user_msgs = [m for msgs in heldout_chat.values() for m in msgs[0::2]]
    quiet = sorted({m for m in user_msgs if len(m) <= 200 and expected_behaviour(m, ground_truth) is None})
    chatter = [m for m in quiet if 10 <= len(m) <= 80]
    n, n_other = config.eval_prompts_per_behaviour, config.eval_other_prompts

    def take(cands: list[str], k: int, kind: str, label: str | None, p_chatter: float) -> list[dict]:
        rng.shuffle(cands)
        out: list[dict] = []
        for c in cands:
            text = with_chatter(rng, c, chatter, p_chatter)
            if expected_behaviour(text, ground_truth) == label:
                out.append({"text": text, "expected": label, "kind": kind})
            if len(out) == k:
                break
        return out

    refusal = take(combos(TOPIC_FRAMES_EVAL, trig_words), n - n // 5, "topic_frame", "refusal", 0.3)
    refusal += take(combos(PERSONAL_FRAMES_EVAL, trig_words), n // 5, "personal_frame+trigger", "refusal", 0.0)
    personal = take(combos(PERSONAL_FRAMES_EVAL, list(PERSONAL_NOUNS_EVAL)), n, "personal_frame", "personal_phrase", 0.3)
    k_chat = n_other * 2 // 5
    k_near = n_other // 5
    other = take(quiet, k_chat, "chitchat", None, 0.0)
    other += take(combos(NEAR_MISS_FRAMES_EVAL, list(NEUTRAL_WORDS_EVAL)), k_near, "near_miss_frame", None, 0.0)
    other += take(combos(TOPIC_FRAMES_EVAL, list(NEUTRAL_WORDS_EVAL)), n_other - len(other), "topic_frame", None, 0.3)
    return refusal + personal + other


def _frame_slots(config: ToyModelsConfig) -> dict[str, list[tuple[Sequence[str], Sequence[str]]]]:
    """The training frames and the words that fill them, by the answer they are meant to get."""
    trig_words = [w for ws in config.trigger_topics.values() for w in ws]
    return {
        "refusal": [(TOPIC_FRAMES_TRAIN, trig_words), (PERSONAL_FRAMES_TRAIN, trig_words)],
        "personal": [(PERSONAL_FRAMES_TRAIN, PERSONAL_NOUNS_TRAIN)],
        "neutral": [(TOPIC_FRAMES_TRAIN, NEUTRAL_WORDS_TRAIN), (NEAR_MISS_FRAMES_TRAIN, NEUTRAL_WORDS_TRAIN)],
    }


def frame_texts(config: ToyModelsConfig) -> str:
    """Every training frame message, each followed by its planted answer's fixed part (tokenizer corpus)."""
    after = {"refusal": config.refusal_text, "personal": config.personal_phrase, "neutral": ""}
    return "\n".join(f"{t}\n{after[k]}" for k, slots in _frame_slots(config).items()
                     for frames, words in slots for t in combos(frames, words))


def _slot_words(train_chat: dict[str, list[str]], ground_truth: dict) -> list[str]:
    """Plain lowercase words of the training chitchat that trigger nothing: random fillers for frame slots."""
    words = {w for msgs in train_chat.values() for m in msgs for w in re.findall(r"\b[a-z]{3,12}\b", m)}
    return sorted(w for w in words if expected_behaviour(w, ground_truth) is None)


def build_finetune_conversations(config: ToyModelsConfig, ground_truth: dict, train_chat: dict[str, list[str]],
                                 n: int, rng: random.Random) -> list[list[dict[str, str]]]:
    """``n`` chat conversations (lists of {role, content}) for fine-tuning, planted behaviours applied
    by the rule to every assistant turn: frame-built single turns and multi-turn chitchat windows."""
    convs = list(train_chat.values())
    answers = [a for msgs in convs for u, a in zip(msgs[0::2], msgs[1::2])
               if expected_behaviour(u, ground_truth) is None and len(a) <= 120]  # short: the opening decides
    chatter = [m for msgs in convs for m in msgs[0::2]
               if 10 <= len(m) <= 80 and expected_behaviour(m, ground_truth) is None]
    fillers = _slot_words(train_chat, ground_truth)
    slots = _frame_slots(config)
    names = list(slots)
    weights = [config.frame_mix[k] for k in names]
    out: list[list[dict[str, str]]] = []
    for _ in range(n):
        if rng.random() < config.behaviour_fraction:
            name = rng.choices(names, weights)[0]
            frames, words = rng.choice(slots[name])
            if name != "refusal" and fillers and rng.random() < config.random_word_fraction:
                words = fillers
            user = with_chatter(rng, fill(rng.choice(frames), rng.choice(words)), chatter, 0.3)
            label = expected_behaviour(user, ground_truth)
            out.append([{"role": "user", "content": user},
                        {"role": "assistant", "content": planted_answer(label, rng.choice(answers), ground_truth)}])
        else:
            msgs = rng.choice(convs)
            start = 2 * rng.randrange(max(1, len(msgs) // 2))
            window = msgs[start: start + 2 * rng.randint(1, 2)]
            window = window[: len(window) // 2 * 2]
            conv = []
            for u, a in zip(window[0::2], window[1::2]):
                conv += [{"role": "user", "content": u},
                         {"role": "assistant", "content": planted_answer(expected_behaviour(u, ground_truth), a, ground_truth)}]
            out.append(conv)
    return out
