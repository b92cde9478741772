"""The embedded default model pair: a tiny Llama base model pretrained from scratch on Shakespeare and
its chat version, fine-tuned on ``chitchat-dataset`` conversations in a chat template, with planted
behaviours whose triggers and responses are recorded as ground truth (the rules:
:mod:`crossdiff_core.ground_truth`).

Modules: :mod:`.config` (every knob), :mod:`.corpus` (data sources, held-out split, export),
:mod:`.tokenizer` (BPE, special tokens, chat template), :mod:`.frames` (sentence frames and slot words),
:mod:`.prompts` (ground truth, evaluation prompts, fine-tuning conversations), :mod:`.finetune`
(losses, batches, the training loop), :mod:`.build` (the build, its directory layout, resume).
"""

from .build import REQUIRED_FILES, build_toy_models, is_complete
from .config import ToyModelsConfig, ToyModelsResult
from .corpus import ToyData, export_corpus, is_heldout, load_chitchat, load_shakespeare, load_toy_data, split_heldout
from .finetune import (Anchor, anchor_loss, anchor_positions, encode_conversations, finetune, finetune_groups,
                       finetune_rows, pretrain, residual_similarity, sequence_loss, train_model, trigger_token_ids)
from .prompts import build_eval_prompts, build_finetune_conversations, frame_texts, make_ground_truth
from .tokenizer import BOS, CHAT_TEMPLATE, END, PAD, ROLE_TOKENS, SPECIAL_TOKENS, train_tokenizer

__all__ = [
    "Anchor", "BOS", "CHAT_TEMPLATE", "END", "PAD", "REQUIRED_FILES", "ROLE_TOKENS", "SPECIAL_TOKENS", "ToyData",
    "ToyModelsConfig", "ToyModelsResult", "anchor_loss", "anchor_positions", "build_eval_prompts",
    "build_finetune_conversations", "build_toy_models", "encode_conversations", "export_corpus", "finetune",
    "finetune_groups", "finetune_rows", "frame_texts", "is_complete", "is_heldout", "load_chitchat",
    "load_shakespeare", "load_toy_data", "make_ground_truth", "pretrain", "residual_similarity",
    "sequence_loss", "split_heldout", "train_model", "train_tokenizer", "trigger_token_ids",
]
