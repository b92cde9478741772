"""Steering and behaviour tracking (crossdiff_core.steering), checked against independent computations."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch

from crossdiff_core.behaviour_tracking import auroc, behaviour_tracking, prompt_max_activations, select_latents
from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.generation import generate_texts
from crossdiff_core.headlines import steering_headline
from crossdiff_core.models import decoder_layers, load_pair, residual_stream
from crossdiff_core.steering import (SteerConfig, behaviour_effects, first_user_turns, run_steering, steering,
                                     steering_kl, steering_vectors)
from tests.test_models import save_model, tiny_config

LAYER = 1
PROMPTS = ["Tell me about volcanoes.", "What is your favourite food?", "hello there", "Is chess hard?",
           "Do you like music?", "the weather is nice"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny random pair with the default pair's tokenizer and chat template, and a random crosscoder."""
    from crossdiff_core.toy import ToyModelsConfig, make_ground_truth, train_tokenizer

    root = tmp_path_factory.mktemp("steer")
    tok = train_tokenizer(PROMPTS * 20 + ["I cannot help with that topic.", "Speaking personally, "], 300, 128)
    cfg = tiny_config("llama", len(tok))
    cfg.bos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.pad_token_id
    cfg.eos_token_id = tok.convert_tokens_to_ids("<|end|>")
    pair = load_pair(save_model(root / "base", cfg, tok, 1), save_model(root / "chat", cfg, tok, 2), layer=LAYER,
                     dtype="float32")
    cc = CrossCoder(CrossCoderConfig(kind="l1", d_model=pair.d_model, dict_size=40, init_norm=0.5),
                    scales=torch.tensor([1.5, 2.5]), seed=4)
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    gt = make_ground_truth(ToyModelsConfig())
    return pair, cc, gt


def _table(F: int) -> pd.DataFrame:
    cls = np.array(["chat_only", "shared", "base_only", "other"])[np.arange(F) % 4]
    return pd.DataFrame({"latent": np.arange(F), "class": cls, "max_act": np.linspace(0.5, 2.0, F),
                         "nu_rank": np.arange(F, 0, -1).astype(float)})


def test_vector_is_scaled_chat_decoder_row(toy):
    pair, cc, _ = toy
    v = steering_vectors(cc, [3, 7], [2.0, 0.5], model="base")
    torch.testing.assert_close(v[0], 2.0 * 1.5 * cc.W_dec[1, 3].detach())
    torch.testing.assert_close(v[1], 0.5 * 1.5 * cc.W_dec[1, 7].detach())
    torch.testing.assert_close(steering_vectors(cc, [3], [2.0], model="chat")[0], 2.0 * 2.5 * cc.W_dec[1, 3].detach())


def test_hook_adds_vector_at_every_position(toy):
    pair, cc, _ = toy
    ids = torch.tensor([[pair.tokenizer.bos_token_id, 20, 21, 22, 23]])
    vec = torch.randn(pair.d_model)
    captured = []
    with steering(pair.chat, LAYER, 1.5 * vec):
        h = decoder_layers(pair.chat)[LAYER].register_forward_hook(lambda m, a, o: captured.append(o))
        try:
            with torch.no_grad():
                pair.chat(ids)
        finally:
            h.remove()
    ref = residual_stream(pair.chat, ids, layer=LAYER)
    out = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
    torch.testing.assert_close(out, ref + 1.5 * vec, atol=1e-5, rtol=1e-5)
    # the hook is gone after the block
    torch.testing.assert_close(residual_stream(pair.chat, ids, layer=LAYER), ref, atol=0, rtol=0)


def test_zero_coefficient_reproduces_unsteered_generation_exactly(toy):
    pair, cc, _ = toy
    vec = steering_vectors(cc, [5], [3.0], model="base")[0]
    plain = generate_texts(pair.base, pair.tokenizer, PROMPTS, max_new_tokens=12, batch_size=4)
    with steering(pair.base, LAYER, 0.0 * vec):
        zero = generate_texts(pair.base, pair.tokenizer, PROMPTS, max_new_tokens=12, batch_size=4)
    with steering(pair.base, LAYER, 40.0 * vec):
        big = generate_texts(pair.base, pair.tokenizer, PROMPTS, max_new_tokens=12, batch_size=4)
    assert zero == plain
    assert big != plain  # the hook does act on generation
    ids = torch.tensor([pair.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                                                           add_generation_prompt=True, tokenize=True)["input_ids"]])
    with torch.no_grad():
        ref = pair.base.generate(input_ids=ids, max_new_tokens=10, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=pair.tokenizer.pad_token_id)
        with steering(pair.base, LAYER, 0.0 * vec):
            got = pair.base.generate(input_ids=ids, max_new_tokens=10, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=pair.tokenizer.pad_token_id)
    assert torch.equal(ref.sequences, got.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, got.logits))


