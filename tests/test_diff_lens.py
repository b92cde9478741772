"""The activation-difference lens (crossdiff_core.diff_lens) against hand computations: means of block
outputs from ordinary full forward passes, the model's own final norm and head applied by hand, and block
outputs with and without the steering hook; the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossdiff_core.behaviours import BehaviourSpec
from crossdiff_core.diff_lens import (DiffLensConfig, lens_pair, logit_lens, read_lens_vectors, steering_inputs,
                                      steering_vector, text_rows, token_readings)
from crossdiff_core.diff_means import DiffMeans, mean_differences
from crossdiff_core.errors import ConfigError
from crossdiff_core.generation import render_prompts
from crossdiff_core.models import block_outputs, decoder_layers, load_pair
from crossdiff_core.steering import steering
from tests.test_locate import CONVERSATIONS, N_LAYERS, PLANTED, PROMPTS, planted_pair_dirs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TEXTS = ["the user asked the assistant a question about the weather", "hello world", "to be or not to be",
         "a", "that is the question, and the answer was sunny and warm"]
N_POS = 4


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A base and a chat model that differ in block PLANTED only (their δ is zero before it)."""
    root = tmp_path_factory.mktemp("lens")
    base, chat = planted_pair_dirs(root)
    return base, chat, load_pair(base, chat, layer=0, dtype="float32")


