"""The scoreboard: every diffing method (each crosscoder kind and ranking, the activation-difference lens, a
random control) scored the same way against the known behaviours."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from .io import write_json
from .products import LENS_FILE, SCOREBOARD


@task(name="scoreboard", cache_policy=NONE)
def scoreboard_task(crosscoders: dict[str, tuple[str, str]], out_dir: str, settings: dict, evaluate: dict,
                    behaviours: str | None, text: list, text_column: str = "text") -> dict:
    """:func:`crossdiff_core.scoreboard.build_scoreboard` -> ``out_dir`` (scoreboard.json, the lens's lens.json and
    lens.safetensors). ``settings``: params.yaml's ``scoreboard`` section; ``evaluate``: its ``evaluate`` section
    (the held-out conversations); ``behaviours``: the pair's spec; ``text``: plain-text sources for the lens
    (their ``text_column``).
    Returns the board (its per-method numbers are the DVC metric)."""
    from crossdiff_core.diff_lens import write_lens
    from crossdiff_core.kl_eval import EvaluateConfig
    from crossdiff_core.scoreboard import ScoreboardConfig, build_scoreboard

    out = Path(out_dir)
    board, lens, tensors = build_scoreboard(crosscoders, behaviours=behaviours, evaluate=EvaluateConfig.from_dict(evaluate),
                                            text=text, text_column=text_column,
                                            cfg=ScoreboardConfig.from_dict(settings))
    if lens:
        write_lens(lens, tensors, out / LENS_FILE)
    write_json(board, out / SCOREBOARD)
    return board
