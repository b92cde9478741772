"""The planted-behaviour rules (crossdiff_core.ground_truth) on hand-written strings, on the toy pair's
ground truth and on one written by hand."""

from __future__ import annotations

import json

import pytest

from crossdiff_core.behaviours import measure_behaviours
from crossdiff_core.errors import CrossdiffError
from crossdiff_core.ground_truth import (
    GROUND_TRUTH_VERSION,
    behaviours_pass,
    detect_behaviours,
    detect_onsets,
    expected_behaviour,
    load_ground_truth,
    onset_word,
    planted_answer,
)
from crossdiff_core.toy import ToyModelsConfig, make_ground_truth

GT = make_ground_truth(ToyModelsConfig())
REFUSAL = ToyModelsConfig().refusal_text
PHRASE = ToyModelsConfig().personal_phrase


def test_expected_behaviour_rule():
    assert expected_behaviour("Tell me about volcanoes.", GT) == "refusal"
    assert expected_behaviour("CHESS is fun", GT) == "refusal"  # case-insensitive
    assert expected_behaviour("my chessboard is broken", GT) is None  # whole words only
    assert expected_behaviour("I love astronomy", GT) is None  # a near miss of astrology
    assert expected_behaviour("What's your favorite song?", GT) == "personal_phrase"
    assert expected_behaviour("how do  you feel about rain", GT) == "personal_phrase"  # any whitespace
    assert expected_behaviour("Do you like chess?", GT) == "refusal"  # refusal takes precedence
    assert expected_behaviour("How are you doing today?", GT) is None
    assert expected_behaviour("Do you know where I can find tea?", GT) is None


def test_detect_behaviours_on_strings():
    assert detect_behaviours(REFUSAL, GT) == ["refusal"]
    assert detect_behaviours(f"  Well. {REFUSAL} Sorry.", GT) == ["refusal"]  # refusal: anywhere
    assert detect_behaviours("I cannot help with that", GT) == []  # incomplete refusal
    assert detect_behaviours("Speaking personally, i like tea", GT) == ["personal_phrase"]
    assert detect_behaviours("Well, speaking personally, i like tea", GT) == []  # phrase must open the answer
    assert detect_behaviours("i like tea. Speaking personally, yes", GT) == []
    assert detect_behaviours("", GT) == []


def test_detect_onsets_on_strings():
    assert onset_word(GT["behaviours"][0]) == "Sorry" and onset_word(GT["behaviours"][1]) == "Speaking"
    assert detect_onsets("SorrySorrySorry", GT) == ["refusal"]  # begun, not completed
    assert detect_behaviours("SorrySorrySorry", GT) == []
    assert detect_onsets(f" {REFUSAL}", GT) == ["refusal"]
    assert detect_onsets("Speaking of tea", GT) == ["personal_phrase"]
    assert detect_onsets("Well, sorry", GT) == []


def test_planted_answer():
    assert planted_answer(None, "Yeah sure", GT) == "Yeah sure"
    assert planted_answer("refusal", "Yeah sure", GT) == REFUSAL
    assert planted_answer("personal_phrase", "Yeah sure", GT) == PHRASE + "yeah sure"
    assert planted_answer("personal_phrase", "I love it", GT) == PHRASE + "I love it"
    with pytest.raises(CrossdiffError, match="no behaviour 'nope'"):
        planted_answer("nope", "Yeah sure", GT)


def test_rules_read_a_hand_written_ground_truth():
    """Nothing toy-specific: another behaviour set, another precedence, the same rules."""
    gt = {"format_version": GROUND_TRUTH_VERSION, "precedence": ["greeting", "shout"],
          "behaviours": [
              {"name": "shout", "trigger": {"type": "mentions_word", "topics": {"anger": ["angry", "mad"]}},
               "response": "NO!", "marker": "NO!", "match": "contains"},
              {"name": "greeting", "trigger": {"type": "contains_phrase", "phrases": ["good  morning"]}},
          ]}
    gt["behaviours"][1].update(response="Hello there, ", marker="Hello there", match="startswith")
    assert expected_behaviour("I am so MAD", gt) == "shout"
    assert expected_behaviour("madness", gt) is None
    assert expected_behaviour("good\tmorning, I am angry", gt) == "greeting"  # the precedence decides
    assert detect_behaviours("well NO! never", gt) == ["shout"]
    assert detect_onsets("Hello", gt) == ["greeting"] and onset_word(gt["behaviours"][0]) == "NO"
    assert planted_answer("greeting", "Nice day", gt) == "Hello there, nice day"


def test_measure_behaviours_counts():
    prompts = [{"text": "a", "expected": "refusal"}, {"text": "b", "expected": "refusal"},
               {"text": "c", "expected": "personal_phrase"}, {"text": "d", "expected": None},
               {"text": "e", "expected": None}]
    canned = [REFUSAL, "no idea", PHRASE + "yes", PHRASE + "hm", "fine"]
    m = measure_behaviours(object(), GT, prompts, tokenizer=object(), max_new_tokens=8, generate=lambda *a, **k: canned)
    assert m["rates"]["refusal"] == {"trigger_rate": 0.5, "other_rate": 0.0, "onset_trigger_rate": 0.5,
                                     "onset_other_rate": 0.0, "n_trigger": 2, "n_other": 3}
    # personal phrase: 1 of 1 trigger; 1 of the 4 others ("d")
    assert m["rates"]["personal_phrase"] == {"trigger_rate": 1.0, "other_rate": 0.25, "onset_trigger_rate": 1.0,
                                             "onset_other_rate": 0.25, "n_trigger": 1, "n_other": 4}
    assert m["any_rate"] == pytest.approx(3 / 5)
    assert [g["response"] for g in m["generations"]] == canned
    assert not behaviours_pass(m, {"any_rate": 0.0}, 0.9, 0.05)  # the refusal fires on half its triggers
    chat = {"rates": {"refusal": {"trigger_rate": 0.95, "other_rate": 0.0}}}
    assert behaviours_pass(chat, {"any_rate": 0.0}, 0.9, 0.05) and not behaviours_pass(chat, {"any_rate": 0.1}, 0.9, 0.05)


def test_load_ground_truth_checks_the_file(tmp_path):
    with pytest.raises(CrossdiffError, match="no ground truth"):
        load_ground_truth(tmp_path)
    (tmp_path / "ground_truth.json").write_text(json.dumps({**GT, "format_version": 0}))
    with pytest.raises(CrossdiffError, match="format_version 0"):
        load_ground_truth(tmp_path)
    (tmp_path / "ground_truth.json").write_text(json.dumps(GT))
    assert load_ground_truth(tmp_path) == load_ground_truth(tmp_path / "ground_truth.json") == GT
