"""Caching throughput against plain forward passes of the same two models, measured side by side.

Three timings on the same padded batches of the same corpus (median of --repeats, interleaved):
  cache      `cache_activations`: truncated forwards of both models + gather + background shard writes
             + finalize (tokens.parquet, manifest);
  truncated  two plain forwards to block L (models cut to L+1 blocks, `model.model(...)`), nothing kept;
  full       two ordinary full forwards (all blocks, final norm, LM head).
Goal: cache / truncated <= 1.15 (writing overlaps compute) and cache visibly cheaper than full.

    python bench/cache_throughput.py [--layers 12 --d-model 512 --layer 6 --tokens 4096 --threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from crossdiff_core.caching import cache_activations, plan_shards, shard_batches  # noqa: E402
from crossdiff_core.data import DataConfig, build_corpus  # noqa: E402
from crossdiff_core.models import decoder_layers, load_pair, torch_dtype  # noqa: E402

WORDS = ("the a of and to in is was for on that with as by at it from his her they we you not but or be this "
         "which have are one all had there their when so will would what can who more if no out up about into "
         "king queen lord lady sword crown night day love death heart blood fair sweet good speak hear come go "
         "weather question answer assistant user model data layer token stream residual sparse latent").split()
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] | trim }}"
            "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def make_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<end_of_turn>",
                                   pad_token="<pad>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    fast.chat_template = TEMPLATE
    return fast


def make_models(root: Path, args, tok) -> tuple[str, str]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.d_model, intermediate_size=int(args.d_model * 8 / 3),
                      num_hidden_layers=args.layers, num_attention_heads=args.d_model // 64,
                      num_key_value_heads=max(1, args.d_model // 128), max_position_embeddings=4096,
                      bos_token_id=0, eos_token_id=4, pad_token_id=2, tie_word_embeddings=False)
    dirs = []
    for name, seed in (("base", 1), ("chat", 2)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(str(root / name))
    return dirs[0], dirs[1]


def make_data(root: Path, n_docs: int, rng: np.random.Generator) -> tuple[list[str], Path, Path]:
    import pandas as pd

    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(50, 400)))) for _ in range(n_docs)]
    chats = [[{"role": "user", "content": " ".join(rng.choice(WORDS, size=int(rng.integers(5, 40))))},
              {"role": "assistant", "content": " ".join(rng.choice(WORDS, size=int(rng.integers(20, 150))))}]
             for _ in range(n_docs)]
    pd.DataFrame({"text": texts}).to_parquet(root / "text.parquet")
    pd.DataFrame({"messages": chats}).to_parquet(root / "chats.parquet")
    return texts, root / "text.parquet", root / "chats.parquet"


def truncated_copy(path: str, layer: int, dtype: torch.dtype) -> torch.nn.Module:
    """The model cut to blocks 0..layer: its decoder's forward is a plain forward to block `layer`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    layers = decoder_layers(model)
    del layers[layer + 1:]
    model.config.num_hidden_layers = layer + 1
    return model.model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--vocab-size", type=int, default=32000, help="embedding/LM-head rows (tokenizer uses 4096)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts, text_file, chat_file = make_data(root, 200, rng)
        tok = make_tokenizer(texts, 4096)
        base_dir, chat_dir = make_models(root, args, tok)
        pair = load_pair(base_dir, chat_dir, layer=args.layer, dtype=args.dtype)
        t0 = time.perf_counter()
        data = DataConfig(text=str(text_file), chats=str(chat_file), n_tokens=args.tokens, max_length=args.max_length)
        corpus = build_corpus(pair.tokenizer, data)
        t_corpus = time.perf_counter() - t0
        plans = plan_shards([s.n_cached for s in corpus.sequences], args.shard_tokens)
        batches = [b for p in plans for b in shard_batches(corpus.sequences[p.start:p.stop], batch_size=args.batch_size,
                                                           pad_id=tok.pad_token_id)]
        n_fed = sum(int(b.attention_mask.sum()) for b in batches)
        n_padded = sum(b.input_ids.numel() for b in batches)
        trunc = [truncated_copy(d, args.layer, dtype) for d in (base_dir, chat_dir)]
        full = [pair.base, pair.chat]

        @torch.inference_mode()
        def run_plain(models, **kw):
            for b in batches:
                for m in models:
                    m(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, **kw)

        def run_cache(i):
            cache_activations(pair, corpus, root / f"cache-{i}", batch_size=args.batch_size,
                              shard_tokens=args.shard_tokens, progress=False)

        run_plain(trunc)  # warm-up (allocator, kernels)
        times: dict[str, list[float]] = {"cache": [], "truncated": [], "full": []}
        cpu: dict[str, list[float]] = {k: [] for k in times}
        for r in range(args.repeats):
            for name, fn in (("truncated", lambda: run_plain(trunc)), ("cache", lambda: run_cache(r)),
                             ("full", lambda: run_plain(full))):
                t, c = time.perf_counter(), time.process_time()  # process time: all threads, writer included
                fn()
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)

    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    n = corpus.n_tokens
    load = os.getloadavg()[0]
    print(f"# cache_throughput: Llama {args.layers} blocks, d={args.d_model}, vocab {args.vocab_size}, L={args.layer}, "
          f"{args.dtype}, {n} cached tokens ({n_fed} fed, {n_padded} with padding), {len(plans)} shards, "
          f"batch {args.batch_size}x<={args.max_length}, {args.threads} threads, load avg {load:.1f}")
    print(f"# corpus build (tokenize + masks): {t_corpus:.2f} s; median of {args.repeats} interleaved repeats")
    print("| run | wall s | tokens/s | wall ratio to truncated | CPU s (all threads) | CPU ratio |")
    print("|---|---|---|---|---|---|")
    labels = {"truncated": f"2 forwards to block {args.layer}", "cache": "caching (forwards + gather + write)",
              "full": "2 full forwards (with LM head)"}
    for k, label in labels.items():
        print(f"| {label} | {med[k]:.3f} | {n / med[k]:,.0f} | {med[k] / med['truncated']:.3f} | {med_cpu[k]:.3f} | "
              f"{med_cpu[k] / med_cpu['truncated']:.3f} |")
    print("# all repeats, wall s: " + "; ".join(f"{k}: {', '.join(f'{x:.2f}' for x in v)}" for k, v in times.items()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