def _block_outputs_by_hand(model, row):
    """Every block's output ``[n_layers, t, d]`` of one unpadded row: ``output_hidden_states[L + 1]`` of a full
    forward, the last block's raw output by a hook (transformers normalises the last hidden state)."""
    got = []
    h = decoder_layers(model)[-1].register_forward_hook(lambda _m, _a, o: got.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            hs = model(torch.tensor([row]), output_hidden_states=True).hidden_states
    finally:
        h.remove()
    return torch.stack([hs[L + 1][0] for L in range(N_LAYERS - 1)] + [got[0][0]]).double()


def _means_by_hand(pair, rows, window):
    """Per slot the mean of h_chat − h_base over the rows that fill it, the all-token means and norms."""
    per_slot = [[] for _ in range(N_POS)]
    base_norms, chat_norms = [], []
    for r in rows:
        hb, hc = _block_outputs_by_hand(pair.base, r), _block_outputs_by_hand(pair.chat, r)
        positions = list(range(1, min(len(r), N_POS + 1))) if window == "first" else \
            [t for t in range(len(r) - N_POS, len(r)) if t >= 1]
        for t in positions:
            slot = t - 1 if window == "first" else t - (len(r) - N_POS)
            per_slot[slot].append(hc[:, t] - hb[:, t])
            base_norms.append(hb[:, t].norm(dim=-1))
            chat_norms.append(hc[:, t].norm(dim=-1))
    every = [x for s in per_slot for x in s]
    return {"delta_per_position": torch.stack([torch.stack(s).mean(0) for s in per_slot], 1),
            "delta": torch.stack(every).mean(0), "base_norm": torch.stack(base_norms).mean(0),
            "chat_norm": torch.stack(chat_norms).mean(0), "count": torch.tensor([len(s) for s in per_slot])}


@pytest.mark.parametrize("source", ["text", "chat"])
def test_mean_difference_matches_full_forwards(planted, source):
    _, _, pair = planted
    if source == "text":
        rows, window = text_rows(pair.tokenizer, TEXTS, N_POS), "first"
        assert rows[3] == [pair.tokenizer.bos_token_id, rows[3][1]]  # "a": one token after BOS
        assert all(len(r) <= N_POS + 1 and r[0] == pair.tokenizer.bos_token_id for r in rows)
    else:
        rows, window = render_prompts(pair.tokenizer, [q["text"] for q in PROMPTS]), "answer_start"
    want = _means_by_hand(pair, rows, window)
    # batches of two rows of unequal length: padding and batching must not change the means
    acc = mean_differences(pair, rows, N_LAYERS, n_positions=N_POS, window=window, batch_size=2)
    got = acc.result()
    assert acc.n_sequences == len(rows) and torch.equal(got["count"], want["count"])
    scale = float(torch.maximum(want["base_norm"], want["chat_norm"]).max())  # float32 forwards, batched or not
    for key in ("delta", "delta_per_position", "base_norm", "chat_norm"):
        assert got[key].dtype == torch.float64
        torch.testing.assert_close(got[key], want[key], atol=1e-6 * scale, rtol=1e-5)
    assert got["delta"].shape == (N_LAYERS, pair.d_model)
    assert got["delta_per_position"].shape == (N_LAYERS, N_POS, pair.d_model)
    # the chat model is the base up to block PLANTED − 1: no difference there, a clear one from PLANTED on
    assert float(got["delta"][:PLANTED].abs().max()) < 1e-6
    assert bool((got["delta"][PLANTED:].norm(dim=-1) > 1e-2).all())
    # two accumulators over halves of the rows, merged, give the same means
    half = len(rows) // 2
    merged = mean_differences(pair, rows[:half], N_LAYERS, n_positions=N_POS, window=window).merge(
        mean_differences(pair, rows[half:], N_LAYERS, n_positions=N_POS, window=window)).result()
    torch.testing.assert_close(merged["delta_per_position"], want["delta_per_position"], atol=1e-6 * scale, rtol=1e-5)


def test_accumulator_checks_and_empty_slots():
    acc = DiffMeans(2, 3, 4)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    acc.update(x, x + 1.0, torch.tensor([0, 0, 1, 1, 0]), n_sequences=2)
    r = acc.result()
    torch.testing.assert_close(r["delta"], torch.ones(2, 4, dtype=torch.float64))
    assert torch.isnan(r["delta_per_position"][:, 2]).all() and r["count"].tolist() == [3, 2, 0]
    torch.testing.assert_close(r["base_norm"], x.double().norm(dim=-1).mean(1))
    # merging two accumulators is one accumulator over both batches
    one, two = DiffMeans(2, 3, 4), DiffMeans(2, 3, 4)
    one.update(x[:, :2], x[:, :2] + 1.0, torch.tensor([0, 0]), n_sequences=1)
    two.update(x[:, 2:], x[:, 2:] + 1.0, torch.tensor([1, 1, 0]), n_sequences=1)
    m = one.merge(two).result()
    assert one.n_sequences == 2
    for key in r:
        torch.testing.assert_close(m[key], r[key], atol=1e-12, rtol=1e-12, equal_nan=True)
    with pytest.raises(ConfigError, match="slots"):
        acc.update(x, x, torch.tensor([0, 0, 1, 1, 3]))
    with pytest.raises(ConfigError, match=r"\[2, N, 4\]"):
        acc.update(x[:1], x[:1], torch.tensor([0] * 5))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_logit_lens_is_the_models_own_norm_and_head(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from tests.test_models import make_pair_dirs

    _, chat_dir, tok = make_pair_dirs(tmp_path, arch)
    model = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32).eval()
    v = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)) * 4
    with torch.no_grad():
        want = model.lm_head(model.model.norm(v))
        cap = getattr(model.config, "final_logit_softcapping", None)
        if arch == "gemma2":
            assert cap  # Gemma 2 soft-caps its logits: the lens must too
            want = cap * torch.tanh(want / cap)
    got = logit_lens(model, v)
    assert got.shape == (3, len(tok)) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    reads = token_readings(got, tok, 5)
    for r, row in zip(reads, want):
        assert [t["id"] for t in r["top"]] == torch.argsort(row, descending=True)[:5].tolist()
        assert [t["id"] for t in r["bottom"]] == torch.argsort(row)[:5].tolist()
        assert r["top"][0]["token"] == tok.decode([r["top"][0]["id"]])
        np.testing.assert_allclose(r["top"][0]["p"], torch.softmax(row, -1).max().item(), rtol=1e-5)


def test_steering_adds_exactly_a_delta_at_block_L(planted):
    _, _, pair = planted
    rows = text_rows(pair.tokenizer, TEXTS, N_POS)
    m = mean_differences(pair, rows, N_LAYERS, n_positions=N_POS).result()
    L, a = PLANTED, 1.5
    r = float(m["chat_norm"][L])
    v = steering_vector(m["delta"][L], r, a)
    assert v.dtype == torch.float32
    np.testing.assert_allclose(float(v.norm()), a * r, rtol=1e-5)
    np.testing.assert_allclose(float(torch.nn.functional.cosine_similarity(v.double(), m["delta"][L], dim=0)), 1.0,
                               rtol=1e-6)
    assert torch.equal(steering_vector(torch.zeros(8), 3.0, 2.0), torch.zeros(8))  # nothing to add
    ids = torch.tensor([render_prompts(pair.tokenizer, ["hello there"])[0]])
    with torch.no_grad():
        before = block_outputs(pair.chat, ids, layers=[L - 1, L])
        with steering(pair.chat, L, v):
            after = block_outputs(pair.chat, ids, layers=[L - 1, L])
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)  # blocks before L untouched
    torch.testing.assert_close(after[1] - before[1], v.expand_as(before[1]), atol=1e-5, rtol=1e-5)


