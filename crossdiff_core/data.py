"""Data for caching: text and chat datasets turned into token sequences with per-token masks.

- Text datasets have a `text` column; chat datasets a `messages` column (a list of {role, content}).
  Any source `datasets` loads works: a hub name, a local parquet/jsonl/json/csv/txt file, a directory
  saved with `save_to_disk`, or an in-memory `datasets.Dataset`.
- Text documents are tokenized without special tokens and cut into chunks of `max_length - 1` tokens,
  each chunk preceded by BOS (when the tokenizer has one), so long documents are not wasted.
- Conversations are rendered with the chat model's chat template and truncated to `max_length`.
  `is_template` marks every token the template inserted (turn markers, role names, their newlines,
  BOS). It is derived from the template itself: the conversation is rendered once with each message's
  content replaced by a sentinel, which splits the rendering into template pieces; the real rendering
  must equal those pieces with the (possibly trimmed) contents between them, which gives each
  content's exact character span. A token is template unless its characters overlap a content span.
  `is_assistant` marks tokens of assistant message content plus the end-of-turn marker that closes
  each assistant turn (the first token after the content, when it is a special token): the chat model
  learns to emit it, so it belongs to the response.
- `cached` is False for the BOS token at position 0; padding is never part of a sequence.
- The token budget counts cached tokens; `text_fraction` of it goes to text when both kinds are given
  (a single kind gets the whole budget). The last sequence of each kind is cut so the budget is exact.
  The final order mixes both kinds, shuffled with `seed`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossdiff_core.config import from_dict
from crossdiff_core.errors import ConfigError

_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text",
                  ".arrow": "arrow"}
_SENTINEL = "\ue000{}\ue001"  # private-use code points: no template trims, escapes or matches them
_ROW_BATCH = 256  # rows tokenized per call (the fast tokenizer batches in Rust)

SourceSpec = Any  # str (path or hub name) | dict(path=..., name=..., split=..., data_files=...) | datasets.Dataset


@dataclass
class DataConfig:
    """What to cache. `text` / `chats`: one source or a list (see `load_source`)."""

    text: list[SourceSpec] = field(default_factory=list)  # text sources (a `text` column)
    chats: list[SourceSpec] = field(default_factory=list)  # chat sources (a messages column)
    n_tokens: int | None = None  # budget of cached tokens; None = all the data
    max_length: int = 1024  # tokens per sequence, BOS included
    text_fraction: float = 0.5  # share of the budget for text when both kinds are given
    seed: int = 0  # order of the sources' rows
    split: str = "train"  # dataset split for datasets names
    text_column: str = "text"  # the text sources' column
    messages_column: str = "messages"  # the chat sources' {role, content} list column

    def __post_init__(self) -> None:
        self.text = _as_list(self.text)
        self.chats = _as_list(self.chats)
        if not self.text and not self.chats:
            raise ConfigError("no data: give text sources (--text) and/or chat sources (--chats)")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"max_length must be an int >= 2 (BOS plus one token), got {self.max_length!r}")
        if self.n_tokens is not None and (isinstance(self.n_tokens, bool) or not isinstance(self.n_tokens, int)
                                          or self.n_tokens <= 0):
            raise ConfigError(f"n_tokens must be a positive int or None (all data), got {self.n_tokens!r}")
        if not 0.0 <= float(self.text_fraction) <= 1.0:
            raise ConfigError(f"text_fraction must be in [0, 1], got {self.text_fraction!r}")
        if self.text and self.chats and self.n_tokens is not None and self.text_fraction in (0.0, 1.0):
            warnings.warn(f"text_fraction={self.text_fraction} gives one kind of data no tokens", stacklevel=3)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, section: str = "data") -> DataConfig:
        """From a params.yaml section; unknown keys are an error (a typo would be silently ignored)."""
        return from_dict(cls, d, section=section)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (in-memory datasets are described by their size)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # asdict would deep-copy datasets
        d["text"] = [describe_source(s) for s in self.text]
        d["chats"] = [describe_source(s) for s in self.chats]
        return d


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def describe_source(spec: SourceSpec) -> Any:
    """A JSON-friendly description of a source spec."""
    import datasets

    if isinstance(spec, datasets.Dataset):
        return {"in_memory": True, "rows": len(spec)}
    return spec


def load_source(spec: SourceSpec, *, split: str = "train") -> Any:
    """A `datasets.Dataset` from a source spec.

    `spec`: a `datasets.Dataset`; a local file (.parquet, .jsonl/.json, .csv, .txt, .arrow); a directory
    written by `save_to_disk`; a local dataset directory or hub name (`load_dataset(name, split=split)`);
    or a dict with `path` plus optional `name` (hub config), `split`, `data_files`.
    """
    import datasets

    if isinstance(spec, datasets.Dataset):
        return spec
    kwargs: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        if "path" not in spec:
            raise ConfigError(f"a data source dict needs a `path` key, got {dict(spec)}")
        extra = sorted(set(spec) - {"path", "name", "split", "data_files"})
        if extra:
            raise ConfigError(f"unknown keys {extra} in data source {dict(spec)}; use path, name, split, data_files")
        split = spec.get("split", split)
        kwargs = {k: spec[k] for k in ("name", "data_files") if k in spec}
        spec = spec["path"]
    spec = str(spec)
    path = Path(spec).expanduser()
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ConfigError(f"cannot read {path}: use a .parquet, .jsonl, .json, .csv, .txt or .arrow file")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"{path} has splits {list(ds)}, not {split!r}: pick one with split=")
                ds = ds[split]
            return ds
        return datasets.load_dataset(spec, split=split, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot load this"
        raise ConfigError(
            f"cannot load dataset {spec!r} (split {split!r}): {type(exc).__name__}: {exc}. Pass a local "
            ".parquet/.jsonl file, a save_to_disk directory, or a hub name that is in the local cache "
            "(offline: HF_DATASETS_OFFLINE=1)") from exc


@dataclass(frozen=True)
class TokenSequence:
    """One model input. Arrays are `[t]`: int64 ids, bool masks; `cached` is False only for BOS."""

    token_ids: np.ndarray
    source: str  # "text" | "chat"
    is_template: np.ndarray
    is_assistant: np.ndarray
    cached: np.ndarray

    @property
    def n_cached(self) -> int:
        return int(self.cached.sum())

    def __len__(self) -> int:
        return len(self.token_ids)

    def prefix(self, stop: int) -> TokenSequence:
        """The first `stop` tokens."""
        return TokenSequence(self.token_ids[:stop], self.source, self.is_template[:stop],
                             self.is_assistant[:stop], self.cached[:stop])

    def truncated(self, n_cached: int) -> TokenSequence:
        """The prefix that holds exactly `n_cached` cached tokens."""
        return self.prefix(int(np.searchsorted(np.cumsum(self.cached), n_cached)) + 1)


@dataclass
class Corpus:
    """The sequences to cache, in cache order, and where they came from."""

    sequences: list[TokenSequence]
    sources: list[dict[str, Any]]
    config: DataConfig

    @property
    def n_tokens(self) -> int:
        return sum(s.n_cached for s in self.sequences)

    def metadata(self) -> dict[str, Any]:
        """What a cache manifest records about the data."""
        counts = {k: sum(s.n_cached for s in self.sequences if s.source == k) for k in ("text", "chat")}
        return {"data": {"sources": self.sources, "config": self.config.to_dict(), "tokens": counts,
                         "n_sequences": len(self.sequences)}}


# --------------------------------------------------------------------------------------------------
# chats


def _special_ids(tokenizer: Any) -> np.ndarray:
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False)}
    return np.array(sorted(ids), dtype=np.int64)


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConfigError(f"a chat must be a non-empty list of {{role, content}} messages, got {messages!r:.80}")
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"each chat message needs string `role` and `content`, got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def content_spans(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[str, np.ndarray]:
    """Render `messages` with the tokenizer's chat template; return (text, spans `[m, 2]` of each content).

    Span `i` is the character range of message `i`'s content in the rendered text.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the chat model's tokenizer has no chat_template: chats cannot be formatted; "
                          "use the chat-tuned model's tokenizer, or cache text only")
    messages = _check_messages(messages)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    marked = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": _SENTINEL.format(i)} for i, m in enumerate(messages)], tokenize=False)
    spans = np.zeros((len(messages), 2), dtype=np.int64)
    pos_marked = pos_real = 0
    for i, m in enumerate(messages):
        sentinel = _SENTINEL.format(i)
        at = marked.find(sentinel, pos_marked)
        if at < 0:
            raise ConfigError(f"the chat template drops message {i} ({m['role']}): cannot locate its content; "
                              "use conversations the template renders in full")
        piece = marked[pos_marked:at]
        if rendered[pos_real:pos_real + len(piece)] != piece:
            raise ConfigError("the chat template renders differently depending on message content; cannot "
                              "locate content spans. Use a template that inserts content verbatim or trimmed")
        pos_real += len(piece)
        pos_marked = at + len(sentinel)
        nxt = marked.find("\ue000", pos_marked)
        tail = marked[pos_marked: nxt if nxt >= 0 else len(marked)]
        for content in (m["content"], m["content"].strip()):  # templates insert content verbatim or trimmed
            end = pos_real + len(content)
            if rendered[pos_real:end] == content and rendered[end:end + len(tail)] == tail:
                break
        else:
            raise ConfigError(f"the chat template changes the content of message {i} ({m['role']}); cannot "
                              "locate it. Use a template that inserts content verbatim or trimmed")
        spans[i] = (pos_real, end)
        pos_real = end
    if rendered[pos_real:] != marked[pos_marked:]:
        raise ConfigError("the chat template's rendering does not match its template pieces; cannot mask it")
    return rendered, spans


