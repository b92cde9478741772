"""Settings: params.yaml against the dataclasses (each default stated once), strict reading, dvc.yaml's
params lists against the result-changing fields, the CLI's defaults, and tolerant config.json loading."""

import dataclasses
import json
from pathlib import Path

import pytest
import typer.main
import yaml

from crossdiff_core.cli import app
from crossdiff_core.config import defaults, from_dict, nested, result_fields, result_settings
from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig, CrossCoderSettings
from crossdiff_core.crosscoder_config import DEFAULT_KINDS
from crossdiff_core.errors import ConfigError
from crossdiff_core.trainer import TrainConfig
from flows.common import SECTION_NAMES, load_params, section
from flows.sections import SECTIONS, read_all

REPO = Path(__file__).resolve().parents[1]

# params.yaml keys that deliberately differ from their dataclass's default (the demo's profile); every
# other key of params.yaml must equal its default
PROFILE = {
    "data.text": "the files the models stage exports; the library has no default data",
    "data.chats": "the files the models stage exports",
    "data.n_tokens": "the demo caches 400k tokens; the library default is all the data",
    "data.max_length": "the toy pair's context is 256 tokens; the library default is 1024",
    "evaluate.chats": "the held-out file the models stage exports",
    "locate.chats": "the held-out file the models stage exports",
    "locate.max_length": "the toy pair's context; the library default is 1024",
    "evaluate.max_length": "the toy pair's context; the library default is 1024",
    "report.cards.max_chat_only": "the demo's report shows at most 64 chat-only cards; the library default is all",
    "steer.alphas": "the demo sweeps four of the library's six coefficients (make demo's 15 minutes)",
}
# settings a stage reads from another stage's section (dvc.yaml lists them with the stage)
BORROWED = {"steer": {"evaluate.chats", "evaluate.messages_column"},
            # the scoreboard's KL gap and lens prompts are the held-out conversations; its lens text is the cached text
            "scoreboard": {"train.kinds", "evaluate.chats", "evaluate.messages_column", "evaluate.split",
                           "evaluate.tokens", "evaluate.max_length", "evaluate.seed", "data.text"}}
# fields the library and the CLI take but the pipeline does not: it reads the behaviour spec from pair.json
# (models.behaviours, stated once), so params.yaml leaves them out and dvc.yaml tracks the models stage instead
FROM_PAIR = {"locate": {"locate.behaviours"}, "steer": {"steer.behaviours"}}
# dvc.yaml stage -> the params.yaml section its config dataclass reads
STAGE_SECTION = {"toy_models": "models", "locate": "locate", "cache": "cache", "train": "train", "analyze": "analyze",
                 "evaluate": "evaluate", "steer": "steer", "scoreboard": "scoreboard", "report": "report"}


