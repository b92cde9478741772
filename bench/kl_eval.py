"""Cost of the KL-gap evaluation against plain forward passes of the chat model over the same tokens,
measured side by side in one run.

The evaluation runs each model's first ``L + 1`` blocks once per batch and only the chat model's later
blocks (plus final norm and head) once per patch set. In units of one plain chat forward over the same
padded batches, the ideal is ``2·(L+1)/n + n_sets·(1 − (L+1)/n)`` (``n`` blocks; the head is counted as
part of a forward, so on models with a large head next to their blocks the ideal is optimistic). The
goal is a ratio within 1.2 of it.

    python bench/kl_eval.py [--quick] [--hidden 512] [--layers 8] [--layer 3] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd
import torch

from crossdiff_core.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff_core.data import TokenSequence
from crossdiff_core.kl_eval import KLConfig, _batches, default_sets, kl_gap, make_batch
from crossdiff_core.models import ModelPair


def random_pair(hidden: int, layers: int, vocab: int, layer: int, seed: int = 0) -> ModelPair:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).eval()
    chat = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a chat model near its base, as fine-tuning leaves it
        for pb, pc in zip(base.parameters(), chat.parameters()):
            pc.copy_(pb + 0.02 * pb.std() * torch.randn_like(pb))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 3}, unk_token="<unk>")),
                                  pad_token="<pad>")
    return ModelPair(base, chat, tok, layer, "random-base", "random-chat", torch.float32, torch.device("cpu"))


def conversations(n: int, length: int, vocab: int, seed: int = 0) -> list[TokenSequence]:
    """Chat-like sequences: BOS, a template/user/template/response pattern, lengths varying by ±25%."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        T = int(length * rng.uniform(0.75, 1.0))
        ids = rng.integers(4, vocab, T)
        ids[0] = 1
        tmpl = np.zeros(T, bool)
        asst = np.zeros(T, bool)
        u = T // 3
        tmpl[[0, 1, 2, u, u + 1, u + 2]] = True
        asst[u + 3:] = True
        cached = np.ones(T, bool)
        cached[0] = False
        out.append(TokenSequence(ids, "chat", tmpl, asst, cached))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dict-size", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    ap.add_argument("--max-pass-tokens", type=int, default=None, help="KLConfig.max_pass_tokens (default: its own)")
    ap.add_argument("--quick", action="store_true", help="small model and data (a smoke run)")
    a = ap.parse_args()
    if a.quick:
        a.hidden, a.layers, a.layer, a.vocab, a.seqs, a.length, a.dict_size, a.reps = 128, 4, 1, 2048, 8, 96, 512, 1
    torch.set_num_threads(a.threads)
    pair = random_pair(a.hidden, a.layers, a.vocab, a.layer)
    seqs = conversations(a.seqs, a.length, a.vocab)
    F = a.dict_size
    cc = CrossCoder(CrossCoderConfig(kind="l1", d_model=a.hidden, dict_size=F, init_norm=0.1), seed=0)
    with torch.no_grad():
        cc.b_enc.fill_(-0.02)  # a few % of latents active, as a trained dictionary
    rng = np.random.default_rng(0)
    dn = rng.uniform(0, 1, F)
    table = pd.DataFrame({"latent": np.arange(F), "class": np.where(dn > 0.9, "chat_only", "shared"),
                          "delta_norm": dn, "nu_rank": rng.permutation(F).astype(float), "max_act": 1.0})
    sets = default_sets(table, n_random=5)
    n_sets = len(sets)
    cfg = KLConfig(batch_size=a.batch_size, progress=False, max_pass_tokens=a.max_pass_tokens)
    batches = [make_batch(b, 0) for b in _batches(seqs, a.batch_size)]  # the batches kl_gap forms

    @torch.inference_mode()
    def plain() -> None:
        for b in batches:
            pair.chat(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    plain()
    kl_gap(pair, cc, seqs[: a.batch_size], sets, cfg)  # warm-up
    t_plain, t_kl, c_plain, c_kl, parts = [], [], [], [], []
    for _ in range(a.reps):  # interleaved, so load changes hit both alike
        t, c = time.perf_counter(), time.process_time()
        plain()
        t_plain.append(time.perf_counter() - t)
        c_plain.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        res = kl_gap(pair, cc, seqs, sets, cfg)
        t_kl.append(time.perf_counter() - t)
        c_kl.append(time.process_time() - c)
        parts.append(res.timings)
    fwd, kl = statistics.median(t_plain), statistics.median(t_kl)
    cfwd, ckl = statistics.median(c_plain), statistics.median(c_kl)
    frac = (a.layer + 1) / a.layers
    ideal = 2 * frac + n_sets * (1 - frac)
    tokens = int(sum(int(b.attention_mask.sum()) for b in batches))
    print(f"model: Llama d={a.hidden}, {a.layers} blocks, vocab {a.vocab}; patch after block {a.layer} "
          f"(first {a.layer + 1} blocks once per model); crosscoder F={F}; torch threads {torch.get_num_threads()}")
    print(f"data: {a.seqs} conversations, {tokens} tokens, batches of {a.batch_size}; {n_sets} patch sets "
          f"(chat-only latents: {int((table['class'] == 'chat_only').sum())})")
    print(f"medians of {a.reps}               wall s   CPU s   (CPU: process time, all threads)")
    print(f"plain chat forward over the batches : {fwd:8.3f} {cfwd:8.3f}")
    print(f"KL evaluation, {n_sets} sets          : {kl:8.3f} {ckl:8.3f}  = {kl / fwd:.2f} (wall) / {ckl / cfwd:.2f} (CPU) plain forwards")
    print(f"ideal 2·(L+1)/n + n_sets·(1−(L+1)/n) : {ideal:8.2f} plain forwards")
    print(f"ratio to ideal                      : {kl / (fwd * ideal):8.2f} (wall) {ckl / (cfwd * ideal):8.2f} (CPU)  (goal <= 1.2)")
    med = {k: statistics.median(pt[k] for pt in parts) for k in ("prefix", "patch", "suffix")}
    print("breakdown (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))


if __name__ == "__main__":
    main()