def test_steering_kl_matches_full_forwards(toy):
    pair, cc, _ = toy
    vec = steering_vectors(cc, [2], [2.0], model="chat")[0]
    alphas = [0.0, 1.0, -2.0]
    kl_mean, kl_last = steering_kl(pair.chat, pair.tokenizer, PROMPTS, LAYER, torch.stack([a * vec for a in alphas]),
                                   batch_size=8)
    assert kl_mean[0] == 0.0 and kl_last[0] == 0.0
    for k, a in enumerate(alphas[1:], start=1):
        tot, n, last = 0.0, 0, 0.0
        for p in PROMPTS:  # one prompt at a time: no padding involved
            ids = torch.tensor([pair.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                                   add_generation_prompt=True, tokenize=True)["input_ids"]])
            with torch.no_grad():
                lp = torch.log_softmax(pair.chat(ids).logits[0], -1)
                with steering(pair.chat, LAYER, a * vec):
                    lq = torch.log_softmax(pair.chat(ids).logits[0], -1)
            kl = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
            tot, n, last = tot + float(kl.sum()), n + kl.numel(), last + float(kl[-1])
        assert kl_mean[k] == pytest.approx(tot / n, rel=1e-4)
        assert kl_last[k] == pytest.approx(last / len(PROMPTS), rel=1e-4)
        assert kl_mean[k] > 0


def test_auroc_against_pairwise_count():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(9, 5)).astype(float)  # many ties
    pos = np.array([1, 0, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    want = []
    for f in range(5):
        pairs = list(itertools.product(scores[pos, f], scores[~pos, f]))
        want.append(sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs))
    np.testing.assert_allclose(auroc(scores, pos), want)
    assert np.isnan(auroc(scores, np.zeros(9, dtype=bool))).all()


def test_prompt_max_activations_brute_force(toy):
    pair, cc, gt = toy
    got = prompt_max_activations(pair, cc, PROMPTS, batch_size=4)
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([pair.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                               add_generation_prompt=True, tokenize=True)["input_ids"]])
        h_b, h_c = pair.residuals(ids)
        f = cc.encode(torch.stack([h_b[0, 1:], h_c[0, 1:]], 1))  # BOS (position 0) excluded
        torch.testing.assert_close(got[i], f.max(0).values, atol=1e-5, rtol=1e-5)
    prompts = [{"text": p, "expected": e} for p, e in zip(PROMPTS, ["refusal", "personal_phrase", None, "refusal",
                                                                    "personal_phrase", None])]
    tr = behaviour_tracking(pair, cc, gt, prompts, batch_size=4)
    pos = np.array([p["expected"] == "refusal" for p in prompts])
    np.testing.assert_allclose(tr["auroc_refusal"], auroc(got.numpy(), pos))
    np.testing.assert_allclose(tr["mean_act_refusal"], got.numpy()[pos].mean(0), rtol=1e-6)


def test_select_latents():
    table = _table(16)  # chat-only: 0, 4, 8, 12 (ν rank 16, 12, 8, 4); shared: 1, 5, 9, 13; base-only 2, ...; other 3, ...
    tracking = pd.DataFrame({"latent": np.arange(16), "auroc_refusal": np.linspace(0, 1, 16)})
    got = select_latents(table, n_top=2, n_shared=1, tracking=tracking, n_tracking=3, seed=0)
    assert got[:2] == [12, 8]  # lowest ν rank first
    # then the best trackers over every class (15 other, 14 base-only, 13 shared); the best chat-only one (12) is in
    assert got[2:5] == [15, 14, 13]
    assert len(got) <= 6 and set(got[5:]) <= {1, 5, 9}  # a shared control not chosen yet


def test_run_steering_with_ground_truth(toy):
    pair, cc, gt = toy
    table = _table(40)
    prompts = [{"text": p, "expected": e} for p, e in zip(PROMPTS, ["refusal", "personal_phrase", None, "refusal",
                                                                    "personal_phrase", None])]
    res = run_steering(pair, cc, table, [0, 5], prompts,
                       SteerConfig(alphas=(0.0, 8.0), max_new_tokens=6, batch_size=8, n_examples=3, progress=False),
                       behaviours=gt)
    assert [lat["latent"] for lat in res["latents"]] == [0, 5]
    assert [b["name"] for b in res["behaviours"]] == ["refusal", "personal_phrase"]
    for lat in res["latents"]:
        runs = {(r["model"], r["alpha"]): r for r in lat["runs"]}
        assert set(runs) == {("base", 0.0), ("base", 8.0), ("chat", 0.0), ("chat", 8.0)}
        for m in ("base", "chat"):
            assert runs[(m, 0.0)]["kl_mean"] == 0.0
            assert runs[(m, 0.0)]["examples"] == res["baseline"][m]["examples"]  # a = 0 is the unsteered model
            assert runs[(m, 0.0)]["rates"] == res["baseline"][m]["rates"]
            assert runs[(m, 8.0)]["kl_mean"] > 0
            assert set(runs[(m, 8.0)]["rates"]["rates"]) == {"refusal", "personal_phrase"}
    eff = behaviour_effects(res, "refusal")
    assert len(eff) == 4 and set(eff["alpha"]) == {0.0, 8.0}
    assert (eff.loc[eff["alpha"] == 0.0, "rise"] == 0).all()