def _yaml(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def _leaves(d: dict, prefix: str = "") -> dict:
    """``{"a.b": value}`` for a nested mapping (an empty mapping is no leaf)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def _all_fields(cls: type, prefix: str = "") -> set[str]:
    sub = nested(cls)
    out = set()
    for f in dataclasses.fields(cls):
        out |= _all_fields(sub[f.name], f"{prefix}{f.name}.") if f.name in sub else {prefix + f.name}
    return out


def _norm(v):
    return json.loads(json.dumps(v))  # tuples read as the lists YAML has


def test_params_yaml_holds_the_dataclass_defaults():
    params = _yaml("params.yaml")
    assert tuple(SECTIONS) == SECTION_NAMES == tuple(k for k in params if k != "params_file")
    for name, cls in SECTIONS.items():
        from_dict(cls, params[name], section=name)  # every key is a field (strict)
        want = _leaves(_norm(defaults(cls)), f"{name}.")
        for key, value in _leaves(params[name], f"{name}.").items():
            if key in PROFILE:
                assert _norm(value) != want.get(key), f"{key} equals its default now: drop it from PROFILE"
            else:
                assert _norm(value) == want[key], f"{key}: params.yaml has {value!r}, the dataclass {want[key]!r}"
    for key in PROFILE:
        section, _, rest = key.partition(".")
        assert rest in _leaves(params[section]), f"PROFILE names {key}, which params.yaml lacks"
    for name, keys in FROM_PAIR.items():  # stated once, in models: a stage's own copy would be ignored
        again = keys & set(_leaves(params[name], f"{name}."))
        assert not again, f"params.yaml states {again} again: use models.behaviours"


def test_paper_profile_is_read_strictly_too():
    paper = _yaml("params-paper.yaml")
    for name, cls in SECTIONS.items():
        from_dict(cls, paper[name], section=name)
    assert from_dict(TrainConfig, paper["train"]).crosscoder.dict_size == 73_728


@pytest.mark.parametrize("section,key,valid", [("analyze", "covrage", "coverage"), ("train", "kk", "tokens"),
                                               ("cache", "batchsize", "batch_size"), ("steer", "alpha", "alphas")])
def test_an_unknown_key_is_an_error_naming_the_valid_ones(section, key, valid):
    with pytest.raises(ConfigError, match=rf"unknown {section} settings \['{key}'\].*'{valid}'"):
        from_dict(SECTIONS[section], {key: 1}, section=section)


def test_nested_sections_are_read_strictly_and_become_dataclasses():
    tc = TrainConfig.from_dict({"crosscoder": {"k": 5}, "lr": 0.01})
    assert isinstance(tc.crosscoder, CrossCoderSettings) and tc.crosscoder.k == 5 and tc.crosscoder.dict_size == 1024
    with pytest.raises(ConfigError, match=r"unknown train\.crosscoder settings \['dictsize'\].*'dict_size'"):
        TrainConfig.from_dict({"crosscoder": {"dictsize": 8}})
    with pytest.raises(ConfigError, match="report.cards must be a mapping"):
        from_dict(SECTIONS["report"], {"cards": 3}, section="report")


def test_a_misspelt_setting_or_section_is_refused(tmp_path, monkeypatch):
    from crossdiff_core.analysis import AnalysisConfig

    monkeypatch.chdir(tmp_path)
    base = _yaml("params.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(dict(base, analyze=dict(base["analyze"], covrage=0.9))))
    p = load_params("params.yaml")  # a stage reads only its own sections strictly ...
    with pytest.raises(ConfigError, match=r"unknown analyze settings \['covrage'\]"):
        section(p, "analyze", AnalysisConfig)  # ... as the analyze stage does
    with pytest.raises(ConfigError, match=r"unknown analyze settings \['covrage'\]"):
        read_all(p)  # the whole pipeline reads every section before its first stage
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(dict(base, paths=dict(base["paths"], cahce="x"))))
    with pytest.raises(ConfigError, match=r"unknown paths settings \['cahce'\]"):
        load_params("params.yaml")  # what every stage reads
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(dict(base, trian={})))
    with pytest.raises(ConfigError, match=r"unknown sections \['trian'\]"):
        load_params("params.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({k: v for k, v in base.items() if k != "steer"}))
    with pytest.raises(ConfigError, match=r"lacks the sections \['steer'\]"):
        load_params("params.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(dict(base, params_file="nowhere.yaml")))
    with pytest.raises(ConfigError, match="nowhere.yaml, which does not exist"):
        load_params("params.yaml")


def test_read_all_gives_every_section_as_its_dataclass():
    got = read_all(load_params(str(REPO / "params.yaml")))
    assert list(got) == list(SECTIONS) and all(isinstance(got[n], cls) for n, cls in SECTIONS.items())
    assert got["train"].kinds == tuple(TrainConfig().kinds)


def _dvc_params(stage: dict, item: str | None) -> set[str]:
    out = set()
    for entry in stage["params"]:
        for name in next(iter(entry.values())):
            out.add(item if name == "${item}" else name)
    return out


def _expand(names: set[str]) -> set[str]:
    """A whole section named in dvc.yaml stands for all its fields, each of which must change the result."""
    out = set()
    for name in names:
        if name in SECTIONS:
            cls = SECTIONS[name]
            assert _all_fields(cls) == set(result_fields(cls)), f"dvc.yaml lists all of {name}, neutral fields too"
            out |= {f"{name}.{f}" for f in _all_fields(cls)}
        else:
            out.add(name)
    return out


def test_dvc_params_are_the_result_changing_settings():
    dvc = _yaml("dvc.yaml")
    knobs = dvc["vars"][0]["kinds"]  # the kinds the pipeline trains (shared and dfc: `crossdiff train` only)
    by_kind = {f.metadata["kind"]: f"train.crosscoder.{f.name}" for f in dataclasses.fields(CrossCoderSettings)
               if f.metadata.get("kind") in DEFAULT_KINDS}
    assert knobs == by_kind and set(knobs) == set(DEFAULT_KINDS)
    for stage, section in STAGE_SECTION.items():
        spec = dvc["stages"][stage]
        want = ({f"{section}.{f}" for f in result_fields(SECTIONS[section])} - FROM_PAIR.get(stage, set())
                | BORROWED.get(stage, set()))
        if stage == "cache":
            want |= {f"data.{f}" for f in result_fields(SECTIONS["data"])}
        for kind in (DEFAULT_KINDS if "foreach" in spec else [None]):
            got = _expand(_dvc_params(spec["do"] if kind else spec, knobs.get(kind)))
            own = want - {k for other, k in knobs.items() if other != kind} if kind else want
            assert got == own, f"{stage}@{kind}: dvc.yaml lacks {sorted(own - got)}, has extra {sorted(got - own)}"


def test_result_settings_leave_out_the_neutral_fields():
    tc = TrainConfig(val_every=7, device="meta", progress=False, nproc=3)
    r = result_settings(TrainConfig, tc)
    assert r == result_settings(TrainConfig, TrainConfig())  # neutral settings do not change the result
    assert r["crosscoder"]["k"] == 32 and "val_every" not in r and "checkpoint_every" not in r
    flat = {"lr": 0.1, "val_every": 3}  # an older checkpoint's train_config: what it has, minus the neutral
    assert result_settings(TrainConfig, flat) == {"lr": 0.1}


def test_a_kind_keeps_only_its_own_knob():
    s = CrossCoderSettings(dict_size=64, k=4, l1_coeff=0.3, threshold_decay=0.99)
    l1, btk = s.config("l1", 16), s.config("batchtopk", 16, training_tokens=10)
    assert (l1.k, l1.l1_coeff, l1.threshold_decay, l1.aux_k) == (None, 0.3, 0.99, 8)
    assert (btk.k, btk.l1_coeff, btk.training_tokens) == (4, 0.0, 10)
    with pytest.raises(ConfigError, match="unknown crosscoder kind"):
        s.for_kind("topk")


def test_crosscoder_config_json_with_unknown_keys_still_loads(tmp_path):
    """config.json is an interface other tools write: keys this version does not know are ignored on load."""
    CrossCoder(CrossCoderConfig(kind="l1", d_model=6, dict_size=10, l1_coeff=0.5)).save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"extra": {"note": "x"}, "written_by": "other-tool"}))
    got = CrossCoder.load(tmp_path).cfg
    assert (got.kind, got.d_model, got.dict_size, got.l1_coeff) == ("l1", 6, 10, 0.5)


# (command, {option: field}) -> the dataclass defaults the option must show
_RENAMED = {"cache": {"tokens": "n_tokens", "dtype": "model_dtype", "cache_dtype": "dtype"}}


def _cli_defaults() -> dict:
    from crossdiff_core import cli

    return {"train": cli.CROSSCODER | cli.TRAIN, "analyze": cli.ANALYZE, "cache": cli.DATA | cli.CACHE,
            "evaluate": cli.EVALUATE, "steer": cli.STEER, "cards": cli.CARDS}


def test_cli_options_default_to_the_dataclasses():
    group = typer.main.get_command(app)
    checked = 0
    for command, want in _cli_defaults().items():
        for p in group.commands[command].params:
            name = _RENAMED.get(command, {}).get(p.name, p.name)
            if name not in want or p.required or (p.multiple and p.default is None and not want[name]):
                continue  # a repeatable option's None is its dataclass's empty list
            value = p.default
            if command == "steer" and name == "alphas":
                value = tuple(float(a) for a in value.split(","))
            assert _norm(value) == _norm(want[name]), f"crossdiff {command} --{p.name}: {value!r} != {want[name]!r}"
            checked += 1
    assert checked >= 50


def test_the_behaviour_spec_is_stated_once_in_models():
    from flows.toy_models import ModelsConfig
    from tasks.steering import behaviours_for

    organism = from_dict(ModelsConfig, _yaml("params-smollm2.yaml")["models"], section="models")
    assert organism.behaviours == "runs/smollm2/behaviours.yaml" and ModelsConfig().behaviours is None
    for name in ("params-smollm2.yaml", "params-paper.yaml"):
        assert "behaviours" not in _yaml(name)["locate"] and "behaviours" not in _yaml(name)["steer"]
    # the stages read pair.json: its recorded spec, else (a pair.json from before) the toy ground truth
    assert behaviours_for({"behaviours": "b.yaml", "ground_truth": "gt.json"}) == "b.yaml"
    assert behaviours_for({"ground_truth": "gt.json"}) == "gt.json"
    assert behaviours_for({"ground_truth": None, "behaviours": None}) is None
