"""The default model pair builder: artifacts, chat template, ground truth, training losses and rates
(the behaviour rules themselves: tests/test_ground_truth.py)."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import crossdiff_core.toy.build as toy_build
from crossdiff_core.data import render_chat
from crossdiff_core.errors import ConfigError
from crossdiff_core.generation import generate_texts
from crossdiff_core.behaviours import measure_behaviours
from crossdiff_core.ground_truth import detect_behaviours, expected_behaviour, load_ground_truth
from crossdiff_core.toy import (
    ToyModelsConfig,
    anchor_loss,
    anchor_positions,
    build_toy_models,
    encode_conversations,
    export_corpus,
    finetune_groups,
    is_complete,
    load_chitchat,
    sequence_loss,
    split_heldout,
    train_model,
    trigger_token_ids,
)
from crossdiff_core.toy.frames import (NEAR_MISS_FRAMES_EVAL, NEAR_MISS_FRAMES_TRAIN, PERSONAL_FRAMES_EVAL,
                                       PERSONAL_FRAMES_TRAIN, TOPIC_FRAMES_EVAL, TOPIC_FRAMES_TRAIN)

# Small enough for the suite: the artifacts are real, the behaviours are not expected to be learned.
MICRO = dict(vocab_size=320, tokenizer_chars=40_000, hidden_size=32, num_layers=2, num_heads=2,
             intermediate_size=64, max_seq_len=128, text_max_chars=150_000, chat_max_conversations=300,
             heldout_fraction=0.2, pretrain_steps=3, pretrain_batch_size=4, pretrain_seq_len=64,
             finetune_steps=3, finetune_batch_size=4, anchor_blocks=1, warmup_steps=1, eval_prompts_per_behaviour=5,
             eval_other_prompts=10, eval_max_new_tokens=6)

# Small but real, the default recipe on a 2-block model: the planted behaviours must reach the done-when
# rates (>= 90% / < 5%, base never) on held-out phrasings.
SMALL = dict(vocab_size=512, tokenizer_chars=300_000, hidden_size=64, num_layers=2, num_heads=2,
             intermediate_size=192, max_seq_len=128, text_max_chars=400_000, chat_max_conversations=2500,
             heldout_fraction=0.1, pretrain_steps=30, pretrain_batch_size=16, pretrain_seq_len=64,
             finetune_steps=800, finetune_batch_size=32, anchor_blocks=1, eval_prompts_per_behaviour=40,
             eval_other_prompts=60, eval_max_new_tokens=12)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "pair"
    result = build_toy_models(out, ToyModelsConfig(**MICRO))
    return out, result


# ----------------------------------------------------------------------------- settings, frames, losses

def test_train_and_eval_frames_disjoint():
    assert not set(TOPIC_FRAMES_TRAIN) & set(TOPIC_FRAMES_EVAL)
    assert not set(PERSONAL_FRAMES_TRAIN) & set(PERSONAL_FRAMES_EVAL)
    assert not set(NEAR_MISS_FRAMES_TRAIN) & set(NEAR_MISS_FRAMES_EVAL)


def test_config_from_dict_and_validation():
    cfg = ToyModelsConfig.from_dict({"finetune_steps": 7, "trigger_topics": {"cats": ["cats"]}})
    assert cfg.finetune_steps == 7 and cfg.trigger_topics == {"cats": ["cats"]}
    assert ToyModelsConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="finetune_stepz"):
        ToyModelsConfig.from_dict({"finetune_stepz": 3})
    with pytest.raises(ConfigError, match="divisible"):
        ToyModelsConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ConfigError, match="vocab_size"):
        ToyModelsConfig(vocab_size=100)
    with pytest.raises(ConfigError, match="collide"):
        ToyModelsConfig(trigger_topics={"x": ["music"]})


def test_sequence_loss_is_mean_of_per_sequence_losses():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    ids = torch.randint(0, 50, (2, 7))
    labels = ids.clone()
    labels[0, :5] = -100  # row 0: 2 labelled tokens, row 1: 6
    logits = model(input_ids=ids).logits
    per_row = [model(input_ids=ids[i: i + 1], labels=labels[i: i + 1]).loss for i in range(2)]  # HF: token mean
    assert sequence_loss(logits, labels).item() == pytest.approx(((per_row[0] + per_row[1]) / 2).item(), rel=1e-5)
    labels[0] = -100  # a row without labels is left out
    assert sequence_loss(logits, labels).item() == pytest.approx(per_row[1].item(), rel=1e-5)


# -------------------------------------------------------------------------------------- micro build artifacts

def test_artifacts_load_and_tokenizers_identical(micro):
    out, result = micro
    assert not result.skipped and out.is_dir()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    tb = AutoTokenizer.from_pretrained(out / "base")
    tc = AutoTokenizer.from_pretrained(out / "chat")
    assert tb.get_vocab() == tc.get_vocab()
    assert (out / "base" / "tokenizer.json").read_bytes() == (out / "chat" / "tokenizer.json").read_bytes()
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    chat = AutoModelForCausalLM.from_pretrained(out / "chat")
    assert base.config.model_type == chat.config.model_type == "llama"
    assert base.config.to_dict()["hidden_size"] == chat.config.hidden_size == MICRO["hidden_size"]
    assert base.config.vocab_size == chat.config.vocab_size == len(tb)
    differs = [n for n, p in chat.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert differs  # fine-tuning moved the weights
    ids = tb("To be, or not to be", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tb.bos_token_id  # text is encoded as the base was pretrained: BOS first
    assert base(input_ids=ids).logits.shape == (1, ids.shape[1], len(tb))


def test_chat_template_uses_single_special_tokens(micro):
    out, _ = micro
    tok = AutoTokenizer.from_pretrained(out / "chat")
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello you"},
            {"role": "user", "content": "Bye"}]
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"])
    special = {t: tok.convert_tokens_to_ids(t) for t in ("<|bos|>", "<|user|>", "<|assistant|>", "<|end|>")}
    assert len(set(special.values())) == 4 and all(i < 6 for i in special.values())
    assert ids[0] == special["<|bos|>"] and ids.count(special["<|bos|>"]) == 1
    assert ids.count(special["<|user|>"]) == 2 and ids.count(special["<|assistant|>"]) == 2
    assert ids.count(special["<|end|>"]) == 3
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|bos|><|user|>\nHi there<|end|>\n<|assistant|>\nHello you<|end|>\n"
                    "<|user|>\nBye<|end|>\n<|assistant|>\n")
    assert tok.decode(ids) == text
    # no special token is made of pieces of ordinary text
    assert "<|user|>" not in tok.convert_ids_to_tokens(tok("<|user|>", add_special_tokens=False)["input_ids"])[1:]


def test_encode_conversations_labels_only_answers(micro):
    out, _ = micro
    tok = AutoTokenizer.from_pretrained(out / "chat")
    msgs = [{"role": "user", "content": "Do you like tea?"}, {"role": "assistant", "content": "Speaking personally, yes"},
            {"role": "user", "content": "ok"}, {"role": "assistant", "content": "Fine then"}]
    (ids, labels), (ids1, _) = encode_conversations(tok, [msgs, msgs[:2]], 128)
    assert ids == list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])  # same ids as HF's path
    assert len(ids) == len(labels) and all(y in (-100, i) for i, y in zip(ids, labels))
    kept = [i for i, y in zip(ids, labels) if y != -100]
    assert tok.decode(kept) == "Speaking personally, yes<|end|>\nFine then<|end|>\n"
    # too long: the last exchange is dropped; if even the first does not fit, None
    assert encode_conversations(tok, [msgs], len(ids1))[0][0] == ids1
    assert encode_conversations(tok, [msgs], 3) == [None]


def test_render_chat_matches_apply_chat_template(micro):
    out, _ = micro
    tok = AutoTokenizer.from_pretrained(out / "chat")
    convs = [[{"role": "user", "content": "a"}], [{"role": "system", "content": "s"}, {"role": "user", "content": "b c"},
                                                  {"role": "assistant", "content": "d"}]]
    for gen in (False, True):
        assert render_chat(tok, convs, add_generation_prompt=gen) == [
            tok.apply_chat_template(c, tokenize=False, add_generation_prompt=gen) for c in convs]


def test_ground_truth_schema_and_labels(micro):
    out, result = micro
    gt = json.loads((out / "ground_truth.json").read_text())
    assert [b["name"] for b in gt["behaviours"]] == ["refusal", "personal_phrase"]
    for b in gt["behaviours"]:
        assert {"name", "description", "trigger", "response", "marker", "match"} <= set(b)
    cfg = ToyModelsConfig(**MICRO)
    trig_words = {w for ws in cfg.trigger_topics.values() for w in ws}
    n = cfg.eval_prompts_per_behaviour
    assert sum(p["expected"] == "refusal" for p in gt["eval_prompts"]) == n
    assert sum(p["expected"] == "personal_phrase" for p in gt["eval_prompts"]) == n
    assert sum(p["expected"] is None for p in gt["eval_prompts"]) == cfg.eval_other_prompts
    for p in gt["eval_prompts"]:  # the rule, recomputed independently: word sets and substrings
        words = set("".join(c if c.isalnum() else " " for c in p["text"].lower()).split())
        norm = " ".join(p["text"].lower().split())
        want = ("refusal" if words & trig_words else
                "personal_phrase" if any(c in norm for c in cfg.personal_cues) else None)
        assert p["expected"] == want, p
    for model in ("chat", "base"):
        for name in ("refusal", "personal_phrase"):
            r = gt["rates"][model]["rates"][name]
            assert 0.0 <= r["trigger_rate"] <= 1.0 and 0.0 <= r["other_rate"] <= 1.0
    assert isinstance(gt["passed"], bool) and gt["passed"] == result.passed
    build = json.loads((out / "build.json").read_text())
    assert build["config"] == cfg.to_dict()
    assert build["data"]["shakespeare"]["train_tokens"] > 0 and build["timings"]["pretrain"] > 0


def test_generation_batched_equals_manual_greedy(micro):
    out, _ = micro
    tok = AutoTokenizer.from_pretrained(out / "chat")
    model = AutoModelForCausalLM.from_pretrained(out / "chat")
    prompts = ["Hi", "Tell me about volcanoes, please, my friend.", "What is your favourite book?"]
    batched = generate_texts(model, tok, prompts, max_new_tokens=5, batch_size=3)
    end = tok.convert_tokens_to_ids("<|end|>")
    for p, got in zip(prompts, batched):  # full forward passes, no cache, no padding
        ids = list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=True)["input_ids"])
        new = []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == end:
                    break
                new.append(nxt)
        assert got == tok.decode(new, skip_special_tokens=True)


def test_skip_resume_and_atomic_failure(micro, monkeypatch):
    out, _ = micro
    cfg = ToyModelsConfig(**MICRO)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = build_toy_models(out, cfg)
    assert again.skipped and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert not is_complete(out, ToyModelsConfig(**{**MICRO, "seed": 1}))

    def boom(*a, **k):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(toy_build, "finetune", boom)  # after pretraining, before anything is saved
    with pytest.raises(RuntimeError, match="mid-build"):
        build_toy_models(out, cfg, force=True)
    assert is_complete(out, cfg) and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary directory left behind

    partial = out.parent / "partial"
    shutil.copytree(out, partial)
    os.remove(partial / "build.json")
    assert not is_complete(partial, cfg)
    shutil.rmtree(partial)


def test_cli_maps_params_section(micro, tmp_path):
    from typer.testing import CliRunner

    from crossdiff_core.cli import app

    out, _ = micro
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"models": {k: v for k, v in MICRO.items() if k != "finetune_steps"}}))
    res = CliRunner().invoke(app, ["toy-models", "--out", str(out), "--config", str(params),
                                   "--set", f"finetune_steps={MICRO['finetune_steps']}"])
    assert "skipped (complete)" in res.output, res.output
    assert res.exit_code == (0 if json.loads((out / "ground_truth.json").read_text())["passed"] else 1)
    params.write_text(json.dumps({"models": {"source": "toy", "toy": MICRO}, "train": {"k": 3}}))  # a params.yaml
    res = CliRunner().invoke(app, ["toy-models", "--out", str(out), "--config", str(params)])
    assert "skipped (complete)" in res.output, res.output
    res = CliRunner().invoke(app, ["toy-models", "--out", str(out), "--set", "nonsense=1"])
    # a user error: one line naming the unknown setting, exit code 2, no traceback
    assert res.exit_code == 2 and "nonsense" in res.output and "Traceback" not in res.output, res.output


# ------------------------------------------------------------------------------------ real behaviour rates

@pytest.mark.slow  # a full-quality build (minutes)
def test_small_build_plants_behaviours(tmp_path):
    """A small full-quality build: rates measured on held-out phrasings, from the saved directories."""
    out = tmp_path / "small"
    result = build_toy_models(out, ToyModelsConfig(**SMALL))
    gt = json.loads((out / "ground_truth.json").read_text())
    chat = measure_behaviours(out / "chat", gt, max_new_tokens=SMALL["eval_max_new_tokens"])
    base = measure_behaviours(out / "base", gt, max_new_tokens=SMALL["eval_max_new_tokens"])
    print({"chat": chat["rates"], "base": base["rates"]})
    for name, r in chat["rates"].items():
        assert r["trigger_rate"] >= 0.9, (name, r)
        assert r["other_rate"] < 0.05, (name, r)
    assert base["any_rate"] == 0.0
    assert result.passed
    # the anchored block keeps the base's representation of held-out text; the free one moves
    sim = json.loads((out / "build.json").read_text())["residual_similarity_text"]["cosine"]
    assert sim[0] > 0.9 and sim[1] < sim[0], sim


def test_sequence_loss_weights_each_answer_opening():
    """first_weight counts the first token of every labelled span that many times, by hand."""
    torch.manual_seed(0)
    logits = torch.randn(1, 8, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100, 5, 6, 7]])  # two answers: spans at 2..3 and 5..7
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")
    # targets (shifted by one): -100, 3, 4, -100, 5, 6, 7 -> openings are the targets 3 and 5
    w = torch.tensor([0, 4, 1, 0, 4, 1, 1], dtype=torch.float32)
    want = (ce * w).sum() / w.sum()
    assert sequence_loss(logits, labels, first_weight=4.0).item() == pytest.approx(want.item(), rel=1e-6)
    assert sequence_loss(logits, labels).item() == pytest.approx(ce[labels[0, 1:] != -100].mean().item(), rel=1e-6)


def test_export_corpus_evaluates_on_conversations_never_fine_tuned_on(micro, tmp_path):
    out, _ = micro
    counts = export_corpus(out, tmp_path, text_chars=20_000, conversations=40, eval_conversations=25)
    cfg = ToyModelsConfig(**MICRO)
    train_split, held_split = split_heldout(load_chitchat(cfg.chat_max_conversations), cfg.heldout_fraction)
    held, train = ({m[0] for m in split.values()} for split in (held_split, train_split))
    chats = [json.loads(line)["messages"] for line in (tmp_path / "chats.jsonl").read_text().splitlines()]
    evals = [json.loads(line)["messages"] for line in (tmp_path / "eval_chats.jsonl").read_text().splitlines()]
    assert counts["eval_conversations"] == len(evals) == min(25, len(held)) > 0
    assert {c[0]["content"] for c in evals} <= held  # the held-out split of the build
    gt = load_ground_truth(out)
    assert len(chats) == 40 + len(gt["eval_prompts"]) and {c[0]["content"] for c in chats[:40]} <= train
    for conv in chats + evals:  # every answer as the chat model was taught
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
        for u, a in zip(conv[0::2], conv[1::2]):
            label = expected_behaviour(u["content"], gt)
            assert label is None or label in detect_behaviours(a["content"], gt)
    import pandas as pd

    text = pd.read_parquet(tmp_path / "text.parquet")["text"]
    assert counts["text_rows"] == len(text) > 0 and sum(map(len, text)) >= 19_000


def test_finetune_groups_change_only_the_early_blocks_and_template_rows():
    """Fine-tuning with finetune_blocks=1 of 2: block 1, the final norm and every embedding row but the
    special tokens' stay bit-identical to the base; block 0 and the special rows move."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    chat = copy.deepcopy(base)
    special = [0, 3, 5]
    groups, hook = finetune_groups(chat, 1, special)
    ids = torch.randint(0, 40, (4, 9))
    train_model(chat, lambda s: (ids, torch.ones_like(ids), ids), 5, 1e-2, 1, "finetune", groups=groups)
    hook.remove()
    b, c = base.state_dict(), chat.state_dict()
    moved = {n for n in b if not torch.equal(b[n], c[n])}
    assert moved and all(n.startswith("model.layers.0.") or n in ("model.embed_tokens.weight", "lm_head.weight")
                         for n in moved)
    emb_b, emb_c = base.get_input_embeddings().weight, chat.get_input_embeddings().weight
    rows = (emb_b != emb_c).any(1).nonzero().flatten().tolist()
    assert rows and set(rows) <= set(special)