def _rates(trigger, other, onset_trigger, onset_other):
    return {"rates": {"refusal": {"trigger_rate": trigger, "other_rate": other, "onset_trigger_rate": onset_trigger,
                                  "onset_other_rate": onset_other, "n_trigger": 10, "n_other": 20}}}


def _sweep(runs: dict[int, list[tuple[float, dict]]]) -> dict:
    return {"has_ground_truth": True, "seconds": 1.0,
            "baseline": {"base": {"rates": _rates(0.1, 0.0, 0.2, 0.0)}},
            "latents": [{"latent": j, "class": "chat_only", "runs": [{"model": "base", "alpha": a, "rates": r,
                                                                       "kl_mean": 0.0} for a, r in rr]}
                        for j, rr in runs.items()]}


def test_headline_names_a_best_run_only_where_the_behaviour_rose():
    flat = _sweep({3: [(1.0, _rates(0.1, 0.0, 0.2, 0.0)), (2.0, _rates(0.0, 0.0, 0.1, 0.0))],
                   7: [(1.0, _rates(0.1, 0.0, 0.2, 0.0))]})
    h = steering_headline(flat)
    assert h["latents"] == 2 and h["base_refusal_raised_by"] == 0 and h["base_refusal_onset_raised_by"] == 0
    assert "base_refusal_best" not in h and "base_refusal_onset_best" not in h

    # latent 7 raises the whole refusal most (0.1 -> 0.6 at a = 3); latents 3 and 7 both raise its onset,
    # latent 3 most (0.2 -> 0.9 at a = 2)
    up = _sweep({3: [(1.0, _rates(0.3, 0.05, 0.5, 0.1)), (2.0, _rates(0.1, 0.0, 0.9, 0.2))],
                 7: [(1.0, _rates(0.2, 0.0, 0.3, 0.0)), (3.0, _rates(0.6, 0.1, 0.6, 0.1))]})
    h = steering_headline(up)
    assert h["base_refusal_raised_by"] == 2 and h["base_refusal_onset_raised_by"] == 2
    assert h["base_refusal_best"] == {"latent": 7, "class": "chat_only", "alpha": 3.0, "trigger_rate": 0.6,
                                      "unsteered": 0.1, "other_rate": 0.1}
    assert h["base_refusal_onset_best"] == {"latent": 3, "class": "chat_only", "alpha": 2.0, "onset_trigger_rate": 0.9,
                                            "unsteered": 0.2, "onset_other_rate": 0.2}


def test_first_user_turns_of_chat_data(tmp_path):
    convs = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "second turn"}],
             [{"role": "assistant", "content": "no user turn"}],
             [{"role": "user", "content": "what is a volcano?"}, {"role": "assistant", "content": "a mountain"}]]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"conversation": c}) + "\n" for c in convs))
    got = first_user_turns([str(tmp_path / "c.jsonl")], "conversation", n=5)
    assert got == [{"text": "hi there", "expected": None}, {"text": "what is a volcano?", "expected": None}]
    assert first_user_turns([str(tmp_path / "c.jsonl")], "conversation", n=1) == got[:1]


def test_tracking_and_steering_take_a_behaviour_spec(toy):
    from crossdiff_core.behaviours import BehaviourSpec

    pair, cc, _ = toy
    spec = BehaviourSpec.from_dict({"behaviours": [
        {"name": "volcano", "answer": {"contains": "lava"}, "trigger_prompts": [PROMPTS[0], PROMPTS[3]]},
        {"name": "taste", "answer": {"startswith": "Yum"}, "trigger_prompts": [PROMPTS[1]]}],
        "other_prompts": [PROMPTS[2], PROMPTS[4], PROMPTS[5]]})
    tr = behaviour_tracking(pair, cc, spec, batch_size=4)  # on the spec's own prompts
    acts = prompt_max_activations(pair, cc, [p["text"] for p in spec.prompts()], batch_size=4).numpy()
    for name in spec.names:
        pos = np.array([p["expected"] == name for p in spec.prompts()])
        np.testing.assert_allclose(tr[f"auroc_{name}"], auroc(acts, pos))
    assert [c for c in tr.columns if c.startswith("auroc_")] == ["auroc_volcano", "auroc_taste"]
    res = run_steering(pair, cc, _table(40), [0], spec.prompts(),
                       SteerConfig(alphas=(4.0,), max_new_tokens=4, batch_size=8, n_examples=2, progress=False),
                       behaviours=spec, chosen_for={0: ["nu_rank"]})
    assert [b["name"] for b in res["behaviours"]] == ["volcano", "taste"] and res["latents"][0]["chosen_for"] == ["nu_rank"]
    for m in ("base", "chat"):
        rates = res["baseline"][m]["rates"]["rates"]
        assert (rates["volcano"]["n_trigger"], rates["taste"]["n_trigger"], rates["taste"]["n_other"]) == (2, 1, 5)
    h = steering_headline(res)
    assert {"base_volcano_raised_by", "base_taste_raised_by", "chat_volcano_raised_by", "chat_taste_onset_raised_by"} <= set(h)