def test_lens_pair_with_ground_truth(planted):
    from crossdiff_core.toy import ToyModelsConfig, make_ground_truth

    _, _, pair = planted
    gt = make_ground_truth(ToyModelsConfig())
    prompts = [{"text": q["text"], "expected": e} for q, e in zip(PROMPTS, ["refusal", "personal_phrase", None,
                                                                              "refusal", None])]
    rows = {"text": text_rows(pair.tokenizer, TEXTS, N_POS),
            "chat": render_prompts(pair.tokenizer, [c[0]["content"] for c in CONVERSATIONS])}
    cfg = DiffLensConfig(n_positions=N_POS, top_k=3, alphas=(0.0, 2.0), max_new_tokens=3, n_examples=2, progress=False)
    out, tensors = lens_pair(pair, rows, PLANTED, cfg, prompts=prompts, ground_truth=gt)
    assert out["layer"] == PLANTED and out["steering_skipped"] is None and set(out["sources"]) == {"text", "chat"}
    for src, block in out["sources"].items():
        assert block["window"] == ("first" if src == "text" else "answer_start")
        assert [r["layer"] for r in block["per_layer"]] == list(range(N_LAYERS))
        for row in block["per_layer"]:
            np.testing.assert_allclose(row["delta_norm"], float(tensors[f"{src}/layer_{row['layer']}"].norm()), rtol=1e-5)
            if row["layer"] < PLANTED:  # δ = 0 exactly: every token ties, no reading
                assert row["delta_norm"] == 0.0 and row["top_tokens"] is None and row["cos_base_mean"] is None
            else:
                assert len(row["top_tokens"]) == len(row["bottom_tokens"]) == 3
        assert [p["position"] for p in block["at_layer"]["positions"]] == list(range(N_POS))
        assert tensors[f"{src}/delta_per_position"].shape == (N_LAYERS, N_POS, pair.d_model)
    st = out["steering"]
    runs = {(r["source"], r["model"], r["alpha"]): r for r in st["runs"]}
    assert set(runs) == {(s, m, a) for s in ("text", "chat") for m in ("base", "chat") for a in (0.0, 2.0)}
    for (s, m, a), r in runs.items():
        np.testing.assert_allclose(r["vector_norm"], a * st["target_norms"][s][m], rtol=1e-5)
        assert set(r["rates"]["rates"]) == {"refusal", "personal_phrase"}
        if a == 0.0:  # a = 0 is the unsteered model
            assert r["kl_mean"] == 0.0 and r["examples"] == st["baseline"][m]["examples"]
            assert r["rates"] == st["baseline"][m]["rates"]
        else:
            assert r["kl_mean"] > 0 and r["kl_last"] > 0
    np.testing.assert_allclose(st["target_norms"]["text"]["chat"], float(tensors["text/chat_norm"][PLANTED]), rtol=1e-6)
    # without prompts the steering is skipped, and says why
    out2, _ = lens_pair(pair, {"text": rows["text"]}, 0, cfg)
    assert out2["steering"] is None and "no steering prompts" in out2["steering_skipped"]


def test_steering_inputs_reads_a_behaviour_spec_with_its_rules(tmp_path):
    spec = tmp_path / "behaviours.yaml"
    spec.write_text("behaviours:\n  - name: weather\n    answer: {startswith: 'Forecast:'}\n"
                    "    trigger_prompts: ['Will it rain?']\nother_prompts: [Tell me a joke.]\n")
    prompts, got = steering_inputs(None, spec)  # a spec: its prompts, and its rules for the rates
    assert isinstance(got, BehaviourSpec) and got.names == ["weather"]
    assert prompts == [{"text": "Will it rain?", "expected": "weather"}, {"text": "Tell me a joke.", "expected": None}]
    listed = tmp_path / "p.txt"
    listed.write_text("Hi there\n")
    assert steering_inputs(listed, spec) == ([{"text": "Hi there", "expected": None}], got)
    assert steering_inputs(None, listed) == ([{"text": "Hi there", "expected": None}], None)  # prompts, no rates
    assert steering_inputs(None, None) == (None, None)


