"""How a stage opens an earlier stage's products (crossdiff_core.runs) and the stages' headline numbers
(crossdiff_core.headlines)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.errors import CacheError, ConfigError, CrossdiffError, ModelMismatchError
from crossdiff_core.headlines import analysis_headline, kl_headline
from crossdiff_core.runs import (LATENT_COLUMNS, cache_manifest, default_summary_path, pair_for, read_latents,
                                 read_stage_json, training_manifest, write_latents)


def _table(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    t = pd.DataFrame({c: rng.random(n) for c in LATENT_COLUMNS})
    t["latent"] = np.arange(n)
    t["class"] = ["chat_only", "shared"] * (n // 2)
    return t


def _cc(cache: str | None) -> CrossCoder:
    return CrossCoder(CrossCoderConfig(kind="l1", d_model=4, dict_size=6, init_norm=0.3, cache=cache), seed=0)


def test_latents_table_round_trip_and_checks(tmp_path):
    t = _table(6)
    path = write_latents(t.iloc[:, ::-1], tmp_path / "a" / "latents.parquet", metadata={"run": 1})
    back = read_latents(path, _cc(None))
    pd.testing.assert_frame_equal(back, t[list(LATENT_COLUMNS)], check_dtype=False)  # column order fixed by the format
    assert json.loads(pq.read_schema(path).metadata[b"crossdiff"]) == {"run": 1}
    with pytest.raises(ConfigError, match="crossdiff analyze"):
        read_latents(tmp_path / "missing.parquet")
    t.drop(columns=["nu_rank"]).to_parquet(tmp_path / "short.parquet")
    with pytest.raises(ConfigError, match=r"lacks the columns \['nu_rank'\]"):
        read_latents(tmp_path / "short.parquet")
    t.assign(freq=t["freq"].astype(str)).to_parquet(tmp_path / "typed.parquet")
    with pytest.raises(ConfigError, match="freq is large_string, not number"):
        read_latents(tmp_path / "typed.parquet")
    t.assign(**{"class": ["chat_only", "typo"] * 3}).to_parquet(tmp_path / "labels.parquet")
    with pytest.raises(ConfigError, match=r"class labels \['typo'\]"):
        read_latents(tmp_path / "labels.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match="not a readable parquet file"):
        read_latents(tmp_path / "garbage.parquet")
    write_latents(_table(4), tmp_path / "small.parquet")
    with pytest.raises(ModelMismatchError, match="describes 4 latents, the crosscoder has 6"):
        read_latents(tmp_path / "small.parquet", _cc(None))


def test_latents_of_another_crosscoder_are_refused(tmp_path):
    """latents.parquet records the weights sha256 of its crosscoder; another crosscoder's table is refused
    (both sides named) unless allowed; a table without the record (another tool) is accepted."""
    cc = _cc(None)
    cc.save(tmp_path / "cc")
    mine = CrossCoder.load(tmp_path / "cc")
    assert mine.weights_sha256 == hashlib.sha256((tmp_path / "cc/model.safetensors").read_bytes()).hexdigest()
    write_latents(_table(6), tmp_path / "own.parquet", metadata={"crosscoder": {"path": "x", "weights_sha256": mine.weights_sha256}})
    write_latents(_table(6), tmp_path / "other.parquet", metadata={"crosscoder": {"path": "/runs/other", "weights_sha256": "ab" * 32}})
    write_latents(_table(6), tmp_path / "foreign.parquet")
    assert len(read_latents(tmp_path / "own.parquet", mine)) == 6 and len(read_latents(tmp_path / "foreign.parquet", mine)) == 6
    with pytest.raises(ModelMismatchError, match=rf"crosscoder /runs/other \(weights sha256 abababababab...\).*"
                                                 rf"{tmp_path / 'cc'} \(weights sha256 {mine.weights_sha256[:12]}"):
        read_latents(tmp_path / "other.parquet", mine)
    assert len(read_latents(tmp_path / "other.parquet", mine, allow_mismatch=True)) == 6


def test_summary_next_to_its_table(tmp_path):
    assert default_summary_path(tmp_path / "x" / "latents.parquet") == tmp_path / "x" / "latents.summary.json"
    (tmp_path / "s.json").write_text('{"dead": 3}')
    assert read_stage_json(tmp_path / "s.json") == {"dead": 3}
    with pytest.raises(CrossdiffError, match="run the stage that writes it"):
        read_stage_json(tmp_path / "none.json")
    with pytest.raises(CrossdiffError, match=r"lacks the keys \['classes'\]"):
        read_stage_json(tmp_path / "s.json", required=("classes",))
    (tmp_path / "l.json").write_text("[1]")
    with pytest.raises(CrossdiffError, match="holds a JSON list"):
        read_stage_json(tmp_path / "l.json")
    (tmp_path / "t.json").write_text('{"dead": ')
    with pytest.raises(CrossdiffError, match="not readable JSON"):
        read_stage_json(tmp_path / "t.json")


def test_manifests(tmp_path):
    raw = json.dumps({"models": {"base": "b", "chat": "c"}, "layer": 1}).encode()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_bytes(raw)
    m, sha = cache_manifest(tmp_path / "cache")
    assert m == json.loads(raw) and sha == hashlib.sha256(raw).hexdigest()
    with pytest.raises(CacheError, match="crossdiff cache"):
        cache_manifest(tmp_path)
    cc = _cc(str(tmp_path / "cache"))
    assert training_manifest(cc) == m and training_manifest(cc.cfg) == m
    assert training_manifest(_cc(None)) is None
    assert training_manifest(_cc(str(tmp_path / "gone"))) is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    assert training_manifest(_cc(str(tmp_path / "bad"))) is None
    # a manifest whose hash is not the one the crosscoder recorded is no record of its training (rebuilt since)
    cc.cfg.cache_manifest_hash = sha
    assert training_manifest(cc) == m
    cc.cfg.cache_manifest_hash = "0" * 64
    assert training_manifest(cc) is None
    with pytest.raises(ModelMismatchError, match="was rebuilt since.*--allow-mismatch"):
        pair_for(cc)


def test_pair_for_refuses_before_loading_models(tmp_path):
    with pytest.raises(ConfigError, match="pass --base, --chat and --layer"):
        pair_for(_cc(None))
    (tmp_path / "manifest.json").write_text(json.dumps({"models": {"base": "b", "chat": "c"}, "layer": 1}))
    with pytest.raises(ModelMismatchError, match="trained on layer 1 but layer 2"):
        pair_for(_cc(str(tmp_path)), layer=2)


def test_headlines():
    summary = {"classes": {"chat_only": 2}, "dead": 1, "decoupling": {"n_pairs": 4},
               "filters": {k: {"survivors": i} for i, k in enumerate(("fixed", "data_driven", "both"))},
               "chat_only": {"nu_error_median": 0.1, "nu_recon_median": 0.2}}
    assert analysis_headline(summary) == {"classes": {"chat_only": 2}, "dead": 1, "decoupling_pairs": 4,
                                          "chat_only_survivors": {"fixed": 0, "data_driven": 1, "both": 2},
                                          "nu_error_median": 0.1, "nu_recon_median": 0.2}
    kl = {"groups": {"random": {"gap_closed_mean": {"first9": 0.3}}},
          "sets": [{"name": "random_0", "group": "random", "gap_closed": {"first9": 0.2}},
                   {"name": "chat_only", "group": None, "gap_closed": {"first9": 0.5, "template": 0.1}}]}
    assert kl_headline(kl) == {"gap_closed_mean.random": {"first9": 0.3}, "gap_closed.chat_only.first9": 0.5,
                               "gap_closed.chat_only.template": 0.1}
