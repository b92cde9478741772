"""The scoreboard (crossdiff_core.scoreboard) on hand-built directions whose answers are known: projections
against full forwards' hidden states, AUROC against a pairwise count, a direction and its negative, the
whole space (closes the whole KL gap) and nothing (closes none), steering runs against the behaviour
measure run by hand under the same hook, the supervised tracker method against its picks and cross-fitted AUROC
recomputed by brute force, and the methods' rankings on a hand-built latents table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from crossdiff_core.behaviours import BehaviourSpec, measure
from crossdiff_core.data import tokenize_chat
from crossdiff_core.errors import ConfigError
from crossdiff_core.generation import render_prompts
from crossdiff_core.kl_eval import KLConfig
from crossdiff_core.models import decoder_layers, load_pair
from crossdiff_core.scoreboard import (Method, ScoreboardConfig, crossfit_auroc, crosscoder_methods, halves,
                                       headline, lens_method, pick_trackers, pooled_rate, prompt_projections,
                                       random_method, score_methods, steer_scales, unit)
from crossdiff_core.steering import steering
from tests.test_kl_eval import patched_kl
from tests.test_locate import CONVERSATIONS, PLANTED, planted_pair_dirs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SPEC = BehaviourSpec.from_dict({
    "format_version": 1,
    # an answer pattern the tiny random models do produce on some prompts (any letter 'e'), so rates move
    "behaviours": [{"name": "weather", "answer": {"contains": "e"},
                    "trigger_prompts": ["tell me about the weather", "is the weather sunny?", "rain or sun today?"]}],
    "other_prompts": ["hello", "who wrote to be or not to be", "a small question about a tiny corpus"]})


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base, chat = planted_pair_dirs(tmp_path_factory.mktemp("board"))
    pair = load_pair(base, chat, layer=PLANTED, dtype="float32")
    return pair, [tokenize_chat(pair.tokenizer, c) for c in CONVERSATIONS]


def _hidden(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[PLANTED + 1][0].double()


def test_projections_match_full_forwards(planted):
    pair, _ = planted
    prompts = [p["text"] for p in SPEC.prompts()]
    U = unit(torch.randn(3, pair.d_model, generator=torch.Generator().manual_seed(0)))
    got, scales, peaks = prompt_projections(pair, prompts, U, batch_size=2)  # batches of unequal lengths: padding
    rows = render_prompts(pair.tokenizer, prompts)
    want, hb_all, hc_all = [], [], []
    for r in rows:
        hc, hb = _hidden(pair.chat, r)[1:], _hidden(pair.base, r)[1:]  # BOS excluded
        want.append((hc @ U.double().T).max(0).values)
        hb_all.append(hb)
        hc_all.append(hc)
    torch.testing.assert_close(got.double(), torch.stack(want), atol=1e-4, rtol=1e-5)
    # the peak unit: each direction's largest projection of a chat token less its mean, over every prompt token
    hc = torch.cat(hc_all)
    torch.testing.assert_close(peaks.double(), ((hc - hc.mean(0)) @ U.double().T).max(0).values, atol=1e-4, rtol=1e-5)
    for name, h in (("base", torch.cat(hb_all)), ("chat", torch.cat(hc_all))):
        np.testing.assert_allclose(scales["norm"][name], float(h.norm(dim=1).mean()), rtol=1e-5)
        # the spread: the RMS distance of a token's activation from the mean one (numpy's own variance)
        hn = h.numpy()
        np.testing.assert_allclose(scales["spread"][name], float(np.sqrt(hn.var(axis=0).sum())), rtol=1e-5)


def _board(pair, seqs, methods, **kw):
    cfg = ScoreboardConfig(n_directions=kw.pop("n", 4), alphas=kw.pop("alphas", (1.0,)), max_new_tokens=4,
                           batch_size=4, progress=False, **kw)
    return score_methods(pair, methods, SPEC, seqs, cfg, KLConfig(progress=False))


def test_known_answers(planted):
    pair, seqs = planted
    prompts = SPEC.prompts()
    rows = render_prompts(pair.tokenizer, [p["text"] for p in prompts])
    pos = np.array([p["expected"] == "weather" for p in prompts])
    # a direction that separates the trigger prompts: the difference of the two groups' mean max-token activation
    acts = [_hidden(pair.chat, r)[1:] for r in rows]
    mean = torch.stack([a.mean(0) for a in acts])
    u = (mean[pos].mean(0) - mean[~pos].mean(0)).float()
    d = pair.d_model
    methods = [Method("planted", "test", torch.stack([-u, u]), ["minus", "plus"], None, "u and -u"),
               Method("everything", "test", torch.eye(d), [f"e{i}" for i in range(d)], None, "the whole space"),
               Method("zero_gain", "test", torch.zeros(1, d), ["zero"], None, "a zero direction adds nothing")]
    board = _board(pair, seqs, methods, n=d, steer_top=1)  # the detection-best direction only: its run is runs[0]
    rec = {m["name"]: m for m in board["methods"]}
    # detection: AUROC by a pairwise count over each direction's prompt scores (a prompt's largest projection:
    # for -u that is minus the smallest one, so the two AUROCs need not add to 1); the better one is best
    scores = torch.stack([(a @ unit(torch.stack([-u, u])).double().T).max(0).values for a in acts]).numpy()
    for j in range(2):
        s1, s0 = scores[pos, j], scores[~pos, j]
        want = np.mean([(a > b) + 0.5 * (a == b) for a in s1 for b in s0])
        np.testing.assert_allclose(rec["planted"]["behaviours"]["weather"]["aurocs"][j], want, atol=1e-12)
    a = rec["planted"]["behaviours"]["weather"]["aurocs"]
    assert rec["planted"]["behaviours"]["weather"]["best"] == int(np.argmax(a))
    assert rec["planted"]["behaviours"]["weather"]["auroc"] == max(a)
    # KL: the whole space patches h_c itself (the whole gap); a zero direction patches h_b (none of it)
    assert board["kl_base"]["response"] > 0
    for c in ("first9", "response", "template"):
        np.testing.assert_allclose(rec["everything"]["gap_closed"][c], 1.0, atol=1e-4)
        np.testing.assert_allclose(rec["zero_gain"]["gap_closed"][c], 0.0, atol=1e-9)
    # steering: a zero vector is the unsteered model; the best direction's run is the measure under the hook
    for model in ("base", "chat"):
        z = rec["zero_gain"]["behaviours"]["weather"]["steer"][model]
        assert z["best"] == z["unsteered"] == board["unsteered"][model]["weather"]["rate"]
    # by default (the peak unit) its scale is its reach in the chat model, by hand from the hidden states: the
    # largest projection of a chat token above the mean token's; in the base that times the spreads' ratio
    j = rec["planted"]["behaviours"]["weather"]["best"]
    uj = unit(torch.stack([-u, u]))[j]
    hc, hb = torch.cat(acts), torch.cat([_hidden(pair.base, r)[1:] for r in rows])
    peak = float(((hc - hc.mean(0)) @ uj.double()).max())
    ratio = float(np.sqrt(hb.numpy().var(axis=0).sum() / hc.numpy().var(axis=0).sum()))
    scale = rec["planted"]["behaviours"]["weather"]["steer_scale"]
    assert board["steer_unit"] == "peak" and peak > 0
    assert scale["chat"] == pytest.approx(peak, rel=1e-4) and scale["base"] == pytest.approx(peak * ratio, rel=1e-4)
    for model, net in (("chat", pair.chat), ("base", pair.base)):
        with steering(net, PLANTED, uj * scale[model]):
            m = measure(net, SPEC, prompts, tokenizer=pair.tokenizer, max_new_tokens=4, batch_size=4)
        got = rec["planted"]["behaviours"]["weather"]["steer"][model]["runs"][0]
        assert got["trigger_rate"] == m["rates"]["weather"]["trigger_rate"]
        assert got["other_rate"] == m["rates"]["weather"]["other_rate"]
        assert got["rate"] == pooled_rate(m["rates"]["weather"])
    # the DVC metric: numbers per method and behaviour
    h = headline(board)
    assert set(h) == {"planted", "everything", "zero_gain"}
    assert h["planted"]["weather"]["auroc"] == max(a) and h["everything"]["gap_closed_response"] == \
        rec["everything"]["gap_closed"]["response"]
    assert {r["method"] for r in board["rows"]} == set(h) and len(board["rows"]) == 3
    assert all(len(m["top_tokens"]) == min(3, len(m["labels"])) for m in board["methods"])


def _pairwise(s1, s0):
    """AUROC by counting: the share of (trigger, other) pairs the score orders right, ties half."""
    return float(np.mean([(a > b) + 0.5 * (a == b) for a in s1 for b in s0]))


def _hand_crosscoder(pair, dict_size=3, seed=11):
    """Latent 0 reads the chat half along the trigger prompts' separating direction u (never clipped), latent 1
    a random base-half direction, latent 2 the chat half along -u; random decoders. With the codes of every
    prompt by hand: ``relu(W_enc^T [h_b / s_b; h_c / s_c] + b_enc)``, the largest over its tokens ``[P, F]``."""
    from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig

    prompts = SPEC.prompts()
    rows = render_prompts(pair.tokenizer, [p["text"] for p in prompts])
    pos = np.array([p["expected"] == "weather" for p in prompts])
    hc = [_hidden(pair.chat, r)[1:] for r in rows]
    hb = [_hidden(pair.base, r)[1:] for r in rows]
    mean = torch.stack([a.mean(0) for a in hc])
    u = (mean[pos].mean(0) - mean[~pos].mean(0)).float()
    d = pair.d_model
    g = torch.Generator().manual_seed(seed)
    cc = CrossCoder(CrossCoderConfig(kind="l1", d_model=d, dict_size=dict_size, l1_coeff=1.0),
                    scales=torch.tensor([1.5, 2.0]))
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[1, :, 0] = u / u.norm()
        cc.W_enc[0, :, 1] = torch.randn(d, generator=g)
        cc.W_enc[1, :, 2] = -u / u.norm()
        if dict_size > 3:
            cc.W_enc[:, :, 3:] = torch.randn(2, d, dict_size - 3, generator=g)
        b = torch.zeros(dict_size)
        b[:3] = torch.tensor([50.0, 0.0, 0.2])
        cc.b_enc.copy_(b)
        cc.W_dec.copy_(torch.randn(dict_size, 2, d, generator=g).permute(1, 0, 2))
    W = cc.W_enc.detach().double()  # [2, d, F]
    codes = torch.stack([torch.relu(b_ @ W[0] / 1.5 + c @ W[1] / 2.0 + cc.b_enc.detach().double()).max(0).values
                         for b_, c in zip(hb, hc)]).numpy()  # [P, F]
    return cc, codes, pos, hc, u


def test_codes_reading_detects_by_the_latents_own_codes(planted):
    """A hand-set crosscoder whose latent 0 reads the separating direction from the chat half and writes an
    unrelated chat decoder row: read by its codes it detects (AUROC from codes computed by hand from the
    hidden states), read by projection on that decoder row it need not; both readings share one direction
    set, so they share its steering runs and its KL patch."""
    from crossdiff_core.scoreboard import chat_directions

    pair, seqs = planted
    cc, want, pos, hc, u = _hand_crosscoder(pair)
    lat = [0, 1, 2]
    dirs = chat_directions(cc, lat)
    methods = [Method("cc", "crosscoder", dirs, [f"latent {j}" for j in lat], lat, "by projection"),
               Method("cc_codes", "crosscoder", dirs, [f"latent {j}" for j in lat], lat, "by codes", cc)]
    board = _board(pair, seqs, methods, n=3, steer_top=1)
    rec = {m["name"]: m for m in board["methods"]}
    assert rec["cc"]["reading"] == "projection" and rec["cc_codes"]["reading"] == "codes"
    proj = torch.stack([(c @ unit(dirs).double().T).max(0).values for c in hc]).numpy()
    for got, scores in ((rec["cc_codes"], want), (rec["cc"], proj)):
        for j in range(3):
            s1, s0 = scores[pos, j], scores[~pos, j]
            pairwise = np.mean([(a > b) + 0.5 * (a == b) for a in s1 for b in s0])
            np.testing.assert_allclose(got["behaviours"]["weather"]["aurocs"][j], pairwise, atol=1e-9)
    # latent 0's codes rank the prompts as their chat activations' projection on u does
    on_u = torch.stack([(c @ (u / u.norm()).double()).max() for c in hc]).numpy()
    want_u = np.mean([(a > b) + 0.5 * (a == b) for a in on_u[pos] for b in on_u[~pos]])
    np.testing.assert_allclose(rec["cc_codes"]["behaviours"]["weather"]["aurocs"][0], want_u, atol=1e-9)
    assert rec["cc_codes"]["behaviours"]["weather"]["aurocs"] != rec["cc"]["behaviours"]["weather"]["aurocs"]
    # one direction set: the same KL patch; a direction both readings chose is steered once (identical runs)
    assert rec["cc"]["gap_closed"] == rec["cc_codes"]["gap_closed"]
    assert [m["method"] for m in board["rows"]] == ["cc", "cc_codes"] and board["rows"][1]["reading"] == "codes"
    jp, jc = (rec[n]["behaviours"]["weather"]["best"] for n in ("cc", "cc_codes"))
    if jp == jc:
        assert rec["cc"]["behaviours"]["weather"]["steer"] == rec["cc_codes"]["behaviours"]["weather"]["steer"]
    # a codes method needs the latent ids of its directions
    with pytest.raises(Exception, match="latent id"):
        _board(pair, seqs, [Method("bad", "crosscoder", dirs, ["a", "b", "c"], None, "no ids", cc)], n=3)


def _u_stat(s1, s0) -> int:
    """Twice the Mann-Whitney U by counting (an integer, so ties compare exactly)."""
    return int(sum(2 * (a > b) + (a == b) for a in s1 for b in s0))


def _live_trackers(table, scores, pos):
    """The live latents (finite max_act, not dead) by AUROC (pair counts), best first; ties to chat-only, then
    the lower ν rank, then the latent id (the steer stage's rule, by hand)."""
    u = {j: _u_stat(scores[pos, j], scores[~pos, j]) for j in range(scores.shape[1])}
    live = table[np.isfinite(table["max_act"]) & (table["class"] != "dead")]
    key = {int(r.latent): (-u[int(r.latent)], r["class"] != "chat_only",
                           np.inf if np.isnan(r.nu_rank) else r.nu_rank, int(r.latent)) for _, r in live.iterrows()}
    return sorted(key, key=key.get)


def _by_hand_crossfit(table, scores, pos, fold):
    held = []
    for f in (0, 1):
        tr, te = fold != f, fold == f
        j = _live_trackers(table, scores[tr], pos[tr])[0]
        held.append(_u_stat(scores[te & pos, j], scores[te & ~pos, j]) / (2 * (te & pos).sum() * (te & ~pos).sum()))
    return float(np.mean(held))


def _tracker_table(n):
    """n latents: the last dead, 2 and 7 chat-only (ν ranks 2 and 1), the rest shared."""
    cls = ["shared"] * n
    cls[2], cls[7], cls[-1] = "chat_only", "chat_only", "dead"
    nu = np.full(n, np.nan)
    nu[2], nu[7] = 2.0, 1.0
    return pd.DataFrame({"latent": np.arange(n), "class": cls, "nu_rank": nu,
                         "max_act": [1.0] * (n - 1) + [np.nan]})


def test_trackers_and_their_cross_fitted_auroc_by_brute_force():
    from crossdiff_core.scoreboard import tracker_order

    rng = np.random.default_rng(0)
    expected = np.array(["a"] * 5 + ["b"] * 4 + [""] * 7)
    scores = rng.normal(size=(16, 10))
    scores[expected == "a", 3] += 5.0  # 3 tracks a, 6 less well; 5 tracks b
    scores[expected == "a", 6] += 1.0
    scores[expected == "b", 5] += 5.0
    scores[:, 7] = scores[:, 5]  # chat-only 7 ties with 5: the tie goes to chat-only
    scores[:, 9] = scores[:, 3] + 1.0  # dead latent 9 would tie with 3: never a tracker
    table = _tracker_table(10)
    fold = halves(expected, seed=1)
    for k in ("a", "b", ""):  # each kind dealt evenly between the halves; seeded
        n = int((expected == k).sum())
        assert sorted([int((fold[expected == k] == f).sum()) for f in (0, 1)]) == [n // 2, n - n // 2]
    assert np.array_equal(fold, halves(expected, seed=1))
    assert any(not np.array_equal(fold, halves(expected, seed=s)) for s in range(2, 6))
    oa, ob = (_live_trackers(table, scores, expected == b) for b in ("a", "b"))
    assert oa[0] == 3 and ob[:2] == [7, 5] and 9 not in oa
    assert tracker_order(table, scores, expected, "a").tolist() == oa
    assert tracker_order(table, scores, expected, "b").tolist() == ob
    # picks: each behaviour's best in turn, each id once
    want: list[int] = []
    for r in range(9):
        for o in (oa, ob):
            if o[r] not in want:
                want.append(o[r])
    for n in (1, 4, 9, 20):
        assert pick_trackers([oa, ob], n) == want[:n]
    # cross-fitted: the best tracker of one half scored on the other, both ways, averaged
    for b in ("a", "b"):
        assert crossfit_auroc(table, scores, expected, b, fold) == \
            pytest.approx(_by_hand_crossfit(table, scores, expected == b, fold), abs=1e-12)
    # a half without a trigger prompt has nothing to pick or score with
    assert math.isnan(crossfit_auroc(table, scores, expected, "a", np.zeros(16, dtype=np.int64)))


def test_track_method_picks_its_latents_and_steers_its_best_trackers(planted):
    """The supervised method on a hand-set crosscoder: its picks, cross-fitted AUROC and in-sample AUROC from
    codes computed by hand, its directions the picks' chat decoder rows, and with ``steer_top`` 2 both of its
    best trackers steered: the better rate counts and is named, with its own reach, and the second tracker's
    run is the behaviour measure under the hook."""
    from crossdiff_core.scoreboard import chat_directions

    pair, seqs = planted
    cc, codes, pos, hc, _ = _hand_crosscoder(pair, dict_size=6)
    table = _table()  # six latents, 5 dead
    (m,) = crosscoder_methods(cc, table, "cc", 3, ["track"], ["projection", "codes"])
    assert m.name == "cc_track" and m.supervised and m.encoder is cc and m.table is table
    board = _board(pair, seqs, [m], n=3, steer_top=2)
    rec = board["methods"][0]
    v = rec["behaviours"]["weather"]
    prompts = SPEC.prompts()
    expected = np.array([p["expected"] or "" for p in prompts])
    picks = _live_trackers(table, codes, pos)[:3]
    assert rec["latents"] == picks and 5 not in picks and rec["supervised"] and rec["reading"] == "codes"
    np.testing.assert_allclose(rec["norms"], chat_directions(cc, picks).norm(dim=1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(v["aurocs"], [_u_stat(codes[pos, j], codes[~pos, j]) / (2 * pos.sum() * (~pos).sum())
                                             for j in picks], atol=1e-9)
    assert v["auroc_in_sample"] == max(v["aurocs"]) and v["best"] == 0
    assert v["auroc"] == pytest.approx(_by_hand_crossfit(table, codes, pos, halves(expected, 0)), abs=1e-9)
    # the steered trackers: the two best-detecting picks, one run per a; each one's reach by hand
    second = int(np.argsort(-np.array(v["aurocs"]), kind="stable")[1])
    steered = [picks[0], picks[second]]
    H = torch.cat(hc)
    U = unit(chat_directions(cc, steered)).double()
    reach = {j: float(((H - H.mean(0)) @ U[n]).max()) for n, j in enumerate(steered)}
    s = v["steer"]["chat"]
    assert [r["label"] for r in s["runs"]] == [f"latent {j}" for j in steered]  # a single a
    k = int(np.argmax([r["rate"] for r in s["runs"]]))
    assert s["best"] == s["runs"][k]["rate"] and s["best_label"] == f"latent {steered[k]}"
    assert v["steer_scale"]["chat"] == pytest.approx(reach[steered[k]], rel=1e-4)
    with steering(pair.chat, PLANTED, U[1].float() * reach[steered[1]]):
        mm = measure(pair.chat, SPEC, prompts, tokenizer=pair.tokenizer, max_new_tokens=4, batch_size=4)
    assert s["runs"][1]["rate"] == pooled_rate(mm["rates"]["weather"])
    assert board["rows"][0]["supervised"] and board["rows"][0]["steered_chat"] == s["best_label"]
    # a supervised method needs the crosscoder that reads its candidates
    with pytest.raises(Exception, match="picks trackers"):
        _board(pair, seqs, [m._replace(encoder=None)], n=3)


def test_random_control_is_seeded_and_one_direction_closes_part(planted):
    pair, seqs = planted
    r1, r2 = random_method(pair.d_model, 2, seed=3), random_method(pair.d_model, 2, seed=3)
    assert torch.equal(r1.directions, r2.directions) and not torch.equal(r1.directions,
                                                                         random_method(pair.d_model, 2, 4).directions)
    board = _board(pair, seqs, [r1], n=2)
    rec = board["methods"][0]
    assert 0.0 < rec["gap_closed"]["response"] < 1.0  # two of 32 dimensions: some of the gap, not all
    # the same patch by hand: h_b + P (h_c - h_b), P the projection onto the two directions from a pseudo-inverse
    D = r1.directions.double()
    P = (torch.linalg.pinv(D) @ D).float()  # [d, d]
    want = patched_kl(pair, seqs, PLANTED, lambda hb, hc: hb + P @ (hc - hb))
    gap = patched_kl(pair, seqs, PLANTED, lambda hb, hc: hb)
    for i, c in enumerate(("first9", "response", "template")):
        assert rec["kl"][c] == pytest.approx(want[i], rel=1e-3, abs=1e-7)
        assert board["kl_base"][c] == pytest.approx(gap[i], rel=1e-3, abs=1e-7)
        assert rec["gap_closed"][c] == pytest.approx(1 - want[i] / gap[i], rel=1e-3, abs=1e-6)


def test_model_wide_units_steer_every_direction_by_the_same_scale(planted):
    pair, seqs = planted
    g = torch.Generator().manual_seed(5)
    methods = [Method("two", "test", torch.randn(2, pair.d_model, generator=g), ["a", "b"], None, "two directions")]
    board = _board(pair, seqs, methods, n=2, alphas=(0.5,), steer_unit="spread")
    v = board["methods"][0]["behaviours"]["weather"]
    assert board["steer_norms"] == board["steer_scales"]["spread"] and v["steer_scale"] == board["steer_norms"]
    uj = unit(methods[0].directions)[v["best"]]
    with steering(pair.chat, PLANTED, uj * (0.5 * board["steer_norms"]["chat"])):
        m = measure(pair.chat, SPEC, SPEC.prompts(), tokenizer=pair.tokenizer, max_new_tokens=4, batch_size=4)
    assert v["steer"]["chat"]["runs"][0]["rate"] == pooled_rate(m["rates"]["weather"])
    assert steer_scales("norm", board["steer_scales"], 3.0) == board["steer_scales"]["norm"]


def test_pooled_rate():
    assert pooled_rate({"trigger_rate": 1.0, "n_trigger": 2, "other_rate": 0.25, "n_other": 4}) == pytest.approx(0.5)
    assert pooled_rate({"trigger_rate": float("nan"), "n_trigger": 0, "other_rate": 0.5, "n_other": 2}) == 0.5
    assert math.isnan(pooled_rate({"n_trigger": 0, "n_other": 0}))


def _table():
    # latents 0..5: chat-only 2 (ν rank 2), 4 (ν rank 1); 5 dead; Δnorm order 4, 2, 3, 1, 0
    return pd.DataFrame({"latent": np.arange(6), "delta_norm": [0.1, 0.4, 0.95, 0.6, 0.99, 1.0],
                         "class": ["base_only", "shared", "chat_only", "other", "chat_only", "dead"],
                         "nu_rank": [np.nan, np.nan, 2.0, np.nan, 1.0, np.nan],
                         "nu_error": [0.5, 0.9, 0.2, 0.4, 0.1, np.nan], "nu_recon": [0.5, 0.9, 0.2, 0.4, 0.1, np.nan],
                         "max_act": [1.0, 1.0, 1.0, 1.0, 1.0, np.nan], "freq": [0.1, 0.1, 0.1, 0.1, 0.1, 0.0]})


def test_crosscoder_methods_rank_and_read_the_chat_decoder():
    from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig

    cc = CrossCoder(CrossCoderConfig(kind="l1", d_model=8, dict_size=6, l1_coeff=1.0), scales=torch.tensor([2.0, 3.0]))
    ms = {m.name: m for m in crosscoder_methods(cc, _table(), "l1", 3)}
    assert ms["l1_dnorm"].latents == [4, 2, 3]  # dead latent 5 never proposed
    assert ms["l1_nu"].latents == [4, 2, 3]  # chat-only by ν rank, filled up by Δnorm
    torch.testing.assert_close(ms["l1_dnorm"].directions, 3.0 * cc.W_dec.detach()[1, [4, 2, 3]])
    assert crosscoder_methods(cc, _table(), "l1", 1, ["nu"])[0].latents == [4]
    both = crosscoder_methods(cc, _table(), "l1", 3, ["dnorm"], ["projection", "codes"])
    assert [m.name for m in both] == ["l1_dnorm", "l1_dnorm_codes"] and both[0].encoder is None and both[1].encoder is cc
    assert both[1].latents == [4, 2, 3] and torch.equal(both[0].directions, both[1].directions)


def test_lens_method_order_and_zero_vectors():
    d = torch.zeros(3, 4, 4)
    d[1, 0] = torch.tensor([1.0, 0, 0, 0])
    d[1, 2] = torch.tensor([0, 3.0, 0, 0])
    t = {"chat/delta": torch.stack([torch.zeros(4), torch.tensor([0, 0, 2.0, 0]), torch.zeros(4)]),
         "chat/delta_per_position": d}
    m = lens_method(t, 1, 3)
    assert m.labels == ["δ chat", "δ chat p2", "δ chat p0"]  # pooled first, then per position by norm
    assert lens_method(t, 0, 3) is None  # identical models at block 0: nothing to propose


def test_config_refuses_bad_settings():
    for bad in ({"n_directions": 0}, {"rankings": ["delta"]}, {"alphas": []}, {"models": ["other"]},
                {"max_prompts": 1}, {"unknown": 1}, {"readings": []}, {"readings": ["decoder"]}, {"steer_top": 0},
                {"steer_top": 1.5}):
        with pytest.raises(ConfigError):
            ScoreboardConfig.from_dict(bad)
    assert ScoreboardConfig.from_dict({"lens_positions": 3}).lens().n_positions == 3
    with pytest.raises(ConfigError, match="chat_window"):
        ScoreboardConfig(lens_chat_window="middle")


def test_cli_scoreboard_and_its_bad_input(tmp_path):
    import json

    from typer.testing import CliRunner

    from crossdiff_core.cli import app
    from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
    from crossdiff_core.runs import LATENT_COLUMNS
    from tests.test_models import make_pair_dirs

    base, chat, _ = make_pair_dirs(tmp_path, "llama")
    cc = CrossCoder(CrossCoderConfig(kind="l1", d_model=32, dict_size=6, l1_coeff=1.0, init_norm=0.3), seed=3)
    cc.save(tmp_path / "cc")
    t = _table()
    for c in LATENT_COLUMNS:
        if c not in t:
            t[c] = 0.5
    t[list(LATENT_COLUMNS)].to_parquet(tmp_path / "latents.parquet")
    SPEC.save(tmp_path / "behaviours.yaml")
    with open(tmp_path / "chats.jsonl", "w") as f:
        for c in CONVERSATIONS:
            f.write(json.dumps({"messages": c}) + "\n")
    args = ["scoreboard", "--crosscoder", f"L1={tmp_path / 'cc'}", "--latents", f"L1={tmp_path / 'latents.parquet'}",
            "--behaviours", str(tmp_path / "behaviours.yaml"), "--chats", str(tmp_path / "chats.jsonl"),
            "--out", str(tmp_path / "board.json"), "--base", base, "--chat", chat, "--layer", "1",
            "--n-directions", "2", "--alphas", "1", "--max-new-tokens", "3", "--tokens", "150", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    board = json.loads((tmp_path / "board.json").read_text())
    assert [m["name"] for m in board["methods"]] == ["L1_dnorm", "L1_dnorm_codes", "L1_nu", "L1_nu_codes", "L1_track",
                                                      "lens", "random"]
    assert board["methods"][0]["latents"] == [4, 2] and board["layer"] == 1
    assert (tmp_path / "board.lens.json").is_file() and (tmp_path / "board.lens.safetensors").is_file()
    assert all(f'"{m}": {{' in r.output for m in ("L1_dnorm", "L1_nu", "lens", "random"))  # the headline numbers
    # names that do not pair up, and a spec that is not one: one clear line each, no traceback
    r = CliRunner().invoke(app, args[:3] + ["--latents", f"BTK={tmp_path / 'latents.parquet'}"] + args[5:])
    assert r.exit_code == 2 and "must be the same" in r.output and "Traceback" not in r.output
    (tmp_path / "bad.yaml").write_text("behaviours: 3\n")
    r = CliRunner().invoke(app, args[:5] + ["--behaviours", str(tmp_path / "bad.yaml")] + args[7:])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
