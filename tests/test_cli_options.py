"""The command line built from the settings dataclasses (crossdiff_core.cli.options): every field reaches its
command with its default and its comment, and a value given on the command line reaches the run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer.main
from typer.testing import CliRunner

from crossdiff_core.cli import app
from crossdiff_core.cli.analysis import ANALYZE_OPTIONS, CARDS_OPTIONS
from crossdiff_core.cli.evaluation import EVALUATE_OPTIONS, SCOREBOARD_OPTIONS, STEER_OPTIONS
from crossdiff_core.cli.options import Spec, field_comments
from crossdiff_core.cli.training import CROSSCODER_OPTIONS, TRAIN_OPTIONS


@dataclasses.dataclass
class _Base:
    width: int = 3  # the width, in cells
    # the depth: a comment block
    # of two lines
    depth: float = 0.5


@dataclasses.dataclass
class _Child(_Base):
    name: str = dataclasses.field(
        default="x", metadata={"a": 1})  # on the field's last line
    bare: bool = False
    hint: str = "a # inside a string"  # the real comment


def test_field_comments_read_the_source_by_hand():
    assert field_comments(_Child) == {
        "width": "the width, in cells", "depth": "the depth: a comment block of two lines",
        "name": "on the field's last line", "hint": "the real comment"}  # bare has none; inherited ones kept


def test_a_field_without_a_command_line_form_is_refused():
    @dataclasses.dataclass
    class Odd:
        pairs: tuple[float, ...] = (1.0,)  # a sweep

    with pytest.raises(TypeError, match=r"Odd\.pairs.*exclude it"):
        Spec(Odd).parameters()
    assert Spec(Odd, exclude=("pairs",)).parameters() == []


COMMANDS = {"train": (TRAIN_OPTIONS, CROSSCODER_OPTIONS), "analyze": (ANALYZE_OPTIONS,), "cards": (CARDS_OPTIONS,),
            "evaluate": (EVALUATE_OPTIONS,), "steer": (STEER_OPTIONS,), "scoreboard": (SCOREBOARD_OPTIONS,)}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_setting_is_an_option_with_its_default_and_comment(command):
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    for spec in COMMANDS[command]:
        comments = field_comments(spec.cls)
        for f in dataclasses.fields(spec.cls):
            if f.name in spec.exclude:
                continue
            p = params[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert p.default == default, (command, f.name)
            shown = p.help.replace("\\[", "[")  # escaped for rich's markup
            assert not p.required and shown == comments[f.name], (command, f.name)


def test_settings_the_hand_written_options_lacked_reach_the_run(tmp_path):
    from tests.test_trainer import _write_cache

    _write_cache(tmp_path / "cache")
    r = CliRunner().invoke(app, ["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "cc"),
                                 "--kind", "batchtopk", "--dict-size", "24", "--k", "2", "--tokens", "1280",
                                 "--batch-size", "128", "--val-tokens", "256", "--aux-alpha", "0.25", "--aux-k", "5",
                                 "--b-dec-init", "zero", "--threshold-decay", "0.9", "--no-progress"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "cc" / "config.json").read_text())
    assert (cfg["aux_alpha"], cfg["aux_k"], cfg["b_dec_init"], cfg["threshold_decay"]) == (0.25, 5, "zero", 0.9)
    r = CliRunner().invoke(app, ["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "x"),
                                 "--kind", "l1", "--tokens", "1280", "--warmup-frac", "1.5"])
    assert r.exit_code == 2 and "fractions must be in [0, 1]" in " ".join(r.output.split())
