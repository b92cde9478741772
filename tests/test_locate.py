"""Where the change lives (crossdiff_core.locate) on a pair whose difference is planted in one known block,
against independent full forward passes with a patching hook."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from crossdiff_core.data import tokenize_chat
from crossdiff_core.errors import ConfigError
from crossdiff_core.locate import LocateConfig, behaviour_prompts, layer_kl, prompt_kl, recommend_layer, sweep_pair
from crossdiff_core.models import decoder_layers, load_pair
from tests.test_kl_eval import CONVERSATIONS  # the same three conversations as the KL-gap tests
from tests.test_models import build_tokenizer, save_model, tiny_config

N_LAYERS, PLANTED = 5, 3  # the middle block (2) is what a pair without a difference gets
PROMPTS = [{"text": "tell me about the weather", "expected": "weather"},
           {"text": "is the weather sunny?", "expected": "weather"},
           {"text": "who wrote to be or not to be", "expected": "quote"},
           {"text": "hello", "expected": None},
           {"text": "a small question about a tiny corpus", "expected": None}]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def planted_pair_dirs(root, arch: str = "llama", *, planted: int = PLANTED):
    """A random base and a chat model that is the base with block ``planted``'s weights perturbed."""
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    base = save_model(root / f"{arch}-base", tiny_config(arch, len(tok), layers=N_LAYERS), tok, 1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in decoder_layers(model)[planted].parameters():
            if p.dim() > 1:
                p.add_(0.4 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / f"{arch}-chat")
    tok.save_pretrained(root / f"{arch}-chat")
    return base, str(root / f"{arch}-chat")


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def planted(request, tmp_path_factory):
    base, chat = planted_pair_dirs(tmp_path_factory.mktemp(request.param), request.param)
    pair = load_pair(base, chat, layer=0, dtype="float32")
    return pair, [tokenize_chat(pair.tokenizer, c) for c in CONVERSATIONS]


def _patched_logp(pair, ids, layer):
    """Log-probs ``[t, V]`` of a full forward of the chat model on ``ids [1, t]`` with a hook that replaces
    block ``layer``'s output by the base's (``output_hidden_states[layer + 1]``; the last block's raw output
    by a hook on the base, since transformers normalises the last hidden state), BOS kept."""
    with torch.no_grad():
        if layer < N_LAYERS - 1:
            h_base = pair.base(ids, output_hidden_states=True).hidden_states[layer + 1]
        else:
            got = []
            hb = decoder_layers(pair.base)[layer].register_forward_hook(
                lambda _m, _a, o: got.append(o[0] if isinstance(o, tuple) else o))
            try:
                pair.base(ids)
            finally:
                hb.remove()
            h_base = got[0]

    def hook(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        new = h_base.clone()
        new[:, 0] = h[:, 0]  # BOS keeps the chat activation
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    handle = decoder_layers(pair.chat)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return torch.log_softmax(pair.chat(ids).logits[0], -1)
    finally:
        handle.remove()


def _independent_layer_kl(pair, seqs):
    """``[n_layers, 3]``: per conversation alone (no padding), KL by torch's kl_div, groups by hand."""
    sums, counts = np.zeros((N_LAYERS, 3)), np.zeros(3)
    for s in seqs:
        ids = torch.as_tensor(s.token_ids)[None]
        with torch.no_grad():
            logp_chat = torch.log_softmax(pair.chat(ids).logits[0], -1)
        member, k = [], 0
        for t in range(len(s.token_ids)):
            k = k + 1 if (s.is_assistant[t] and t > 0 and s.is_assistant[t - 1]) else (1 if s.is_assistant[t] else 0)
            member.append([s.cached[t] and s.is_assistant[t] and k <= 9, s.cached[t] and s.is_assistant[t],
                           s.cached[t] and s.is_template[t]])
        member = np.array(member, dtype=bool)  # [t, 3]
        counts += member.sum(0)
        for L in range(N_LAYERS):
            logp = _patched_logp(pair, ids, L)
            kl = torch.nn.functional.kl_div(logp, logp_chat, log_target=True, reduction="none").sum(-1).numpy()
            sums[L] += kl @ member
    return sums / counts


def test_layer_kl_matches_hooked_forward_and_is_zero_before_the_planted_block(planted):
    pair, seqs = planted
    # batches of two conversations: padding and batching must not change the sums
    kl, n_tok = layer_kl(pair, seqs, LocateConfig(batch_size=2, progress=False))
    ref = _independent_layer_kl(pair, seqs)
    assert kl.shape == (N_LAYERS, 3) and n_tok.sum() > 0
    np.testing.assert_allclose(kl, ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(kl[:PLANTED], 0.0, atol=1e-7)  # blocks 0..b-1 are the base's own
    assert np.all(kl[PLANTED:] > 1e-2)


def test_prompt_kl_matches_hooked_forward(planted):
    pair, _ = planted
    r = prompt_kl(pair, PROMPTS, LocateConfig(prompt_batch_size=2, progress=False))
    from crossdiff_core.generation import render_prompts

    for i, row in enumerate(render_prompts(pair.tokenizer, [q["text"] for q in PROMPTS])):
        ids = torch.tensor([row])
        with torch.no_grad():
            logp_chat = torch.log_softmax(pair.chat(ids).logits[0, -1], -1)
        top = int(logp_chat.argmax())
        assert r["top"][i] == top
        np.testing.assert_allclose(r["p_chat"][i], logp_chat.exp()[top].item(), rtol=1e-5)
        for L in range(N_LAYERS):
            logp = _patched_logp(pair, ids, L)[-1]
            kl = torch.nn.functional.kl_div(logp, logp_chat, log_target=True, reduction="sum").item()
            np.testing.assert_allclose(r["kl"][L, i], kl, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(r["p"][L, i], logp.exp()[top].item(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(r["kl"][:PLANTED], 0.0, atol=1e-7)
    np.testing.assert_allclose(r["p"][:PLANTED], np.broadcast_to(r["p_chat"], (PLANTED, len(PROMPTS))), atol=1e-6)


def test_sweep_recommends_the_planted_block(planted):
    pair, seqs = planted
    d = sweep_pair(pair, seqs, PROMPTS, LocateConfig(progress=False))
    assert d["recommended_layer"] == PLANTED and [r["layer"] for r in d["per_layer"]] == list(range(N_LAYERS))
    assert d["recommended_by"] in ("p_drop_trigger", "kl_first_token_trigger")  # the behaviour measurement decides
    row = d["per_layer"][PLANTED]
    for key in ("kl_first9", "kl_response", "kl_template", "kl_first_token_trigger", "kl_first_token_other",
                "p_first_token_trigger"):
        assert isinstance(row[key], float), key
    assert set(row["by_behaviour"]) == {"weather", "quote"}
    assert d["n_tokens"]["trigger_prompts"] == 3 and d["n_tokens"]["other_prompts"] == 2
    assert d["behaviour"]["by_behaviour"]["weather"]["n_prompts"] == 2
    assert {v["layer"] for v in d["recommended_by_behaviour"].values()} == {PLANTED}
    # without behaviour prompts the chat data decides, with the same answer
    d2 = sweep_pair(pair, seqs, None, LocateConfig(progress=False))
    assert d2["recommended_layer"] == PLANTED and d2["recommended_by"] == "kl_first9" and d2["behaviour"] is None


def test_recommend_rule():
    n = 6
    kl = [0.0, 1e-9, 0.2, 0.6, 1.0, 9.0]  # the last block's huge value is left out
    r = recommend_layer([("kl_first9", kl, 1e-3)], n)
    assert r["layer"] == 3 and r["score"] == "kl_first9" and "blocks 5..5 left out" in r["rule"]
    assert recommend_layer([("kl_first9", kl, 1e-3)], n, exclude_last=0)["layer"] == 5
    assert recommend_layer([("kl_first9", kl, 1e-3)], n, fraction=0.2)["layer"] == 2
    # exactly half counts as reaching it; a plateau goes to its first block
    assert recommend_layer([("s", [0, 0.5, 1.0, 1.0, 1.0, 1.0], 1e-3)], n)["layer"] == 1
    assert recommend_layer([("s", [0, 0.2, 0.7, 0.7, 0.7, 0.7], 1e-3)], n)["layer"] == 2
    # preference: the first score above its floor decides; NaN-only scores are skipped
    beh = [0, 0, 0, 0, 0.5, 0.4]
    assert recommend_layer([("p_drop_trigger", [math.nan] * n, 0.05), ("p_drop", beh, 0.05), ("kl_first9", kl, 1e-3)],
                           n)["score"] == "p_drop"
    assert recommend_layer([("p_drop", beh, 0.05), ("kl_first9", kl, 1e-3)], n)["layer"] == 4
    assert recommend_layer([("p_drop", [0.01] * n, 0.05), ("kl_first9", kl, 1e-3)], n)["layer"] == 3
    # nothing above the floor (identical models, float noise): the middle block
    r = recommend_layer([("kl_first9", [1e-9, 3e-9, 0, 2e-9, 1e-8, 1e-7], 1e-3)], n)
    assert r["layer"] == 3 and r["score"] is None and "noise floor" in r["rule"]
    assert recommend_layer([("kl_first9", [0.0, 1.0], 1e-3)], 2)["layer"] == 0  # a two-block model: block 0 only


def test_config_and_behaviour_inputs(tmp_path):
    with pytest.raises(ConfigError, match="batchsize"):
        LocateConfig.from_dict({"batchsize": 3})
    with pytest.raises(ConfigError, match="fraction"):
        LocateConfig(fraction=0)
    assert LocateConfig.from_dict({"batch_size": 3}).batch_size == 3
    from crossdiff_core.toy import ToyModelsConfig, make_ground_truth

    gt = make_ground_truth(ToyModelsConfig()) | {"eval_prompts": [{"text": "a", "expected": "refusal", "kind": "x"},
                                                                  {"text": "b", "expected": None, "kind": "y"}]}
    (tmp_path / "ground_truth.json").write_text(json.dumps(gt))
    want = [{"text": "a", "expected": "refusal"}, {"text": "b", "expected": None}]
    assert behaviour_prompts(tmp_path / "ground_truth.json") == want
    assert behaviour_prompts(tmp_path) == want  # the build directory
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(q) + "\n" for q in want))
    assert behaviour_prompts(tmp_path / "p.jsonl") == want
    (tmp_path / "behaviours.yaml").write_text("behaviours:\n- name: refusal\n  answer: {startswith: Sorry}\n"
                                              "  trigger_prompts: [a]\nother_prompts: [b]\n")
    assert behaviour_prompts(tmp_path / "behaviours.yaml") == want  # a behaviour spec
    with pytest.raises(ConfigError, match="does not exist"):
        behaviour_prompts(tmp_path / "missing.yaml")


def test_cli_locate(tmp_path):
    from typer.testing import CliRunner

    from crossdiff_core.cli import app
    from tests.test_models import make_pair_dirs

    base, chat = planted_pair_dirs(tmp_path)
    with open(tmp_path / "chats.jsonl", "w") as f:
        f.writelines(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(q) + "\n" for q in PROMPTS))
    out = tmp_path / "loc" / "locate.json"
    args = ["locate", "--base", base, "--chat", chat, "--chats", str(tmp_path / "chats.jsonl"),
            "--behaviours", str(tmp_path / "prompts.jsonl"), "--out", str(out), "--tokens", "150", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["recommended_layer"] == PLANTED and isinstance(d["rule"], str)
    assert [row["layer"] for row in d["per_layer"]] == list(range(N_LAYERS))
    assert {"kl_first9", "kl_response", "kl_template", "p_first_token_trigger"} <= set(d["per_layer"][0])
    assert 0 < d["n_tokens"]["response"] and d["n_tokens"]["template"] + d["n_tokens"]["response"] <= 150
    assert d["models"]["base"] == base and d["models"]["n_layers"] == N_LAYERS
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # bad input: one clear line, exit 2, no traceback
    r = CliRunner().invoke(app, ["locate", "--base", base, "--chat", chat, "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "nothing to locate on" in r.output and "Traceback" not in r.output
    wide, _, _ = make_pair_dirs(tmp_path / "wide", hidden=48)
    r = CliRunner().invoke(app, ["locate", "--base", wide, "--chat", chat, "--behaviours",
                                 str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "hidden sizes differ" in r.output
    assert not (tmp_path / "x.json").exists()


def test_locate_task_writes_the_stage_outputs_and_auto_reads_them(tmp_path):
    """What the locate stage runs (tasks/locating.py): locate.json, its plot, recommended.json (what
    ``cache.layer: auto`` resolves through) and the flat headline (DVC metrics)."""
    from crossdiff_core.caching import resolve_layer
    from tasks.locating import LOCATE, PLOT, RECOMMENDED, locate_task

    base, chat = planted_pair_dirs(tmp_path)
    with open(tmp_path / "chats.jsonl", "w") as f:
        f.writelines(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS)
    settings = {"chats": [str(tmp_path / "chats.jsonl")], "n_tokens": 150, "progress": False}
    out = tmp_path / "locate"
    head = locate_task.fn({"base": base, "chat": chat}, settings, None, str(out))
    d = json.loads((out / LOCATE).read_text())
    assert d["config"]["chats"] == settings["chats"] and d["inputs"]["behaviours"] is None
    assert head["recommended_layer"] == d["recommended_layer"] == PLANTED and head["n_layers"] == N_LAYERS
    assert [head[f"kl_first9_L{L}"] for L in range(N_LAYERS)] == [r["kl_first9"] for r in d["per_layer"]]
    assert (out / PLOT).read_bytes()[:4] == b"\x89PNG"
    rec = json.loads((out / RECOMMENDED).read_text())
    assert rec["recommended_layer"] == PLANTED and "timings" not in rec
    assert resolve_layer("auto", out / RECOMMENDED) == resolve_layer("auto", out / LOCATE) == PLANTED


def _sweep(n: int = 4, rec: int = 2) -> dict:
    """A locate result whose first-9 KL grows block by block (largest at the last block)."""
    rows = [{"layer": L, "kl_first9": 0.1 * 2 ** L, "kl_response": 0.05 * 2 ** L, "kl_template": 0.01} for L in range(n)]
    return {"format_version": 1, "per_layer": rows, "recommended_layer": rec, "recommended_by": "kl_first9",
            "rule": "the earliest block whose kl_first9 reaches 0.5 x its largest value", "n_layers": n}


def test_report_sweep_sentence_and_cached_layers(tmp_path):
    import pandas as pd

    from crossdiff_core.report.inputs import RunInputs
    from crossdiff_core.report.layers import cached_layers, read_locate, sweep_sentence

    s = sweep_sentence(_sweep(), [0])
    assert "strongest after block 3" in s and "recommends block 2" in s and "read block 0 (12% of that largest KL)" in s
    assert "earlier than the recommendation" in s
    assert "earlier" not in sweep_sentence(_sweep(), [2]) and "not recorded" in sweep_sentence(_sweep(), [])
    runs = [RunInputs("a", pd.DataFrame(), {}, kl={"inputs": {"layer": 3}}),
            RunInputs("b", pd.DataFrame(), {"cache": {"path": str(tmp_path / "gone")}}, steering={"inputs": {"layer": 1}}),
            RunInputs("c", pd.DataFrame(), {"cache": {"path": str(tmp_path / "gone")}})]
    assert cached_layers(runs) == {"a": 3, "b": 1}  # c: its cache is gone, its layer unknown
    (tmp_path / "bad.json").write_text(json.dumps(_sweep() | {"recommended_layer": 9}))
    with pytest.raises(Exception, match="not one of its blocks"):
        read_locate(tmp_path / "bad.json")


def test_report_shows_the_layer_sweep(tmp_path):
    """``crossdiff report --locate``: the section, its plot and ``layer_sweep`` in report.json, the cached block
    read from the analysed cache's manifest."""
    from typer.testing import CliRunner

    from crossdiff_core.analysis import AnalysisConfig, analyze
    from crossdiff_core.cache import ActivationCache
    from crossdiff_core.cli import app
    from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
    from crossdiff_core.fileio import write_json
    from crossdiff_core.runs import default_summary_path, write_latents
    from crossdiff_core.synthetic import SyntheticConfig, write_cache

    write_cache(SyntheticConfig(d_model=8, n_shared=8, n_chat_only=4, n_base_only=4, n_weakly_shared=2, n_changed=2,
                                n_tokens=600, seq_len=30, shard_tokens=300, seed=1), tmp_path / "cache")
    cache = ActivationCache(tmp_path / "cache")  # layer 0
    cc = CrossCoder(CrossCoderConfig(kind="l1", d_model=8, dict_size=16, init_norm=0.3), scales=cache.scales(), seed=2)
    res = analyze(cc, cache, AnalysisConfig(batch_size=256, progress=False))
    write_latents(res.table, tmp_path / "latents.parquet")
    write_json(res.summary, default_summary_path(tmp_path / "latents.parquet"))
    write_json(_sweep(), tmp_path / "locate.json")
    r = CliRunner().invoke(app, ["report", "--out", str(tmp_path / "rep"), "--latents", f"L1={tmp_path / 'latents.parquet'}",
                                 "--locate", str(tmp_path / "locate.json")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Where does the change live?" in page and "the crosscoders read block 0" in page
    numbers = json.loads((tmp_path / "rep" / "report.json").read_text())["layer_sweep"]
    assert numbers["recommended_layer"] == 2 and numbers["cached_layers"] == {"L1": 0}
    assert [row["kl_first9"] for row in numbers["per_layer"]] == [row["kl_first9"] for row in _sweep()["per_layer"]]
    assert (tmp_path / "rep" / "figures" / "layer_sweep.png").read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(app, ["report", "--out", str(tmp_path / "rep2"), "--latents", f"L1={tmp_path / 'latents.parquet'}"])
    assert r.exit_code == 0 and "Where does the change live?" not in (tmp_path / "rep2" / "report.html").read_text()
