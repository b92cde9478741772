"""Data loading, chat masks and the token budget (crossdiff_core.data)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from crossdiff_core.data import DataConfig, build_corpus, corpus_hash, load_source, tokenize_chat, tokenize_text
from crossdiff_core.errors import ConfigError
from tests.test_models import build_tokenizer

CONV = [
    {"role": "user", "content": "user?"},  # content that repeats the role name
    {"role": "assistant", "content": " ok "},  # the template trims it
    {"role": "user", "content": "é"},  # two byte-level tokens
    {"role": "assistant", "content": "no"},
]
# Written by hand from the template "<bos>{<start_of_turn>ROLE\nCONTENT|trim<end_of_turn>\n}" and a
# tokenizer with one token per byte: (tokens, is_template, is_assistant) runs.
EXPECTED_RUNS = [
    (1, 1, 0),  # <bos>
    (1, 1, 0), (4, 1, 0), (1, 1, 0),  # <start_of_turn> u s e r \n
    (5, 0, 0),  # u s e r ?   (content, not template, although it spells the role name)
    (1, 1, 0), (1, 1, 0),  # <end_of_turn> \n
    (1, 1, 0), (9, 1, 0), (1, 1, 0),  # <start_of_turn> a s s i s t a n t \n
    (2, 0, 1),  # o k
    (1, 1, 1),  # <end_of_turn> closing the assistant turn counts as assistant
    (1, 1, 0),  # \n
    (1, 1, 0), (4, 1, 0), (1, 1, 0),  # <start_of_turn> u s e r \n
    (2, 0, 0),  # é as two bytes
    (1, 1, 0), (1, 1, 0),  # <end_of_turn> \n
    (1, 1, 0), (9, 1, 0), (1, 1, 0),  # <start_of_turn> assistant \n
    (2, 0, 1),  # n o
    (1, 1, 1),  # <end_of_turn>
    (1, 1, 0),  # \n
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(0)


def test_chat_masks_match_hand_written(tok):
    seq = tokenize_chat(tok, CONV)
    is_template = np.concatenate([np.full(n, t, dtype=bool) for n, t, _ in EXPECTED_RUNS])
    is_assistant = np.concatenate([np.full(n, a, dtype=bool) for n, _, a in EXPECTED_RUNS])
    assert len(seq) == len(is_template) == 54
    assert tok.decode(seq.token_ids.tolist()) == tok.apply_chat_template(CONV, tokenize=False)
    assert seq.token_ids.tolist() == list(tok.apply_chat_template(CONV, tokenize=True)["input_ids"])
    np.testing.assert_array_equal(seq.is_template, is_template)
    np.testing.assert_array_equal(seq.is_assistant, is_assistant)
    np.testing.assert_array_equal(seq.cached, np.arange(54) > 0)  # only BOS is not cached
    assert seq.source == "chat"


def test_chat_masks_with_merged_tokens():
    tok = build_tokenizer(n_merges=60)
    conv = [{"role": "user", "content": "the question about the weather"},
            {"role": "assistant", "content": "the answer was sunny"}]
    seq = tokenize_chat(tok, conv)
    assert len(seq) < len(tok.apply_chat_template(conv, tokenize=False))  # merges happened
    content = seq.token_ids[~seq.is_template].tolist()
    assert tok.decode(content) == "the question about the weatherthe answer was sunny"
    asst = seq.token_ids[seq.is_assistant].tolist()
    assert tok.decode(asst) == "the answer was sunny<end_of_turn>"


def test_chat_truncated_to_max_length(tok):
    seq = tokenize_chat(tok, CONV, max_length=10)
    full = tokenize_chat(tok, CONV)
    assert len(seq) == 10
    np.testing.assert_array_equal(seq.token_ids, full.token_ids[:10])
    np.testing.assert_array_equal(seq.is_template, full.is_template[:10])


def test_template_that_rewrites_content_is_refused():
    tok = build_tokenizer(0)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="changes the content"):
        tokenize_chat(tok, [{"role": "user", "content": "hi"}])


def test_bad_messages_are_refused(tok):
    with pytest.raises(ConfigError, match="role"):
        tokenize_chat(tok, [{"role": "user", "text": "hi"}])
    with pytest.raises(ConfigError, match="non-empty list"):
        tokenize_chat(tok, [])


def test_text_is_chunked_with_bos(tok):
    doc = "to be or not to be, " * 10  # 200 byte tokens
    seqs = list(tokenize_text(tok, [doc], max_length=64))
    ids = tok(doc, add_special_tokens=False)["input_ids"]
    assert [len(s) for s in seqs] == [64, 64, 64, 200 - 3 * 63 + 1]
    assert all(s.token_ids[0] == tok.bos_token_id and not s.cached[0] and s.cached[1:].all() for s in seqs)
    assert np.concatenate([s.token_ids[1:] for s in seqs]).tolist() == ids
    assert not any(s.is_template.any() or s.is_assistant.any() for s in seqs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    words = ["the", "user", "asked", "a", "question", "about", "weather", "sunny", "world", "hello"]
    texts = [" ".join(rng.choice(words, size=rng.integers(5, 40))) for _ in range(40)]
    pd.DataFrame({"text": texts, "id": range(40)}).to_parquet(root / "text.parquet")
    with open(root / "chats.jsonl", "w") as f:
        for i in range(30):
            conv = [{"role": "user", "content": " ".join(rng.choice(words, size=4))},
                    {"role": "assistant", "content": " ".join(rng.choice(words, size=6))}]
            f.write(json.dumps({"messages": conv}) + "\n")
    return root


def test_budget_and_mix_are_exact(tok, files):
    cfg = DataConfig(text=str(files / "text.parquet"), chats=str(files / "chats.jsonl"), n_tokens=1000,
                     max_length=48, text_fraction=0.3, seed=1)
    corpus = build_corpus(tok, cfg)
    per_kind = {k: sum(s.n_cached for s in corpus.sequences if s.source == k) for k in ("text", "chat")}
    assert per_kind == {"text": 300, "chat": 700}
    assert corpus.n_tokens == 1000
    assert max(len(s) for s in corpus.sequences) <= 48
    assert {s.source for s in corpus.sequences[:20]} == {"text", "chat"}  # kinds are mixed, not in blocks
    assert [src["kind"] for src in corpus.sources] == ["text", "chat"]
    assert corpus.sources[0]["rows"] == 40 and corpus.sources[1]["rows"] == 30
    # every chat sequence is the template rendering of one conversation from the file (or its prefix)
    convs = [json.loads(line)["messages"] for line in open(files / "chats.jsonl")]
    rendered = {tok.apply_chat_template(c, tokenize=False) for c in convs}
    for s in corpus.sequences:
        if s.source == "chat":
            text = tok.decode(s.token_ids.tolist())
            assert any(r.startswith(text) for r in rendered)


def test_corpus_is_deterministic_and_seeded(tok, files):
    cfg = dict(text=str(files / "text.parquet"), chats=str(files / "chats.jsonl"), n_tokens=600, max_length=32)
    a = corpus_hash(build_corpus(tok, DataConfig(**cfg, seed=3)))
    b = corpus_hash(build_corpus(tok, DataConfig(**cfg, seed=3)))
    c = corpus_hash(build_corpus(tok, DataConfig(**cfg, seed=4)))
    assert a == b != c


def test_single_kind_takes_whole_budget(tok, files):
    corpus = build_corpus(tok, DataConfig(chats=str(files / "chats.jsonl"), n_tokens=250, text_fraction=0.5))
    assert corpus.n_tokens == 250 and {s.source for s in corpus.sequences} == {"chat"}


def test_short_data_warns_and_keeps_all(tok, files):
    with pytest.warns(UserWarning, match="ran out"):
        corpus = build_corpus(tok, DataConfig(chats=str(files / "chats.jsonl"), n_tokens=10**7))
    assert len(corpus.sequences) == 30


def test_from_dict_and_validation(files):
    cfg = DataConfig.from_dict({"text": str(files / "text.parquet"), "n_tokens": 100, "max_length": 16})
    assert cfg.text == [str(files / "text.parquet")] and cfg.chats == []
    with pytest.raises(ConfigError, match="unknown data settings"):
        DataConfig.from_dict({"text": "x", "max_len": 3})
    with pytest.raises(ConfigError, match="max_length"):
        DataConfig(text="x", max_length=1)
    with pytest.raises(ConfigError, match="text_fraction"):
        DataConfig(text="x", text_fraction=1.5)
    with pytest.raises(ConfigError, match="no data"):
        DataConfig()


def test_source_errors(tok, files, tmp_path):
    with pytest.raises(ConfigError, match="no 'messages' column"):
        build_corpus(tok, DataConfig(chats=str(files / "text.parquet"), n_tokens=10))
    with pytest.raises(ConfigError, match="cannot load dataset"):
        load_source(str(tmp_path / "no-such-dataset"))
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(ConfigError, match="parquet"):
        load_source(str(tmp_path / "x.xlsx"))
