"""KL-gap patching (crossdiff_core.kl_eval) against independent full forward passes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.data import tokenize_chat
from crossdiff_core.kl_eval import CATEGORIES, KLConfig, first_n_mask, kl_gap, make_batch
from crossdiff_core.patch_sets import PatchSet, default_sets, nu_order
from crossdiff_core.patching import suffix_logits
from crossdiff_core.models import decoder_layers, load_pair
from crossdiff_core.runs import LATENT_COLUMNS
from tests.test_models import make_pair_dirs

LAYER = 1
CONVERSATIONS = [
    [{"role": "user", "content": "hello there, how is the weather"},
     {"role": "assistant", "content": "it is sunny and warm today, to be honest"}],
    [{"role": "user", "content": "to be or not to be?"},
     {"role": "assistant", "content": "that is the question"},
     {"role": "user", "content": "and the answer?"},
     {"role": "assistant", "content": "hello world, a small corpus"}],
    [{"role": "user", "content": "a question about the world"},
     {"role": "assistant", "content": "ok"}],
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def setup(request, tmp_path_factory):
    base, chat, tok = make_pair_dirs(tmp_path_factory.mktemp(request.param), request.param)
    pair = load_pair(base, chat, layer=LAYER, dtype="float32")
    seqs = [tokenize_chat(pair.tokenizer, c) for c in CONVERSATIONS]
    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(kind="l1", d_model=pair.d_model, dict_size=48, init_norm=0.3),
                    scales=torch.tensor([1.7, 2.3]), seed=3)
    with torch.no_grad():
        cc.b_dec.normal_(0, 0.3)
        cc.b_enc.normal_(0, 0.5)
    return pair, seqs, cc


def _independent_kl(pair, cc, seqs, latents, *, bias=False, error=False):
    """Full forward passes: the chat model with a hook that overwrites block L's output at the patched
    positions with a patch built latent by latent; KL per token with torch's kl_div; groups by hand."""
    s_b, s_c = cc.scales.tolist()

    def patch(hb, hc):
        x = torch.stack([hb, hc])[None]
        f = cc.encode(x)[0]
        v = hb.clone()
        for j in latents:
            v += f[j] * (s_c * cc.W_dec[1, j] - s_b * cc.W_dec[0, j])
        if bias:
            v += s_c * cc.b_dec[1] - s_b * cc.b_dec[0]
        if error:
            xh = cc.decode(cc.encode(x))[0]
            v += (hc - xh[1]) - (hb - xh[0])
        return v

    return patched_kl(pair, seqs, LAYER, patch)


def patched_kl(pair, seqs, layer, patch):
    """KL(p_chat ‖ p_patched) per token group (first 9 answer tokens, answer tokens, template tokens), the
    chat model's block ``layer`` output replaced token by token with ``patch(h_b[t], h_c[t])`` at the cached
    positions; full forward passes, torch's kl_div, groups counted by hand."""
    pad = pair.tokenizer.pad_token_id
    T = max(len(s.token_ids) for s in seqs)
    ids = torch.full((len(seqs), T), pad)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s.token_ids)] = torch.as_tensor(s.token_ids)
        mask[i, :len(s.token_ids)] = 1
    with torch.no_grad():
        logp_chat = torch.log_softmax(pair.chat(ids, attention_mask=mask).logits, -1)
        h_b, h_c = pair.residuals(ids, mask)
    patched = h_c.clone()
    with torch.no_grad():
        for i, s in enumerate(seqs):
            for t in range(len(s.token_ids)):
                if s.cached[t]:
                    patched[i, t] = patch(h_b[i, t], h_c[i, t])

    def hook(_m, _a, out):
        return (patched,) + tuple(out[1:]) if isinstance(out, tuple) else patched

    handle = decoder_layers(pair.chat)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logp = torch.log_softmax(pair.chat(ids, attention_mask=mask).logits, -1)
    finally:
        handle.remove()
    kl = torch.nn.functional.kl_div(logp, logp_chat, log_target=True, reduction="none").sum(-1)  # [B, T]
    sums, counts = np.zeros(3), np.zeros(3)
    for i, s in enumerate(seqs):
        k = 0  # index inside the current assistant run
        for t in range(len(s.token_ids)):
            k = k + 1 if (s.is_assistant[t] and t > 0 and s.is_assistant[t - 1]) else (1 if s.is_assistant[t] else 0)
            if not s.cached[t]:
                continue
            member = [bool(s.is_assistant[t]) and k <= 9, bool(s.is_assistant[t]), bool(s.is_template[t])]
            for g in range(3):
                if member[g]:
                    sums[g] += float(kl[i, t])
                    counts[g] += 1
    return sums / counts


