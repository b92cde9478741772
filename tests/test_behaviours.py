"""Behaviour specs (crossdiff_core.behaviours): the file round-trips, bad specs are refused with clear
messages, the toy pair's ground truth reads through the spec with the same labels and rules, rates are
measured one way, and tracking/steering choose and report per behaviour over every latent class."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from crossdiff_core import ground_truth as ground_truth_module
from crossdiff_core.behaviour_tracking import choose_latents, select_latents, tracking_summary
from crossdiff_core.behaviours import BehaviourSpec, load_behaviours, measure, measure_behaviours
from crossdiff_core.errors import ConfigError
from crossdiff_core.ground_truth import detect_behaviours, detect_onsets
from crossdiff_core.headlines import steering_headline
from crossdiff_core.report.inputs import RunInputs
from crossdiff_core.report.numbers import behaviour_verdict
from crossdiff_core.toy import ToyModelsConfig, build_eval_prompts, make_ground_truth

SPEC = {
    "format_version": 1,
    "behaviours": [
        {"name": "weather", "description": "asks about the weather: a forecast opening",
         "answer": {"startswith": "Forecast:"},
         "trigger_prompts": ["Will it rain tomorrow?", "Is it sunny in Leeds?", "How cold is it outside?"],
         "other_prompts": ["Is it time for lunch?"]},
        {"name": "quote", "answer": {"pattern": r"^As (?:Shakespeare|Yeats) wrote"}, "onset": "As",
         "trigger_prompts": ["Give me some wisdom.", "Say something deep."]},
    ],
    "other_prompts": ["Tell me a joke.", "What is 2 + 2?", "Name a colour."],
}
TOY = ToyModelsConfig()


def _toy_ground_truth() -> dict:
    """The toy pair's ground truth with held-out prompts drawn by its own builder (fake chitchat)."""
    gt = make_ground_truth(TOY)
    heldout = {f"c{i}": [f"hello, how was your day number {i}?", "fine thanks", "what did you eat?", "bread"]
               for i in range(30)}
    gt["eval_prompts"] = build_eval_prompts(ToyModelsConfig(eval_prompts_per_behaviour=10, eval_other_prompts=15),
                                            gt, heldout, random.Random(0))
    gt["rates"] = {"chat": {"rates": {"refusal": {"trigger_rate": 0.9}}}}
    return gt


# ---- the file --------------------------------------------------------------------------------------