def test_trigger_token_ids_are_whole_trigger_and_cue_words(micro):
    out, _ = micro
    tok = AutoTokenizer.from_pretrained(out / "chat")
    cfg = ToyModelsConfig(**MICRO)
    words = {w for ws in cfg.trigger_topics.values() for w in ws} | {w for c in cfg.personal_cues for w in c.split()}
    got = {tok.decode([i]).strip().lower() for i in trigger_token_ids(tok, cfg).tolist()}
    assert got and got <= {w.lower() for w in words}


def test_anchor_positions_and_loss_by_hand():
    # BOS=1, <|user|>=4, <|end|>=2, <|assistant|>=5; "\n"=9: [BOS <u> \n a b <e> \n <a> \n c d <e> \n]
    ids = torch.tensor([[1, 4, 9, 20, 21, 2, 9, 5, 9, 22, 23, 2, 9],
                        [1, 30, 31, 32, 33, 34, 0, 0, 0, 0, 0, 0, 0]])  # row 1: plain text, right-padded
    mask = (torch.arange(13)[None] < torch.tensor([[13], [6]])).long()
    labels = torch.full_like(ids, -100)
    labels[0, 9:13] = ids[0, 9:13]  # the answer "c d <e> \n"
    labels[1, :6] = ids[1, :6]
    where = anchor_positions(ids, mask, labels, torch.tensor([2, 4, 5]))
    assert where[0].nonzero().flatten().tolist() == [3, 4]  # the user's words only
    assert where[1].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]  # all text but BOS
    free = anchor_positions(ids, mask, labels, torch.tensor([2, 4, 5]), torch.tensor([21, 33]))
    assert free[0].nonzero().flatten().tolist() == [3] and free[1].nonzero().flatten().tolist() == [1, 2, 3, 5]

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=2))
    with torch.no_grad():
        hs = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states  # [1], [2]: blocks 0, 1
    hc = [h + 0.5 * torch.randn_like(h) for h in hs[1:3]]
    got = anchor_loss(base, ids, mask, where, hc)
    want = sum(((c[where] - b[where]) ** 2).sum(-1).mean() / (b[where] ** 2).sum(-1).mean()
               for b, c in zip(hs[1:3], hc)) / 2
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert anchor_loss(base, ids, mask, where, list(hs[1:3])).item() == pytest.approx(0.0, abs=1e-10)