def test_suffix_from_chat_activation_equals_full_forward(setup):
    pair, seqs, _ = setup
    b = make_batch(seqs, pair.tokenizer.pad_token_id)
    with torch.no_grad():
        full = pair.chat(b.input_ids, attention_mask=b.attention_mask).logits
        _, h_c = pair.residuals(b.input_ids, b.attention_mask)
    keep = b.evaluated
    got = suffix_logits(pair.chat, LAYER, b.input_ids, b.attention_mask, h_c, keep)
    torch.testing.assert_close(got, full[keep], atol=2e-5, rtol=1e-5)
    got_all = suffix_logits(pair.chat, LAYER, b.input_ids, b.attention_mask, h_c)
    real = b.attention_mask.bool()
    torch.testing.assert_close(got_all[real], full[real], atol=2e-5, rtol=1e-5)
    # the stand-ins are removed again: the model is whole
    assert all(type(blk).__name__ != "_StandIn" for blk in decoder_layers(pair.chat))


def test_kl_matches_independent_patching(setup):
    pair, seqs, cc = setup
    sets = [PatchSet("base"), PatchSet("chat", chat=True), PatchSet("some", np.array([0, 5, 7, 11, 30])),
            PatchSet("all_plus_error", all_latents=True, bias=True, error=True),
            PatchSet("error", error=True), PatchSet("recon", all_latents=True, bias=True)]
    # two sets per pass and batches of two conversations: chunking must not change the sums
    vocab = pair.chat.config.vocab_size
    res = kl_gap(pair, cc, seqs, sets, KLConfig(batch_size=2, max_logit_elements=2 * 80 * vocab, progress=False))
    kl = {s.name: res.kl[k] for k, s in enumerate(sets)}
    base = _independent_kl(pair, cc, seqs, [])
    assert np.all(base > 1e-3)  # the two models differ: there is a gap to close
    np.testing.assert_allclose(kl["base"], base, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(kl["chat"], 0.0, atol=1e-9)
    np.testing.assert_allclose(kl["all_plus_error"], 0.0, atol=1e-6)  # x̂_c − x̂_b + ε_c − ε_b = x_c − x_b
    np.testing.assert_allclose(kl["some"], _independent_kl(pair, cc, seqs, [0, 5, 7, 11, 30]), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(kl["error"], _independent_kl(pair, cc, seqs, [], error=True), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(kl["recon"], _independent_kl(pair, cc, seqs, range(48), bias=True), rtol=1e-4, atol=1e-7)
    gap = res.gap_closed()
    np.testing.assert_allclose(gap[0], 0.0)
    np.testing.assert_allclose(gap[1], 1.0)
    np.testing.assert_allclose(gap[2], 1 - kl["some"] / base, rtol=1e-4)
    d = res.to_dict()
    assert [r["name"] for r in d["sets"]] == [s.name for s in sets]
    assert set(d["n_tokens"]) == set(CATEGORIES) and d["n_sequences"] == 3


def test_first_layers_once_per_batch_later_layers_once_per_set(setup):
    """Tokens each block processes: blocks up to L see every token once per model, later blocks once per set."""
    pair, seqs, cc = setup
    n_layers = len(decoder_layers(pair.chat))
    seen = {("base", i): 0 for i in range(n_layers)} | {("chat", i): 0 for i in range(n_layers)}
    handles = []
    for name, model in (("base", pair.base), ("chat", pair.chat)):
        for i, blk in enumerate(decoder_layers(model)):
            def hook(_m, args, _o, key=(name, i)):
                seen[key] += args[0].shape[0] * args[0].shape[1]
            handles.append(blk.register_forward_hook(hook))
    sets = [PatchSet("base"), PatchSet("chat", chat=True), PatchSet("a", [1, 2]), PatchSet("b", [3])]
    try:
        kl_gap(pair, cc, seqs, sets, KLConfig(batch_size=2, progress=False))
    finally:
        for h in handles:
            h.remove()
    lens = sorted(len(s.token_ids) for s in seqs)
    padded = 2 * lens[1] + lens[2]  # batches by length: the shortest two padded to the 2nd, then the longest
    for i in range(n_layers):
        if i <= LAYER:
            assert seen[("base", i)] == padded and seen[("chat", i)] == padded
        else:
            assert seen[("base", i)] == 0 and seen[("chat", i)] == len(sets) * padded


def test_first_n_mask_hand_computed():
    a = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    got = first_n_mask(a, 2)
    want = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(got, want)


def test_sets_nu_ranking_and_halves():
    # 7 chat-only latents (one never fired: NaN rank), plus latents of other classes that must be ignored
    table = pd.DataFrame({
        "latent": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        "class": ["chat_only", "shared", "chat_only", "chat_only", "chat_only", "base_only", "chat_only",
                  "chat_only", "chat_only", "other"],
        "delta_norm": [0.95, 0.5, 0.99, 0.91, 0.97, 0.02, 0.93, 0.99, 0.92, 0.7],
        "nu_rank": [6.0, 1.0, 2.0, np.nan, 10.0, 1.0, 4.0, 8.0, 12.0, 2.0],
    })
    # ν order: 2 (2), 6 (4), 0 (6), 7 (8), 4 (10), 8 (12), 3 (NaN last)
    assert nu_order(table[table["class"] == "chat_only"]).tolist() == [2, 6, 0, 7, 4, 8, 3]
    sets = {s.name: s for s in default_sets(table, n_random=3, seed=1)}
    assert sets["chat_only"].latents.tolist() == [0, 2, 3, 4, 6, 7, 8]
    assert sets["nu_top"].latents.tolist() == [2, 6, 0]
    assert sets["nu_bottom"].latents.tolist() == [4, 8, 3]
    # Δnorm: 2 (.99), 7 (.99, tie by id), 4 (.97), 0 (.95), 6 (.93), 8 (.92), 3 (.91)
    assert sets["delta_norm_top"].latents.tolist() == [2, 7, 4]
    assert sets["delta_norm_bottom"].latents.tolist() == [6, 8, 3]
    randoms = [s for s in sets.values() if s.group == "random"]
    assert len(randoms) == 3 and all(s.size == 3 for s in randoms)
    assert all(set(s.latents) <= {0, 2, 3, 4, 6, 7, 8} for s in randoms)
    assert len({tuple(s.latents) for s in randoms}) > 1  # different seeds, different sets
    again = {s.name: s for s in default_sets(table, n_random=3, seed=1)}
    assert all(np.array_equal(sets[k].latents, again[k].latents) for k in sets)  # seeded
    assert sets["base"].size == 0 and sets["chat"].chat and sets["reconstruction"].all_latents
    assert sets["error"].error and not sets["error"].all_latents


def test_cli_evaluate(tmp_path):
    import json

    from typer.testing import CliRunner

    from crossdiff_core.cli import app

    base, chat, _ = make_pair_dirs(tmp_path, "llama")
    cc = CrossCoder(CrossCoderConfig(kind="l1", d_model=32, dict_size=48, init_norm=0.3), seed=3)
    cc.save(tmp_path / "cc")
    F = cc.cfg.dict_size
    table = pd.DataFrame({"latent": np.arange(F), "class": ["chat_only"] * 10 + ["shared"] * (F - 10),
                          "delta_norm": np.linspace(1, 0, F), "nu_rank": np.arange(F, dtype=float),
                          "max_act": np.ones(F)})
    for c in LATENT_COLUMNS:  # read_latents checks every DESIGN §2 column
        if c not in table:
            table[c] = 0.5
    table[list(LATENT_COLUMNS)].to_parquet(tmp_path / "latents.parquet")
    with open(tmp_path / "chats.jsonl", "w") as f:
        for c in CONVERSATIONS:
            f.write(json.dumps({"messages": c}) + "\n")
    args = ["evaluate", "--crosscoder", str(tmp_path / "cc"), "--latents", str(tmp_path / "latents.parquet"),
            "--chats", str(tmp_path / "chats.jsonl"), "--out", str(tmp_path / "kl.json"), "--base", base,
            "--chat", chat, "--layer", str(LAYER), "--tokens", "150", "--n-random", "2", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "kl.json").read_text())
    sets = {s["name"]: s for s in d["sets"]}
    assert sets["chat"]["kl"]["response"] == 0.0 and sets["base"]["gap_closed"]["response"] == 0.0
    assert sets["nu_top"]["size"] == 5 and d["groups"]["random"]["n_sets"] == 2
    assert d["inputs"]["layer"] == LAYER
    # a latents table of another crosscoder is refused with a clear message
    table.head(5).to_parquet(tmp_path / "other.parquet")
    r = CliRunner().invoke(app, args[:3] + ["--latents", str(tmp_path / "other.parquet")] + args[5:])
    assert r.exit_code == 2 and "describes 5 latents" in r.output


def _no_chat_only_table() -> pd.DataFrame:
    """Nothing crosses Δnorm 0.9; latent 5 is dead (its init's 0.5); 3 and 6 tie in Δnorm (0.87)."""
    return pd.DataFrame({
        "latent": np.arange(8),
        "class": ["other", "shared", "other", "other", "other", "dead", "other", "base_only"],
        "delta_norm": [0.70, 0.50, 0.80, 0.87, 0.61, 0.50, 0.872, 0.05],
        "nu_error": [0.9, 1.0, 0.4, 0.5, 0.8, np.nan, 0.1, 1.2],
        "nu_recon": [0.9, 1.0, 0.3, 0.6, 0.8, np.nan, 0.2, 1.1],
        "nu_rank": [1.0] * 8,  # within-class ranks: not what the top-N ranking uses
        "freq": [0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.1, 0.1],
    })


def test_chat_ranking_by_delta_norm_then_nu():
    from crossdiff_core.chat_rank import chat_ranking, top_chat

    t = _no_chat_only_table()
    # Δnorm steps of 0.01: 3 (0.87) and 6 (0.872) share one, and 6 has the lower ν rank over the live latents
    # (ν_ε ranks 6:1 2:2 3:3 4:4 0:5 1:6 7:7; ν_r 6:1 2:2 3:3 4:4 0:5 1:6 7:7) -> 6 first; the dead latent 5 is out
    assert chat_ranking(t)["latent"].tolist() == [6, 3, 2, 0, 4, 1, 7]
    assert chat_ranking(t)["chat_rank"].tolist() == list(range(1, 8))
    assert top_chat(t, 3).tolist() == [6, 3, 2]
    assert top_chat(t, 100).size == 7 and top_chat(t, 0).size == 0


def test_default_sets_with_no_chat_only_latents():
    t = _no_chat_only_table()
    sets = {s.name: s for s in default_sets(t, n_random=4, seed=2, n_top_chat=4)}
    assert sets["chat_only"].size == 0 and "nu_top" not in sets and "random_0" not in sets
    assert sets["top_chat"].latents.tolist() == [0, 2, 3, 6]  # sorted ids of the top 4: 6, 3, 2, 0
    assert sets["top_chat_delta_norm"].latents.tolist() == [6, 3]  # the higher-Δnorm half, in ranking order
    # ν rank over the top 4 (computed over all live latents): 6 (2), 2 (4), 3 (6), 0 (10)
    assert sets["top_chat_nu"].latents.tolist() == [6, 2]
    rnd = [s for s in sets.values() if s.group == "top_chat_random"]
    assert len(rnd) == 4 and all(s.size == 4 and 5 not in s.latents for s in rnd)  # live latents only
    assert len({tuple(s.latents) for s in rnd}) > 1
    assert {"base", "chat", "error", "reconstruction"} <= set(sets)
    assert not any(s.name.startswith("top_chat") for s in default_sets(t, n_top_chat=0))
    with pytest.raises(Exception, match="n_top_chat"):
        default_sets(t, n_top_chat=-1)