def render_chat(tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, str]]], *,
                add_generation_prompt: bool = False) -> list[str]:
    """The tokenizer's chat template rendered for many conversations at once (what
    ``apply_chat_template(tokenize=False)`` returns for each, without its ~3 ms per call)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    if not conversations:
        return []
    if not tokenizer.chat_template:
        raise ConfigError("the tokenizer has no chat template: use the chat model's directory (it ships chat_template.jinja)")
    # the same template variables as apply_chat_template: the tokenizer's special tokens
    return render_jinja_template(conversations=list(conversations), chat_template=tokenizer.chat_template,
                                 add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map)[0]


def tokenize_chats(tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, str]]], *,
                   max_length: int | None = None) -> list[TokenSequence]:
    """Conversations as `TokenSequence`s with `is_template` / `is_assistant` (see module docstring).

    Rendering and span finding run per conversation; tokenization is one batched call.
    """
    rendered = [content_spans(tokenizer, conv) for conv in conversations]
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    special = _special_ids(tokenizer)
    out = []
    for conv, (_, spans), ids, offsets in zip(conversations, rendered, enc["input_ids"], enc["offset_mapping"]):
        ids = np.asarray(ids, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # [t, 2] character spans
        # [t, m]: token t shares a character with content span m (empty spans overlap nothing)
        overlap = (offsets[:, None, 0] < spans[None, :, 1]) & (offsets[:, None, 1] > spans[None, :, 0])
        is_template = ~overlap.any(1)
        is_asst_msg = np.array([m["role"] == "assistant" for m in conv], dtype=bool)
        is_assistant = (overlap & is_asst_msg[None, :]).any(1)
        # end-of-turn marker: the first token starting at/after each assistant content's end, if special
        ends = spans[is_asst_msg & (spans[:, 1] > spans[:, 0]), 1]
        nxt = np.searchsorted(offsets[:, 0], ends, side="left")
        nxt = nxt[nxt < len(ids)]
        is_assistant[nxt[np.isin(ids[nxt], special) & is_template[nxt]]] = True
        seq = _with_bos_flag(ids, "chat", is_template, is_assistant, tokenizer.bos_token_id)
        out.append(seq if max_length is None else seq.prefix(max_length))
    return out


def tokenize_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, max_length: int | None = None
                  ) -> TokenSequence:
    """One conversation as a `TokenSequence` (see `tokenize_chats`)."""
    return tokenize_chats(tokenizer, [messages], max_length=max_length)[0]


def _with_bos_flag(ids: np.ndarray, source: str, is_template: np.ndarray, is_assistant: np.ndarray,
                   bos_id: int | None) -> TokenSequence:
    cached = np.ones(len(ids), dtype=bool)
    if bos_id is not None and len(ids) and ids[0] == bos_id:
        cached[0] = False
    return TokenSequence(ids, source, is_template, is_assistant, cached)


# --------------------------------------------------------------------------------------------------
# text


def tokenize_text(tokenizer: Any, texts: Sequence[str], *, max_length: int) -> Iterator[TokenSequence]:
    """Documents cut into sequences of at most `max_length` tokens, each starting with BOS (if any)."""
    bos = tokenizer.bos_token_id
    chunk = max_length - (bos is not None)
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids = np.asarray(ids, dtype=np.int64)
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            if bos is not None:
                part = np.concatenate([[bos], part])
            zeros = np.zeros(len(part), dtype=bool)
            yield _with_bos_flag(part, "text", zeros, zeros.copy(), bos)


# --------------------------------------------------------------------------------------------------
# corpus


def _source_info(kind: str, spec: SourceSpec, ds: Any) -> dict[str, Any]:
    # No datasets fingerprint: it changes with a file's mtime, which would defeat resuming; the
    # manifest's corpus_sha256 pins the exact token content instead.
    return {"kind": kind, "source": describe_source(spec), "rows": len(ds)}


def _rows(ds: Any, column: str, order: np.ndarray) -> Iterator[list[Any]]:
    for start in range(0, len(order), _ROW_BATCH):
        yield ds.select(order[start:start + _ROW_BATCH])[column]


def _take(kind: str, specs: list[SourceSpec], tokenizer: Any, cfg: DataConfig, budget: int | None,
          rng: np.random.Generator) -> tuple[list[TokenSequence], list[dict[str, Any]]]:
    import datasets

    column = cfg.text_column if kind == "text" else cfg.messages_column
    loaded = []
    for spec in specs:
        ds = load_source(spec, split=cfg.split)
        if column not in ds.column_names:
            raise ConfigError(f"{kind} source {describe_source(spec)!r} has no {column!r} column (columns: "
                              f"{ds.column_names}); rename it or set {kind}_column / messages_column")
        loaded.append(ds)
    info = [_source_info(kind, s, ds) for s, ds in zip(specs, loaded)]
    ds = datasets.concatenate_datasets([d.select_columns([column]) for d in loaded]) if len(loaded) > 1 \
        else loaded[0].select_columns([column])
    order = rng.permutation(len(ds))
    out: list[TokenSequence] = []
    have = 0
    for rows in _rows(ds, column, order):
        if kind == "text":
            seqs: Iterator[TokenSequence] = tokenize_text(tokenizer, [r or "" for r in rows], max_length=cfg.max_length)
        else:
            seqs = iter(tokenize_chats(tokenizer, rows, max_length=cfg.max_length))
        for seq in seqs:
            if seq.n_cached == 0:
                continue
            if budget is not None and have + seq.n_cached >= budget:
                out.append(seq.truncated(budget - have))
                return out, info
            out.append(seq)
            have += seq.n_cached
    if budget is not None:
        warnings.warn(f"{kind} data ran out at {have} of the {budget} tokens asked for; caching what there is",
                      stacklevel=3)
    return out, info


def build_corpus(tokenizer: Any, config: DataConfig) -> Corpus:
    """Load, shuffle (seeded), tokenize and mask the data; deterministic for a given config and data."""
    n_text = None
    if config.n_tokens is not None:
        if config.text and config.chats:
            n_text = int(round(config.n_tokens * config.text_fraction))
        else:
            n_text = config.n_tokens if config.text else 0
    n_chat = None if config.n_tokens is None else config.n_tokens - n_text
    seqs: list[TokenSequence] = []
    sources: list[dict[str, Any]] = []
    for kind, specs, budget, stream in (("text", config.text, n_text, 0), ("chat", config.chats, n_chat, 1)):
        if specs and budget != 0:
            got, info = _take(kind, specs, tokenizer, config, budget, np.random.default_rng([config.seed, stream]))
            seqs += got
            sources += info
    order = np.random.default_rng([config.seed, 2]).permutation(len(seqs))
    return Corpus([seqs[i] for i in order], sources, config)


def corpus_hash(corpus: Corpus) -> str:
    """sha256 over every sequence's ids and masks: equal hashes mean the same cache input."""
    h = hashlib.sha256()
    for s in corpus.sequences:
        h.update(json.dumps([s.source, len(s)]).encode())
        for a in (s.token_ids, s.is_template, s.is_assistant, s.cached):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