def test_config_is_strict():
    with pytest.raises(ConfigError, match="n_position"):
        DiffLensConfig.from_dict({"n_position": 3})
    with pytest.raises(ConfigError, match="chat_window"):
        DiffLensConfig(chat_window="last")
    with pytest.raises(ConfigError, match="n_positions"):
        DiffLensConfig(n_positions=0)
    with pytest.raises(ConfigError, match="models"):
        DiffLensConfig(models=("base", "tuned"))
    assert DiffLensConfig.from_dict({"alphas": [1, 2]}).alphas == (1.0, 2.0)


def test_cli_lens(planted, tmp_path):
    from typer.testing import CliRunner

    from crossdiff_core.cli import app
    from tests.test_models import make_pair_dirs

    base, chat, _ = planted
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(q) + "\n" for q in PROMPTS[:3]))
    out = tmp_path / "lens" / "lens.json"
    common = ["lens", "--base", base, "--chat", chat, "--text", str(tmp_path / "text.jsonl"), "--chats",
              str(tmp_path / "chats.jsonl"), "--no-progress", "--top-k", "4", "--n-positions", "3"]
    r = CliRunner().invoke(app, common + ["--prompts", str(tmp_path / "prompts.jsonl"), "--alphas", "1",
                                          "--max-new-tokens", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["layer"] == N_LAYERS // 2 and d["layer_from"] == "the middle block" and d["vectors"] == "lens.safetensors"
    assert set(d["sources"]) == {"text", "chat"} and d["sources"]["text"]["n_sequences"] == len(TEXTS)
    assert len(d["steering"]["runs"]) == 4 and d["steering"]["n_prompts"] == 3
    vec = read_lens_vectors(out.with_suffix(".safetensors"))
    assert set(d["vector_keys"]) == set(vec) and vec["chat/layer_3"].shape == (32,)
    assert vec["text/delta_per_position"].shape == (N_LAYERS, 3, 32)
    for src in ("text", "chat"):
        for row in d["sources"][src]["per_layer"]:
            np.testing.assert_allclose(row["delta_norm"], float(vec[f"{src}/layer_{row['layer']}"].norm()), rtol=1e-5)
            assert len(row["top_tokens"] or []) == (4 if row["layer"] >= PLANTED else 0)
    assert torch.equal(read_lens_vectors(out)["text/delta"], vec["text/delta"])  # the JSON's path works too
    # the layer from a locate JSON; no prompts: no steering
    (tmp_path / "locate.json").write_text(json.dumps({"recommended_layer": PLANTED}))
    r = CliRunner().invoke(app, common + ["--locate", str(tmp_path / "locate.json"), "--out", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "b.json").read_text())
    assert d["layer"] == PLANTED and "locate.json" in d["layer_from"] and d["steering"] is None
    # bad input: one clear line, exit 2, no traceback, nothing written
    bad = tmp_path / "x.json"
    r = CliRunner().invoke(app, ["lens", "--base", base, "--chat", chat, "--out", str(bad)])
    assert r.exit_code == 2 and "no data for the mean difference" in r.output and "Traceback" not in r.output
    wide, _, _ = make_pair_dirs(tmp_path / "wide", hidden=48)
    r = CliRunner().invoke(app, ["lens", "--base", wide, "--chat", chat, "--text", str(tmp_path / "text.jsonl"),
                                 "--out", str(bad)])
    assert r.exit_code == 2 and "hidden sizes differ" in r.output
    r = CliRunner().invoke(app, common + ["--layer", "9", "--out", str(bad)])
    assert r.exit_code == 2 and "layer 9 does not exist" in r.output
    r = CliRunner().invoke(app, common + ["--alphas", "1,x", "--out", str(bad)])
    assert r.exit_code == 2 and "--alphas" in r.output
    assert not bad.exists() and not bad.with_suffix(".safetensors").exists()