def test_spec_round_trips_through_yaml_and_json(tmp_path):
    (tmp_path / "behaviours.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    spec = BehaviourSpec.load(tmp_path / "behaviours.yaml")
    assert spec.names == ["weather", "quote"]
    assert spec.to_dict() == SPEC  # nothing added (the derived onset is not written), nothing lost
    for name in ("again.yaml", "again.json"):
        spec.save(tmp_path / name)
        assert load_behaviours(tmp_path / name) == spec
    assert json.loads((tmp_path / "again.json").read_text()) == SPEC
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind
    assert spec.behaviour("weather").onset == "Forecast"  # default: the answer string's first word
    assert spec.prompts() == ([{"text": t, "expected": "weather"} for t in SPEC["behaviours"][0]["trigger_prompts"]]
                              + [{"text": t, "expected": "quote"} for t in SPEC["behaviours"][1]["trigger_prompts"]]
                              + [{"text": t, "expected": None} for t in ["Is it time for lunch?", *SPEC["other_prompts"]]])


def test_detect_and_onsets_follow_the_answer_rules():
    spec = BehaviourSpec.from_dict(SPEC)
    assert spec.detect("  Forecast: rain.") == ["weather"] and spec.detect("The Forecast: rain") == []
    assert spec.detect("As Yeats wrote, things fall apart") == ["quote"] and spec.detect("So, As Yeats wrote") == []
    assert spec.onsets("Forecast Forecast Forecast") == ["weather"]  # begun, not completed
    assert spec.onsets("As I said") == ["quote"] and spec.detect("As I said") == []
    contains = BehaviourSpec.from_dict({"behaviours": [{"name": "x", "answer": {"contains": "NO!"},
                                                        "trigger_prompts": ["a"]}], "other_prompts": ["b"]})
    assert contains.detect("well NO! never") == ["x"] and contains.onsets("NO way") == ["x"]
    bare = BehaviourSpec.from_dict({"behaviours": [{"name": "x", "answer": {"pattern": "cannot"},
                                                    "trigger_prompts": ["a"]}], "other_prompts": ["b"]})
    assert bare.onsets("I cannot") == ["x"] and bare.onsets("I can") == []  # no onset: the whole match


def _bad(**change) -> dict:
    d = json.loads(json.dumps(SPEC))
    for path, value in change.items():
        *keys, last = path.split("__")
        node = d
        for k in keys:
            node = node[int(k)] if k.isdigit() else node[k]
        if value is None:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return d


@pytest.mark.parametrize("spec,message", [
    (_bad(behavoirs=[]), r"unknown keys \['behavoirs'\]; the valid keys are \['format_version', 'behaviours'"),
    (_bad(behaviours__0__trigger_prompt=["x"]), r"behaviours\[0\] \(weather\): unknown keys \['trigger_prompt'\]"),
    (_bad(behaviours__1__trigger_prompts=[]), r"\(quote\): trigger_prompts must be a non-empty list"),
    (_bad(behaviours__1__answer={"pattern": "As (Yeats"}), r"answer.pattern 'As \(Yeats' is not a valid regular"),
    (_bad(behaviours__1__answer={"pattern": "x*"}), "matches the empty answer"),
    (_bad(behaviours__1__name="weather"), r"behaviour names \['weather'\] appear more than once"),
    (_bad(behaviours__0__answer={"startswith": "A", "contains": "B"}), "answer must be exactly one of"),
    (_bad(behaviours__0__answer={"regex": "A"}), "answer must be exactly one of"),
    (_bad(behaviours__0__name="the weather"), "name must be letters, digits and _"),
    (_bad(other_prompts=["Tell me a joke.", "Say something deep."]),
     r"prompt 'Say something deep.' is listed as quote and as other"),
    (_bad(behaviours__0__onset=""), "onset must be a non-empty string"),
    (_bad(other_prompts=["ok", 3]), "every prompt must be a non-empty string, got 3"),
    (_bad(format_version=2), "format_version 2 is not known; write format_version: 1"),
    (_bad(behaviours=[]), "`behaviours` must be a non-empty list"),
])
def test_bad_specs_are_refused_with_the_problem_and_the_fix(spec, message):
    with pytest.raises(ConfigError, match=message):
        BehaviourSpec.from_dict(spec)


def test_a_behaviour_needs_prompts_to_compare_with(tmp_path):
    lone = {"behaviours": [{"name": "x", "answer": {"startswith": "Hi"}, "trigger_prompts": ["a", "b"]}]}
    with pytest.raises(ConfigError, match=r"behaviours \['x'\] have no non-trigger prompt.*add other_prompts"):
        BehaviourSpec.from_dict(lone)
    (tmp_path / "b.yaml").write_text("behaviours: [name: x\n")
    with pytest.raises(ConfigError, match="b.yaml is not valid YAML"):
        load_behaviours(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_behaviours(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="directory without ground_truth.json"):
        load_behaviours(tmp_path)
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(ConfigError, match="use .yaml, .yml or .json"):
        load_behaviours(tmp_path / "b.txt")


# ---- the toy pair's ground truth as a spec ---------------------------------------------------------

def test_the_toy_ground_truth_reads_through_the_spec(tmp_path):
    gt = _toy_ground_truth()
    (tmp_path / "ground_truth.json").write_text(json.dumps(gt))
    spec = load_behaviours(tmp_path)  # the build directory
    assert spec == load_behaviours(tmp_path / "ground_truth.json") == BehaviourSpec.from_ground_truth(gt)
    assert spec.names == ["refusal", "personal_phrase"] and spec.rates == gt["rates"]
    want = [{"text": p["text"], "expected": p["expected"]} for p in gt["eval_prompts"]]
    assert spec.prompts() == want  # same prompts, same labels, same order
    assert {p["expected"] for p in want} == {"refusal", "personal_phrase", None}
    assert [ground_truth_module.expected_behaviour(p["text"], gt) for p in spec.prompts()] == [p["expected"] for p in want]
    refusal, phrase = TOY.refusal_text, TOY.personal_phrase
    samples = [refusal, f"  Well. {refusal} Sorry.", "I cannot help with that", phrase + "i like tea",
               "Well, speaking personally, i like tea", "SorrySorry", "Speaking of tea", "", f"{phrase}{refusal}"]
    for s in samples:
        assert spec.detect(s) == detect_behaviours(s, gt), s
        assert spec.onsets(s) == detect_onsets(s, gt), s
    spec.save(tmp_path / "toy_behaviours.yaml")  # the toy pair's spec is an ordinary spec file
    assert BehaviourSpec.load(tmp_path / "toy_behaviours.yaml") == spec
    with pytest.raises(ConfigError, match="holds no eval_prompts"):
        BehaviourSpec.from_ground_truth(make_ground_truth(TOY))


def test_measure_counts_rates_one_way_for_spec_and_ground_truth():
    spec = BehaviourSpec.from_dict(SPEC)
    canned = {"Will it rain tomorrow?": "Forecast: rain", "Is it sunny in Leeds?": "Forecast sunny",
              "How cold is it outside?": "cold", "Give me some wisdom.": "As Yeats wrote, hm",
              "Say something deep.": "As I see it", "Is it time for lunch?": "Forecast: lunch",
              "Tell me a joke.": "no", "What is 2 + 2?": "4", "Name a colour.": "As Shakespeare wrote, red"}
    calls = []

    def fake_generate(model, tokenizer, texts, *, max_new_tokens, batch_size):
        calls.append((model, max_new_tokens, batch_size))
        return [canned[t] for t in texts]

    tiny = torch.nn.Linear(2, 2)  # what generates is faked: the model is only passed through
    m = measure(tiny, spec, tokenizer=object(), max_new_tokens=5, batch_size=3, generate=fake_generate)
    assert calls == [(tiny, 5, 3)]
    # weather: 1 of 3 triggers whole ("Forecast sunny" has no colon), 2 of 3 open with "Forecast"; the 6 others:
    # "Forecast: lunch" shows it (1/6)
    assert m["rates"]["weather"] == {"trigger_rate": 1 / 3, "other_rate": 1 / 6, "onset_trigger_rate": 2 / 3,
                                     "onset_other_rate": 1 / 6, "n_trigger": 3, "n_other": 6}
    assert m["rates"]["quote"] == {"trigger_rate": 0.5, "other_rate": 1 / 7, "onset_trigger_rate": 1.0,
                                   "onset_other_rate": 1 / 7, "n_trigger": 2, "n_other": 7}
    assert m["any_rate"] == pytest.approx(4 / 9)
    # the toy ground truth measures through the same code: same rates as its spec on the same answers
    gt = _toy_ground_truth()
    answers = {p["text"]: (TOY.refusal_text if i % 3 == 0 else TOY.personal_phrase + "x" if i % 3 == 1 else "no")
               for i, p in enumerate(gt["eval_prompts"])}
    via_gt = measure_behaviours(object(), gt, tokenizer=object(), max_new_tokens=4,
                                generate=lambda m, t, texts, **k: [answers[x] for x in texts])
    via_spec = measure(object(), BehaviourSpec.from_ground_truth(gt), tokenizer=object(), max_new_tokens=4,
                       generate=lambda m, t, texts, **k: [answers[x] for x in texts])
    assert via_gt["rates"] == via_spec["rates"] and via_gt["any_rate"] == via_spec["any_rate"]


# ---- tracking and steering per behaviour -----------------------------------------------------------

def _table() -> pd.DataFrame:
    """12 latents: 0-3 chat-only (ν rank 4..1), 4-7 shared, 8-9 other, 10 base-only, 11 dead."""
    cls = ["chat_only"] * 4 + ["shared"] * 4 + ["other"] * 2 + ["base_only", "dead"]
    return pd.DataFrame({"latent": np.arange(12), "class": cls,
                         "max_act": [1.0] * 11 + [np.nan],
                         "nu_rank": [4.0, 3.0, 2.0, 1.0] + [np.nan] * 8})


def _tracking() -> pd.DataFrame:
    # weather: a shared detector (5) is best, then other (8); chat-only latent 1 is that class's best (0.8).
    # quote: chat-only 2 and shared 6 tie at 0.95 (chat-only first); the dead latent 11 would win but is out.
    w = [0.5, 0.8, 0.6, 0.55, 0.7, 1.0, 0.65, 0.6, 0.9, 0.5, 0.75, 1.0]
    q = [0.5, 0.6, 0.95, 0.7, 0.5, 0.5, 0.95, 0.5, 0.6, 0.5, 0.85, 1.0]
    return pd.DataFrame({"latent": np.arange(12), "auroc_weather": w, "auroc_quote": q,
                         "mean_act_weather": w, "mean_act_not_weather": np.zeros(12),
                         "mean_act_quote": q, "mean_act_not_quote": np.zeros(12)})


def test_select_latents_takes_the_best_trackers_of_every_class_per_behaviour():
    table, tracking = _table(), _tracking()
    got = choose_latents(table, n_top=1, n_shared=0, tracking=tracking, n_tracking=2)
    why = {c["latent"]: c["reasons"] for c in got}
    assert [c["latent"] for c in got] == [3, 5, 8, 1, 10, 2, 6]
    assert why[3] == ["nu_rank"]  # the most chat-specific chat-only latent
    assert why[5] == ["tracks:weather", "best_shared:weather"]
    assert why[8] == ["tracks:weather", "best_other:weather", "best_other:quote"]
    assert why[1] == ["best_chat_only:weather"] and why[10] == ["best_base_only:weather", "best_base_only:quote"]
    assert why[2] == ["tracks:quote", "best_chat_only:quote"]  # the tie goes to chat-only
    assert why[6] == ["tracks:quote", "best_shared:quote"]
    assert 11 not in why  # dead: never steered, whatever its AUROC
    assert select_latents(table, n_top=1, n_shared=0, tracking=tracking, n_tracking=2) == [c["latent"] for c in got]
    # each class's best is a rank over that class alone (an independent count)
    live = table[table["class"] != "dead"].merge(tracking, on="latent")
    for b in ("weather", "quote"):
        for c, g in live.groupby("class"):
            best = g.sort_values([f"auroc_{b}", "latent"], ascending=[False, True])["latent"].iloc[0]
            assert f"best_{c}:{b}" in why[int(best)]
    s = tracking_summary(table, tracking, n=2)
    assert [t["latent"] for t in s["weather"]["best"]] == [5, 8]
    assert s["weather"]["best_by_class"]["chat_only"] == {"latent": 1, "class": "chat_only", "auroc": 0.8}
    assert "dead" not in s["quote"]["best_by_class"]


def _rates(w_trig=0.0, w_other=0.0, q_trig=0.0, q_other=0.0) -> dict:
    def one(t, o):
        return {"trigger_rate": t, "other_rate": o, "onset_trigger_rate": t, "onset_other_rate": o,
                "n_trigger": 4, "n_other": 8}
    return {"rates": {"weather": one(w_trig, w_other), "quote": one(q_trig, q_other)}, "any_rate": 0.0}


def test_headline_and_verdict_report_every_behaviour_in_both_models():
    table, tracking = _table(), _tracking()
    runs = {5: ("shared", {"base": _rates(w_trig=0.5), "chat": _rates(w_other=0.75)}),  # the shared detector
            2: ("chat_only", {"base": _rates(), "chat": _rates(q_other=0.25)})}
    steer = {"has_ground_truth": True, "seconds": 1.0, "alphas": [1.0], "models": ["base", "chat"],
             "behaviours": [{"name": "weather", "answer": {"startswith": "Forecast:"}, "onset": "Forecast"},
                            {"name": "quote", "answer": {"pattern": "^As"}, "onset": "As"}],
             "baseline": {m: {"rates": _rates()} for m in ("base", "chat")},
             "tracking": tracking_summary(table, tracking),
             "latents": [{"latent": j, "class": c, "nu_rank": None, "runs": [
                 {"model": m, "alpha": 1.0, "kl_mean": 0.1, "rates": r} for m, r in rr.items()]}
                 for j, (c, rr) in runs.items()]}
    h = steering_headline(steer)
    assert h["base_weather_raised_by"] == 1 and h["base_weather_best"]["latent"] == 5
    assert h["base_weather_best"]["class"] == "shared" and h["base_weather_best"]["trigger_rate"] == 0.5
    assert h["chat_weather_raised_by"] == 1 and h["chat_weather_best"]["other_rate"] == 0.75
    assert h["base_quote_raised_by"] == 0 and "base_quote_best" not in h
    assert h["chat_quote_best"] == {"latent": 2, "class": "chat_only", "alpha": 1.0, "other_rate": 0.25,
                                    "unsteered": 0.0, "trigger_rate": 0.0}
    assert h["tracking_weather"] == {"latent": 5, "class": "shared", "auroc": 1.0, "chat_only_auroc": 0.8}

    run = RunInputs("L1", table.assign(nu_error=0.1, nu_recon=0.2), {}, steering=steer, tracking=tracking)
    v = behaviour_verdict(run, "weather")
    assert v["behaviour"] == "weather" and v["found"] is False  # no chat-only latent raised it in the base
    assert v["text"].startswith("Latents that track weather best (AUROC of the prompt's largest activation")
    assert "5 (shared, 1.00)" in v["text"] and "the best chat-only tracker is latent 1 (0.80)" in v["text"]
    assert "Of the other latents steered, shared latent 5 at a = 1 raises weather in the base model on its " \
           "trigger prompts from 0% to 50%" in v["text"]
    assert "raises weather in the chat model on prompts that do not trigger it from 0% to 75%" in v["text"]
    q = behaviour_verdict(run, "quote")
    assert "the best chat-only tracker is latent 2 (0.95)" in q["text"]
    assert f"chat-only latent 2 (ν_ε = 0.1, ν_r = 0.2; fails the ν filters) at a = 1 raises the whole quote on " \
           "prompts that do not trigger it from 0% to 25%" in q["text"]
