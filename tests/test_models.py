"""Paired model loading, pair checks and the truncated residual read (crossdiff_core.models).

Also holds the tiny tokenizer/model builders that test_data.py and test_caching.py import.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crossdiff_core.errors import ConfigError, ModelMismatchError
from crossdiff_core.models import decoder_layers, load_pair, residual_stream

SPECIALS = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
# Gemma-style: role names are plain text inside the template, the turn markers are special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


CORPUS = [
    "the user asked the assistant a question about the weather and the answer was sunny",
    "hello world, this is a small corpus for a tiny byte level tokenizer",
    "to be or not to be, that is the question",
]


def build_tokenizer(n_merges: int = 0, *, corpus: list[str] | None = None, specials: list[str] | None = None):
    """Byte-level BPE wrapped in PreTrainedTokenizerFast. `n_merges=0`: one token per byte (predictable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = specials or SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + 256 + n_merges, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<end_of_turn>",
                                   pad_token="<pad>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 32, layers: int = 4):
    from transformers import Gemma2Config, LlamaConfig

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=4, pad_token_id=2)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "gemma2":
        return Gemma2Config(**common, head_dim=hidden // 4, sliding_window=8, query_pre_attn_scalar=hidden // 4,
                            attn_implementation="eager")
    raise ValueError(arch)


def save_model(path: Path, config, tokenizer, seed: int) -> str:
    """Random-weight causal LM from `config`, saved with its tokenizer; returns the directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # default init is tiny; larger weights make the blocks do visible work
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_pair_dirs(root: Path, arch: str = "llama", *, n_merges: int = 0, hidden: int = 32, layers: int = 4):
    """Base and chat directories: same architecture and tokenizer, different random weights."""
    tok = build_tokenizer(n_merges)
    cfg = tiny_config(arch, len(tok), hidden=hidden, layers=layers)
    return save_model(root / f"{arch}-base", cfg, tok, 1), save_model(root / f"{arch}-chat", cfg, tok, 2), tok


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    return make_pair_dirs(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 0.0)])
def test_residual_equals_output_hidden_states(tmp_path, arch, dtype, atol):
    base_dir, chat_dir, tok = make_pair_dirs(tmp_path, arch)
    layer = 1
    pair = load_pair(base_dir, chat_dir, layer=layer, dtype=dtype, device="cpu")
    ids = torch.tensor([tok("<bos>to be or not to be, that is the question")["input_ids"]])
    assert ids[0, 0].item() == tok.bos_token_id
    got_b, got_c = pair.residuals(ids)
    for model, got in ((pair.base, got_b), (pair.chat, got_c)):
        with torch.no_grad():
            ref = model(ids, output_hidden_states=True).hidden_states[layer + 1]
        assert got.dtype == ref.dtype and got.shape == ref.shape == (1, ids.shape[1], 32)
        torch.testing.assert_close(got, ref, atol=atol, rtol=atol)
    assert not torch.allclose(got_b.float(), got_c.float(), atol=1e-2)  # different weights, different activations


def test_later_blocks_are_not_computed(llama_dirs):
    base_dir, chat_dir, tok = llama_dirs
    pair = load_pair(base_dir, chat_dir, layer=1, dtype="float32")
    calls = []
    handles = [blk.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, blk in enumerate(decoder_layers(pair.base))]
    head = pair.base.lm_head.register_forward_hook(lambda m, a, o: calls.append("head"))
    try:
        residual_stream(pair.base, torch.tensor([[0, 5, 6, 7]]), layer=1)
    finally:
        for h in handles + [head]:
            h.remove()
    assert calls == [0, 1]
    # the stop hook is removed again: an ordinary forward still runs every block and the head
    calls.clear()
    handles = [blk.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, blk in enumerate(decoder_layers(pair.base))]
    try:
        with torch.no_grad():
            pair.base(torch.tensor([[0, 5, 6, 7]]))
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1, 2, 3]


def test_right_padding_does_not_change_real_tokens(llama_dirs):
    base_dir, chat_dir, tok = llama_dirs
    pair = load_pair(base_dir, chat_dir, layer=2, dtype="float32")
    short = [0, 40, 41, 42]
    long = [0, 50, 51, 52, 53, 54, 55]
    ids = torch.tensor([short + [tok.pad_token_id] * 3, long])
    mask = torch.tensor([[1] * 4 + [0] * 3, [1] * 7])
    got_b, _ = pair.residuals(ids, mask)
    alone = residual_stream(pair.base, torch.tensor([short]), layer=2)
    torch.testing.assert_close(got_b[0, :4], alone[0], atol=1e-5, rtol=1e-5)


def test_refuses_layer_out_of_range(llama_dirs):
    base_dir, chat_dir, _ = llama_dirs
    for layer in (4, -1):
        with pytest.raises(ConfigError, match=r"layer .* does not exist .* 0\.\.3"):
            load_pair(base_dir, chat_dir, layer=layer)


def test_refuses_different_hidden_size(tmp_path, llama_dirs):
    base_dir, _, tok = llama_dirs
    other = save_model(tmp_path / "wide", tiny_config("llama", len(tok), hidden=48), tok, 3)
    with pytest.raises(ModelMismatchError, match="hidden sizes differ.*d=32.*d=48"):
        load_pair(base_dir, other, layer=1)


def test_refuses_different_vocabulary(tmp_path, llama_dirs):
    base_dir, _, _ = llama_dirs
    tok = build_tokenizer(n_merges=10)
    other = save_model(tmp_path / "bigvocab", tiny_config("llama", len(tok)), tok, 3)
    with pytest.raises(ModelMismatchError, match="vocabulary size"):
        load_pair(base_dir, other, layer=1)


def test_refuses_different_token_ids_with_same_vocab_size(tmp_path, llama_dirs):
    base_dir, _, base_tok = llama_dirs
    # same size, but the special tokens come in another order, so ids are permuted
    tok = build_tokenizer(specials=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"])
    assert len(tok) == len(base_tok)
    other = save_model(tmp_path / "permuted", tiny_config("llama", len(tok)), tok, 3)
    with pytest.raises(ModelMismatchError, match="different token ids"):
        load_pair(base_dir, other, layer=1)


def test_refuses_missing_model(tmp_path, llama_dirs):
    base_dir, _, _ = llama_dirs
    with pytest.raises(ConfigError, match="cannot load model"):
        load_pair(base_dir, str(tmp_path / "nope"), layer=1)


def test_metadata_names_models_and_tokenizer(tmp_path, llama_dirs):
    base_dir, chat_dir, tok = llama_dirs
    meta = load_pair(base_dir, chat_dir, layer=1, dtype="float32").metadata()
    assert meta["models"]["base"] == base_dir and meta["models"]["chat"] == chat_dir
    assert meta["models"]["dtype"] == "float32" and meta["chat_template"] == CHAT_TEMPLATE
    # the hash follows the tokenizer's definition: a copy hashes the same, a retrained one differently
    from crossdiff_core.models import tokenizer_hash

    tok.save_pretrained(tmp_path / "copy")
    from transformers import AutoTokenizer

    assert tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path / "copy")) == meta["tokenizer_hash"]
    assert tokenizer_hash(build_tokenizer(n_merges=5)) != meta["tokenizer_hash"]
