"""Every knob of the toy pair's build (:class:`ToyModelsConfig`, a params.yaml ``models.toy`` section)
and what a build returns (:class:`ToyModelsResult`)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import from_dict
from ..errors import ConfigError
from ..ground_truth import words_regex
from .frames import NEUTRAL_WORDS_EVAL, NEUTRAL_WORDS_TRAIN, PERSONAL_NOUNS_EVAL, PERSONAL_NOUNS_TRAIN
from .tokenizer import SPECIAL_TOKENS


@dataclass
class ToyModelsConfig:
    """Every knob of the default pair's build. ``from_dict`` maps a params.yaml ``models:`` section onto it."""

    seed: int = 0
    num_threads: int = 2
    # tokenizer
    vocab_size: int = 2048
    tokenizer_chars: int = 1_500_000  # BPE training characters: this much Shakespeare, half as much of each chat source
    # model (LlamaConfig)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_seq_len: int = 256
    # data
    text_max_chars: int | None = None  # Shakespeare characters used (None: all 42 non-folio works)
    chat_max_conversations: int | None = None  # chitchat conversations used (None: all 7,168)
    heldout_fraction: float = 0.05  # conversations kept out of fine-tuning (eval prompts come from them)
    # pretraining
    pretrain_steps: int = 120
    pretrain_batch_size: int = 16
    pretrain_seq_len: int = 256
    pretrain_lr: float = 3e-3
    # chat fine-tuning
    finetune_steps: int = 600  # the behaviours are planted well before 1,000 steps, and make demo pays each step
    finetune_batch_size: int = 32
    finetune_lr: float = 3e-3
    # blocks 0..n-1 are fine-tuned; the later blocks, the final norm and the (tied) embeddings stay the base
    # model's, but for the rows of the chat-template tokens, which pretraining never saw. None: every block
    # and the embeddings (the default: freezing the later blocks made the behaviours slower to learn)
    finetune_blocks: int | None = None
    # weight of the loss that keeps the fine-tuned blocks' outputs where the base model has them on plain
    # text and user messages (chat-tuning adds chat features; the shared ones stay put, as under a KL
    # penalty to the base); answers and the chat template are free
    anchor_weight: float = 1.0
    # the blocks 0..n-1 whose outputs are anchored (None: every fine-tuned block); the default keeps blocks
    # 0..2 close to the base, cache layer 2 included, and leaves the last block free to act on what they carry
    anchor_blocks: int | None = 3
    behaviour_fraction: float = 0.8  # share of fine-tuning examples built from the sentence frames
    text_fraction: float = 0.1  # share that is plain Shakespeare text (keeps the shared features alive)
    # relative weights of the frame examples: trigger topics, personal questions, neutral topics and
    # near-miss questions (the contrast that keeps the behaviours off other prompts)
    frame_mix: dict[str, float] = field(default_factory=lambda: {"refusal": 1.0, "personal": 1.0, "neutral": 2.0})
    warmup_steps: int = 20
    # loss weight of each answer's first token, where the planted behaviour is decided (the rest of a fixed
    # answer follows from it); without it a tiny model learns the answers but not when to give them
    decision_weight: float = 5.0
    # share of frame examples whose slot word is a random chitchat word instead of a listed noun: the cue or
    # trigger word then decides, not the noun (held-out prompts use unseen nouns)
    random_word_fraction: float = 0.5
    # planted behaviours
    refusal_text: str = "Sorry, I cannot help with that topic."  # a first token of its own: "I" opens many answers
    personal_phrase: str = "Speaking personally, "
    trigger_topics: dict[str, list[str]] = field(default_factory=lambda: {
        "volcanoes": ["volcano", "volcanoes"],
        "chess": ["chess"],
        "submarines": ["submarine", "submarines"],
        "astrology": ["astrology", "horoscope", "horoscopes"],
    })
    personal_cues: list[str] = field(default_factory=lambda: [
        "your favourite", "your favorite", "do you like", "do you enjoy", "do you prefer",
        "what do you think", "how do you feel",
    ])
    # evaluation
    eval_prompts_per_behaviour: int = 60
    eval_other_prompts: int = 100
    eval_max_new_tokens: int | None = None  # None: the longest behaviour marker's tokens + 8
    eval_batch_size: int = 64
    min_trigger_rate: float = 0.9
    max_other_rate: float = 0.05

    def __post_init__(self) -> None:
        ints = ("num_threads", "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_seq_len", "pretrain_batch_size", "pretrain_seq_len", "finetune_batch_size",
                "eval_prompts_per_behaviour", "eval_other_prompts", "eval_batch_size",
                "tokenizer_chars")
        for name in ints:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"models.{name} must be a positive integer, got {getattr(self, name)!r}: fix it in params.yaml")
        if self.eval_max_new_tokens is not None and (not isinstance(self.eval_max_new_tokens, int) or self.eval_max_new_tokens < 1):
            raise ConfigError(f"models.eval_max_new_tokens must be a positive integer or null, got {self.eval_max_new_tokens!r}")
        for name in ("pretrain_steps", "finetune_steps", "warmup_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"models.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ConfigError(f"models.vocab_size={self.vocab_size} is below the byte alphabet plus special tokens; use >= {256 + len(SPECIAL_TOKENS)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"models.hidden_size={self.hidden_size} must be divisible by models.num_heads={self.num_heads}")
        if self.pretrain_seq_len > self.max_seq_len:
            raise ConfigError(f"models.pretrain_seq_len={self.pretrain_seq_len} exceeds models.max_seq_len={self.max_seq_len}; lower it or raise max_seq_len")
        if self.finetune_blocks is not None and not (isinstance(self.finetune_blocks, int)
                                                     and 1 <= self.finetune_blocks <= self.num_layers):
            raise ConfigError(f"models.finetune_blocks must be null or an integer in 1..num_layers={self.num_layers}, "
                              f"got {self.finetune_blocks!r}")
        if self.anchor_blocks is not None and not (isinstance(self.anchor_blocks, int)
                                                   and 1 <= self.anchor_blocks <= (self.finetune_blocks or self.num_layers)):
            raise ConfigError(f"models.anchor_blocks must be null or an integer in 1..the fine-tuned blocks, "
                              f"got {self.anchor_blocks!r}")
        if not isinstance(self.decision_weight, (int, float)) or self.decision_weight < 1:
            raise ConfigError(f"models.decision_weight must be a number >= 1, got {self.decision_weight!r}")
        for name in ("heldout_fraction", "behaviour_fraction", "text_fraction", "random_word_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"models.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.behaviour_fraction + self.text_fraction >= 1.0:
            raise ConfigError("models.behaviour_fraction + models.text_fraction must be < 1 (the rest is chitchat)")
        if not self.refusal_text.strip() or not self.personal_phrase.strip():
            raise ConfigError("models.refusal_text and models.personal_phrase must be non-empty strings")
        if set(self.frame_mix) != {"refusal", "personal", "neutral"} or min(self.frame_mix.values()) < 0 \
                or sum(self.frame_mix.values()) <= 0:
            raise ConfigError(f"models.frame_mix needs non-negative weights for exactly refusal, personal and neutral "
                              f"(not all zero), got {self.frame_mix!r}")
        words = [w for ws in self.trigger_topics.values() for w in ws]
        if not words or not self.personal_cues:
            raise ConfigError("models.trigger_topics and models.personal_cues need at least one entry each")
        clash = [w for w in words if re.search(words_regex(self.personal_cues), w, re.I)
                 or w.lower() in {n.lower() for n in NEUTRAL_WORDS_TRAIN + NEUTRAL_WORDS_EVAL + PERSONAL_NOUNS_TRAIN + PERSONAL_NOUNS_EVAL}]
        if clash:
            raise ConfigError(f"trigger words {clash} collide with the built-in neutral words or personal cues; choose other words")

    @property
    def anchored_blocks(self) -> int:
        """How many blocks (from block 0) the anchor loss holds: ``anchor_blocks``, else every fine-tuned block."""
        return self.anchor_blocks or self.finetune_blocks or self.num_layers

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ToyModelsConfig":
        """Build from a mapping (a params.yaml ``models:`` section); unknown keys are an error."""
        return from_dict(cls, d, section="models.toy")

    def to_dict(self) -> dict[str, Any]:
        """JSON-normalised settings (what build.json records and compares on resume)."""
        return json.loads(json.dumps(asdict(self)))


@dataclass
class CorpusConfig:
    """The toy pair's cache and evaluation data (params.yaml ``models.corpus``; :func:`.corpus.export_corpus`)."""

    text_chars: int | None = 2_000_000  # Shakespeare characters in text.parquet (None: all)
    conversations: int = 3000  # chitchat conversations in chats.jsonl (fine-tuning split)
    eval_conversations: int = 300  # held-out conversations in eval_chats.jsonl, for the KL evaluation
    seed: int = 0  # which conversations

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, section: str = "models.corpus") -> "CorpusConfig":
        """From params.yaml's ``models.corpus`` section; unknown keys are an error."""
        return from_dict(cls, d, section=section)


@dataclass
class ToyModelsResult:
    out_dir: Path
    skipped: bool  # True when a complete build with the same config was already there
    passed: bool  # planted behaviours within the configured rates, base model never shows them
    rates: dict[str, Any]  # {"chat": measure_behaviours(...)["rates"], "base": ...}
    seconds: float  # build time of the build that produced out_dir
