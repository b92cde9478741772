"""Where in depth a fine-tune's change lives: the base model's block output patched into the chat model,
block by block (issue 12, "Where does the change live?").

For every block ``L`` the chat model runs its blocks after ``L`` on the BASE model's block-``L`` output
(BOS keeps the chat activation, as in :mod:`crossdiff_core.kl_eval`), and

    KL_L = KL(p_chat || p_L)        p_L: the chat model's next-token distribution with that patch

is averaged per token over kl_eval's token groups of chat conversations: ``kl_first9`` (the first 9
tokens of each assistant response), ``kl_response`` (every response token), ``kl_template`` (chat-template
tokens but BOS). ``KL_L ≈ 0`` means whatever the fine-tune changed in blocks ``0..L`` does not matter to
the chat model's output: the change that matters is made after ``L``, and a crosscoder at ``L`` cannot
see it in ``h_c − h_b``. A large ``KL_L`` means block ``L``'s residual already carries the change. At the
last block ``p_L`` is the base model's own distribution (the chat model's blocks are all replaced).

On behaviour prompts (single-turn user prompts, chat template, assistant turn opened), at the position
where the answer starts: ``KL_L`` per prompt, and ``p_L(t*)``, the probability of the chat model's own
greedy first answer token ``t*`` (for a planted behaviour, its opening). Means over the trigger prompts
(``expected`` set), per behaviour, and over the other prompts.

Cost per batch: one forward pass of each model captures every block's output; then, per block, only the
chat model's later blocks, final norm and head run (:func:`~crossdiff_core.patching.suffix_logits`),
with logits at the evaluated positions only.

Recommended layer (:func:`recommend_layer`): the earliest candidate block whose score reaches
``fraction`` (0.5) of the score's largest value over the candidates. Candidates: every block but the
last ``exclude_last`` (1): the last block's output is the unembedding's input, where a crosscoder sees
the changed output distribution, not how the model computes it. "Earliest" because a crosscoder should
see the change where it arises: once it carries half of the largest effect, the residual holds the
change, and later blocks hold it more and more as output features. The score is the first of these
that rises above its noise floor: the behaviour's opening-token probability drop on trigger prompts
(``p_chat(t*) − p_L(t*)``, floor ``min_p_drop``), the first-answer-token KL on trigger prompts, then
``kl_first9``, ``kl_template``, the first-answer-token KL on the other prompts (floor ``min_kl``). No score
above its floor (the models do not differ): the middle block. Ties go to the earlier block.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import from_dict, neutral
from .errors import ConfigError, ModelMismatchError
from .generation import pad_token_id, render_prompts
from .kl_eval import CATEGORIES, make_batch
from .models import ModelPair, block_outputs, text_config
from .patching import block_returns_tuple, kl_to, suffix_logits

FORMAT_VERSION = 1
KL_KEYS = tuple(f"kl_{c}" for c in CATEGORIES)  # kl_first9, kl_response, kl_template


@dataclass
class LocateConfig:
    """Settings of :func:`locate` (``crossdiff locate`` takes its defaults from here)."""

    # chat tokens evaluated (BOS excluded; None: all the data). Each costs ~n_layers/2 + 2 forward passes
    # plus n_layers unembeddings: minutes on 2 CPU cores for a 135M model
    n_tokens: int | None = 4096
    max_length: int = 1024  # tokens per conversation, BOS included
    batch_size: int = neutral(8)  # conversations per batch (each model's blocks run once per batch)
    prompt_batch_size: int = neutral(32)  # behaviour prompts per batch
    max_logit_elements: int = neutral(1 << 26)  # bound on evaluated positions x vocab of one batch (memory)
    seed: int = 0  # seed of the conversation order
    split: str = "train"  # dataset split for datasets names
    messages_column: str = "messages"  # the chat data's column of {role, content} lists
    dtype: str = "float32"  # model dtype: float32 or bfloat16
    device: str = neutral("cpu")  # torch device: cpu, cuda, cuda:N or auto
    fraction: float = 0.5  # recommended: the earliest block whose score reaches this share of the largest
    exclude_last: int = 1  # final blocks never recommended (the last one feeds the unembedding)
    min_kl: float = 1e-3  # noise floor of a KL score (nats): a largest value below it is no change
    min_p_drop: float = 0.05  # noise floor of the behaviour score (drop of the opening token's probability)
    progress: bool = neutral(True)  # show a progress bar
    # what :func:`locate` runs on unless given as arguments: chat data (a messages column: files or datasets
    # names) and a behaviour spec or prompt file (:func:`behaviour_prompts`; the pipeline's None: the toy
    # pair's ground truth where it has one)
    chats: list = field(default_factory=list)
    behaviours: str | None = None

    def __post_init__(self) -> None:
        ints = {"max_length": 2, "batch_size": 1, "prompt_batch_size": 1, "max_logit_elements": 1, "exclude_last": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"locate setting {name} must be an int >= {lo}, got {v!r}")
        if self.n_tokens is not None and (isinstance(self.n_tokens, bool) or not isinstance(self.n_tokens, int)
                                          or self.n_tokens <= 0):
            raise ConfigError(f"locate setting n_tokens must be a positive int or None (all data), "
                              f"got {self.n_tokens!r}")
        if not 0.0 < float(self.fraction) <= 1.0:
            raise ConfigError(f"locate setting fraction must be in (0, 1], got {self.fraction!r}")
        if self.min_kl < 0 or self.min_p_drop < 0:
            raise ConfigError(f"noise floors must be >= 0, got min_kl={self.min_kl!r}, min_p_drop={self.min_p_drop!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, *, section: str = "locate") -> LocateConfig:
        """From a params section or CLI options; unknown keys are an error (a typo would be ignored)."""
        return from_dict(cls, d, section=section)


# ---- behaviour prompts -----------------------------------------------------------------------------

def behaviour_prompts(spec: str | os.PathLike) -> list[dict]:
    """``[{"text", "expected"}]`` single-turn prompts (``expected``: the behaviour a prompt triggers, or None).

    ``spec``: a behaviour spec (``behaviours.yaml`` / ``.json``, :mod:`crossdiff_core.behaviours`), a toy
    pair's ``ground_truth.json`` or its build directory (its held-out ``eval_prompts``, read as a spec), or a
    ``.jsonl`` / ``.json`` / ``.txt`` prompt file (:func:`crossdiff_core.steering.read_prompts`)."""
    from .behaviours import load_behaviours
    from .steering import read_prompts

    p = Path(spec)
    return load_behaviours(p).prompts() if is_spec(p) else read_prompts(str(p))


def is_spec(path: Path) -> bool:
    """Whether ``path`` names a behaviour spec or a toy ground truth (``.yaml`` / ``.yml``, a build directory,
    ``ground_truth.json``, a ``.json`` object) rather than a prompt file."""
    return (path.suffix in (".yaml", ".yml") or path.is_dir() or path.name == "ground_truth.json"
            or (path.suffix == ".json" and is_json_object(path)))


def is_json_object(path: Path) -> bool:
    """Whether the JSON file ``path`` holds an object (a ground truth or spec) rather than a prompt list."""
    if not path.is_file():
        raise ConfigError(f"behaviour file {path} does not exist")
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}): pass a ground_truth.json or a prompt list") from exc


# ---- the sweep ---------------------------------------------------------------------------------------

def _layer_sweep(pair: ModelPair, n_layers: int, ids: torch.Tensor, mask: torch.Tensor, patch: torch.Tensor,
                 keep: torch.Tensor, tuple_out: bool) -> Iterator[torch.Tensor]:
    """Logits ``[n_keep, V]`` at the ``keep [B, T]`` positions: first the chat model's own, then for each
    block ``L`` the chat model's with block ``L``'s output replaced by the base's at ``patch [B, T]``."""
    hb = block_outputs(pair.base, ids, mask, layers=range(n_layers))  # n_layers x [B, T, d]
    hc = block_outputs(pair.chat, ids, mask, layers=range(n_layers))
    # running no block on the chat model's own last block output gives its ordinary logits
    yield suffix_logits(pair.chat, n_layers - 1, ids, mask, hc[-1], keep, tuple_out=tuple_out)
    m = patch.unsqueeze(-1)
    for L in range(n_layers):
        h = torch.where(m, hb[L], hc[L])
        hb[L] = hc[L] = None  # type: ignore[call-overload]  # free each block's activations once used
        yield suffix_logits(pair.chat, L, ids, mask, h, keep, tuple_out=tuple_out)


def _conversation_batches(sequences: Sequence[Any], batch_size: int, max_keep: int) -> list[list[Any]]:
    """Length-sorted batches of at most ``batch_size`` conversations and (unless one alone exceeds it)
    ``max_keep`` evaluated positions."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].token_ids))
    out: list[list[Any]] = []
    cur: list[Any] = []
    n = 0
    for i in order:
        s = sequences[i]
        k = int(((s.is_template | s.is_assistant) & s.cached).sum())
        if cur and (len(cur) >= batch_size or n + k > max_keep):
            out.append(cur)
            cur, n = [], 0
        cur.append(s)
        n += k
    return out + ([cur] if cur else [])


@torch.inference_mode()
def layer_kl(pair: ModelPair, sequences: Sequence[Any], cfg: LocateConfig | None = None,
             bar: tqdm | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``KL(p_chat || p_L)`` per block and token group on chat conversations
    (:class:`~crossdiff_core.data.TokenSequence`): ``kl [n_layers, 3]`` float64 in :data:`CATEGORIES` order
    (NaN where a group has no tokens) and ``n_tokens [3]``."""
    cfg = cfg or LocateConfig()
    n_layers = n_blocks(pair)
    vocab = _vocab(pair)
    tuple_out = block_returns_tuple(pair.chat)
    kl_sum = torch.zeros(n_layers, len(CATEGORIES), dtype=torch.float64, device=pair.device)
    n_tok = torch.zeros(len(CATEGORIES), dtype=torch.int64, device=pair.device)
    for seqs in _conversation_batches(sequences, cfg.batch_size, max(1, cfg.max_logit_elements // vocab)):
        b = make_batch(seqs, pad_token_id(pair.tokenizer), device=pair.device)
        keep = b.evaluated
        gmask = b.groups[:, keep].to(torch.float64)  # [3, n_keep]
        n_tok += b.groups[:, keep].sum(1)
        if not bool(keep.any()):
            if bar is not None:
                bar.update(n_layers)
            continue
        sweep = _layer_sweep(pair, n_layers, b.input_ids, b.attention_mask, b.patch, keep, tuple_out)
        logp_chat = torch.log_softmax(next(sweep).float(), dim=-1)
        p_chat = logp_chat.exp()
        for L, logits in enumerate(sweep):
            kl_sum[L] += kl_to(logits.unsqueeze(0), logp_chat, p_chat)[0].double() @ gmask.T
            if bar is not None:
                bar.update(1)
    n = n_tok.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, kl_sum.cpu().numpy() / np.maximum(n, 1), np.nan), n


@torch.inference_mode()
def prompt_kl(pair: ModelPair, prompts: Sequence[dict], cfg: LocateConfig | None = None,
              bar: tqdm | None = None) -> dict[str, np.ndarray]:
    """At the first answer position of each rendered prompt: ``kl [n_layers, P]`` (``KL(p_chat || p_L)``),
    ``p [n_layers, P]`` (``p_L(t*)``), ``p_chat [P]`` (``p_chat(t*)``) float64 and ``top [P]`` int64
    (``t*``, the chat model's greedy first answer token)."""
    cfg = cfg or LocateConfig()
    n_layers = n_blocks(pair)
    tuple_out = block_returns_tuple(pair.chat)
    rows = render_prompts(pair.tokenizer, [q["text"] for q in prompts])
    P, bos = len(rows), pair.tokenizer.bos_token_id
    kl, p = np.zeros((n_layers, P)), np.zeros((n_layers, P))
    p_chat, top = np.zeros(P), np.zeros(P, dtype=np.int64)
    for a in range(0, P, cfg.prompt_batch_size):
        chunk = rows[a:a + cfg.prompt_batch_size]
        lengths = torch.tensor([len(r) for r in chunk], device=pair.device)
        ids = torch.full((len(chunk), int(lengths.max())), pad_token_id(pair.tokenizer), dtype=torch.long)
        for i, r in enumerate(chunk):  # right padding: positions need no position_ids
            ids[i, :len(r)] = torch.as_tensor(r)
        ids = ids.to(pair.device)
        pos = torch.arange(ids.shape[1], device=pair.device).expand_as(ids)
        mask = pos < lengths[:, None]
        patch = mask & ~((pos == 0) & (ids == bos)) if bos is not None else mask
        keep = pos == (lengths - 1)[:, None]  # one position per row, rows in order
        sweep = _layer_sweep(pair, n_layers, ids, mask.long(), patch, keep, tuple_out)
        logp_chat = torch.log_softmax(next(sweep).float(), dim=-1)  # [b, V]
        pc = logp_chat.exp()
        t = logp_chat.argmax(-1)
        sl = slice(a, a + len(chunk))
        top[sl], p_chat[sl] = t.cpu().numpy(), pc.gather(1, t[:, None])[:, 0].double().cpu().numpy()
        for L, logits in enumerate(sweep):
            kl[L, sl] = kl_to(logits.unsqueeze(0), logp_chat, pc)[0].double().cpu().numpy()
            p[L, sl] = torch.softmax(logits.float(), -1).gather(1, t[:, None])[:, 0].double().cpu().numpy()
            if bar is not None:
                bar.update(1)
    return {"kl": kl, "p": p, "p_chat": p_chat, "top": top}


def n_blocks(pair: ModelPair) -> int:
    """The pair's number of blocks; both models must have the same."""
    nb, nc = (int(text_config(m.config).num_hidden_layers) for m in (pair.base, pair.chat))
    if nb != nc:
        raise ModelMismatchError(f"the base has {nb} blocks, the chat model {nc}: locating patches block by block "
                                 "and needs a chat model fine-tuned from this base (same depth)")
    return nb


# ---- the recommendation ------------------------------------------------------------------------------

def _mean(x: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """Mean over the selected columns of ``x [n_layers, P]`` -> ``[n_layers]`` (NaN when none)."""
    return x[:, sel].mean(1) if sel.any() else np.full(x.shape[0], np.nan)


def _earliest(values: np.ndarray, fraction: float) -> tuple[int, float]:
    """The earliest index whose value reaches ``fraction`` of the largest (NaN never reaches), and the largest."""
    top = float(np.nanmax(values))
    return int(np.flatnonzero(np.nan_to_num(values, nan=-np.inf) >= fraction * top)[0]), top


def recommend_layer(scores: Sequence[tuple[str, Sequence[float], float]], n_layers: int, *, fraction: float = 0.5,
                    exclude_last: int = 1) -> dict[str, Any]:
    """The recommended block (see the module docstring): ``scores`` is a list of ``(name, values
    [n_layers], noise floor)`` in order of preference; the first whose largest value over the candidate
    blocks ``0 .. max(0, n_layers − 1 − exclude_last)`` exceeds its floor decides. Returns ``{"layer",
    "score", "rule"}`` (``score`` None when no score rises above its floor: then the middle block)."""
    n_cand = max(1, n_layers - exclude_last)
    left_out = f"blocks {n_cand}..{n_layers - 1} left out: the last block's output is the unembedding's input" \
        if n_cand < n_layers else "no block left out"
    tried = []
    for name, values, floor in scores:
        v = np.asarray(values, dtype=np.float64)[:n_cand]
        if not np.isfinite(v).any():
            continue
        layer, top = _earliest(v, fraction)
        if top > floor:
            return {"layer": layer, "score": name,
                    "rule": f"the earliest block whose {name} reaches {fraction:g} x its largest value over blocks "
                            f"0..{n_cand - 1} ({top:.4g} at block {int(np.nanargmax(v))}; {fraction * top:.4g} "
                            f"first reached at block {layer}); {left_out}"}
        tried.append(f"{name} (largest {top:.3g} <= floor {floor:g})")
    mid = min(n_layers // 2, n_cand - 1)
    return {"layer": mid, "score": None,
            "rule": f"no score rises above its noise floor ({', '.join(tried) or 'no scores'}): the models do not "
                    f"differ measurably; the middle block {mid}"}


def _behaviour_summary(prompts: Sequence[dict], r: dict[str, np.ndarray], tokenizer: Any) -> tuple[dict, dict]:
    """Per-layer behaviour fields ``{field: [n_layers]}`` (``by_behaviour`` nested) and the top-level summary."""
    expected = np.array([q.get("expected") for q in prompts], dtype=object)
    trig = np.array([e is not None for e in expected])
    fields: dict[str, Any] = {"kl_first_token_trigger": _mean(r["kl"], trig),
                              "kl_first_token_other": _mean(r["kl"], ~trig),
                              "p_first_token_trigger": _mean(r["p"], trig), "by_behaviour": {}}
    summary: dict[str, Any] = {"n_trigger": int(trig.sum()), "n_other": int((~trig).sum()),
                               "p_chat_first_token_trigger": float(r["p_chat"][trig].mean()) if trig.any() else None,
                               "by_behaviour": {}}
    for name in sorted({e for e in expected if e is not None}, key=str):
        sel = expected == name
        fields["by_behaviour"][str(name)] = {"kl_first_token": _mean(r["kl"], sel), "p_first_token": _mean(r["p"], sel)}
        tok, count = Counter(r["top"][sel].tolist()).most_common(1)[0]
        summary["by_behaviour"][str(name)] = {"n_prompts": int(sel.sum()),
                                              "p_chat_first_token": float(r["p_chat"][sel].mean()),
                                              "chat_first_token": tokenizer.decode([tok]),
                                              "chat_first_token_share": count / int(sel.sum())}
    return fields, summary


def _behaviour_scores(p_chat: float, p: np.ndarray, kl: np.ndarray, cfg: LocateConfig, suffix: str = ""
                      ) -> list[tuple[str, np.ndarray, float]]:
    """The behaviour scores in order of preference: the opening token's probability drop, then the KL."""
    return [(f"p_drop{suffix}", p_chat - p, cfg.min_p_drop), (f"kl_first_token{suffix}", kl, cfg.min_kl)]


def _scores(per_layer: dict[str, Any], summary: dict | None, cfg: LocateConfig) -> list[tuple[str, np.ndarray, float]]:
    out = []
    if summary is not None and summary["p_chat_first_token_trigger"] is not None:
        out += _behaviour_scores(summary["p_chat_first_token_trigger"], per_layer["p_first_token_trigger"],
                                 per_layer["kl_first_token_trigger"], cfg, "_trigger")
    out += [(k, per_layer[k], cfg.min_kl) for k in ("kl_first9", "kl_template")]
    if summary is not None:
        out.append(("kl_first_token_other", per_layer["kl_first_token_other"], cfg.min_kl))
    return out


# ---- the whole run -----------------------------------------------------------------------------------

def locate(base: str, chat: str, *, chats: Sequence[Any] | None = None, behaviours: str | os.PathLike | None = None,
           cfg: LocateConfig | None = None, base_revision: str | None = None,
           chat_revision: str | None = None) -> dict[str, Any]:
    """Per-block patching KL of a base/chat pair on chat data (``chats``: sources with a ``messages``
    column) and/or behaviour prompts (``behaviours``: see :func:`behaviour_prompts`), and the recommended
    layer. ``chats`` / ``behaviours`` left None: ``cfg.chats`` / ``cfg.behaviours``. Returns the
    ``crossdiff locate`` JSON (see :func:`write_locate`)."""
    from .data import DataConfig, build_corpus
    from .models import load_pair

    cfg = cfg or LocateConfig()
    cfg = replace(cfg, chats=list(cfg.chats if chats is None else chats),
                  behaviours=cfg.behaviours if behaviours is None else str(behaviours))
    chats, behaviours = cfg.chats, cfg.behaviours
    if not chats and behaviours is None:
        raise ConfigError("nothing to locate on: pass chat data (--chats, a `messages` column) and/or behaviour "
                          "prompts (--behaviours ground_truth.json or prompts.jsonl)")
    prompts = behaviour_prompts(behaviours) if behaviours is not None else None
    t0 = time.perf_counter()
    pair = load_pair(base, chat, layer=0, dtype=cfg.dtype, device=cfg.device, base_revision=base_revision,
                     chat_revision=chat_revision)
    n_blocks(pair)
    seqs: list[Any] = []
    if chats:
        data = DataConfig(chats=chats, n_tokens=cfg.n_tokens, max_length=cfg.max_length, seed=cfg.seed,
                          split=cfg.split, messages_column=cfg.messages_column)
        seqs = build_corpus(pair.tokenizer, data).sequences
        if not seqs:
            raise ConfigError(f"the chat data {chats} holds no conversations: pass data with a `messages` column")
    load_s = time.perf_counter() - t0
    out = sweep_pair(pair, seqs, prompts, cfg)
    out["inputs"] = {"chats": chats, "behaviours": None if behaviours is None else str(behaviours)}
    out["timings"]["load_s"] = load_s  # models and data
    return out


def sweep_pair(pair: ModelPair, sequences: Sequence[Any], prompts: Sequence[dict] | None,
               cfg: LocateConfig | None = None) -> dict[str, Any]:
    """:func:`layer_kl` on ``sequences`` and :func:`prompt_kl` on ``prompts`` (either may be empty), the
    recommendation, as the ``crossdiff locate`` JSON (without ``inputs``)."""
    cfg = cfg or LocateConfig()
    n_layers = n_blocks(pair)
    n_batches = len(_conversation_batches(sequences, cfg.batch_size, max(1, cfg.max_logit_elements // _vocab(pair))))
    no_chats = (np.full((n_layers, len(CATEGORIES)), np.nan), np.zeros(len(CATEGORIES), dtype=np.int64))
    n_steps = n_layers * (n_batches + (math.ceil(len(prompts) / cfg.prompt_batch_size) if prompts else 0))
    t0 = time.perf_counter()
    with tqdm(total=n_steps, disable=not cfg.progress, desc="locate", unit="suffix") as bar:
        kl, n_tok = layer_kl(pair, sequences, cfg, bar) if sequences else no_chats
        t1 = time.perf_counter()
        pr = prompt_kl(pair, prompts, cfg, bar) if prompts else None
    t2 = time.perf_counter()
    per_layer: dict[str, Any] = {k: kl[:, i] for i, k in enumerate(KL_KEYS)}
    summary = None
    if pr is not None:
        fields, summary = _behaviour_summary(prompts, pr, pair.tokenizer)
        per_layer.update(fields)
    rule = {"fraction": cfg.fraction, "exclude_last": cfg.exclude_last}
    rec = recommend_layer(_scores(per_layer, summary, cfg), n_layers, **rule)
    out: dict[str, Any] = {"format_version": FORMAT_VERSION, "per_layer": _rows(per_layer, n_layers),
                           "recommended_layer": rec["layer"], "rule": rec["rule"], "recommended_by": rec["score"]}
    if summary is not None:
        by = per_layer["by_behaviour"]
        out["recommended_by_behaviour"] = {
            name: recommend_layer(_behaviour_scores(v["p_chat_first_token"], by[name]["p_first_token"],
                                                    by[name]["kl_first_token"], cfg), n_layers, **rule)
            for name, v in summary["by_behaviour"].items()}
    n_prompts = {"trigger_prompts": summary["n_trigger"] if summary else 0,
                 "other_prompts": summary["n_other"] if summary else 0}
    return out | {"behaviour": summary, "n_tokens": {c: int(n_tok[i]) for i, c in enumerate(CATEGORIES)} | n_prompts,
                  "n_sequences": len(sequences), "n_layers": n_layers,
                  "models": pair.metadata()["models"] | {"n_layers": n_layers, "d_model": pair.d_model},
                  "config": asdict(cfg), "timings": {"chats_s": t1 - t0, "behaviours_s": t2 - t1, "total_s": t2 - t0}}


def _vocab(pair: ModelPair) -> int:
    return int(pair.chat.get_output_embeddings().weight.shape[0])


def _rows(per_layer: dict[str, Any], n_layers: int) -> list[dict[str, Any]]:
    """``{field: [n_layers]}`` (``by_behaviour``: ``{name: {field: [n_layers]}}``) -> one dict per block."""
    def num(v: float) -> float | None:
        return float(v) if math.isfinite(float(v)) else None

    rows = []
    for L in range(n_layers):
        row: dict[str, Any] = {"layer": L}
        for k, v in per_layer.items():
            if k == "by_behaviour":
                row[k] = {name: {f: num(a[L]) for f, a in d.items()} for name, d in v.items()}
            else:
                row[k] = num(v[L])
        rows.append(row)
    return rows


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)


def plot_locate(result: Mapping[str, Any], path: str | os.PathLike, *, cached: Sequence[int] = ()) -> Path:
    """PNG: KL per block (the three token groups, and the first-answer-token KL on behaviour prompts),
    and with behaviour prompts the opening token's probability per block; the recommended block marked
    (and the ``cached`` blocks: those the crosscoders read, when the report draws it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_write

    rows = result["per_layer"]
    layers = [r["layer"] for r in rows]
    has_b = result.get("behaviour") is not None
    fig, axes = plt.subplots(2 if has_b else 1, 1, figsize=(7, 6.5 if has_b else 3.8), sharex=True, squeeze=False)
    series = [(k, k) for k in KL_KEYS]
    if has_b:
        series += [("kl_first_token_trigger", "first answer token, trigger prompts"),
                   ("kl_first_token_other", "first answer token, other prompts")]
    ax = axes[0, 0]
    for key, label in series:
        ys = _series(rows, key)
        if np.isfinite(ys).any():
            ax.plot(layers, ys, marker="o", ms=3, label=label)
    ax.set_ylabel("KL(p_chat || p_patched) [nats]")
    if has_b:
        bx = axes[1, 0]
        bx.plot(layers, _series(rows, "p_first_token_trigger"), marker="o", ms=3, label="patched: all trigger prompts")
        for name in (rows[0].get("by_behaviour") or {}):
            bx.plot(layers, _series([r["by_behaviour"][name] for r in rows], "p_first_token"), lw=1, ls="--",
                    label=f"patched: {name}")
        p_chat = result["behaviour"].get("p_chat_first_token_trigger")
        if p_chat is not None:
            bx.axhline(p_chat, color="k", lw=0.8, ls=":", label="chat model (unpatched)")
        bx.set_ylabel("p(chat's first answer token)")
        bx.set_ylim(-0.02, 1.02)
    for a in axes[:, 0]:
        a.axvline(result["recommended_layer"], color="tab:red", lw=1.2, alpha=0.7,
                  label=f"recommended: block {result['recommended_layer']}")
        for i, L in enumerate(sorted(set(cached))):
            a.axvline(L, color="tab:purple", lw=1.2, ls="--", alpha=0.8,
                      label="cached (the crosscoders read it)" if i == 0 else None)
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("block L (base block-L output patched into the chat model)")
    fig.suptitle("Where does the change live?", fontsize=10)
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def locate_headline(result: Mapping[str, Any]) -> dict[str, Any]:
    """The flat numbers of a locate result (DVC metrics, MLflow): ``recommended_layer``, ``n_layers`` and
    ``kl_first9_L{L}`` per block (and ``p_first_token_trigger_L{L}`` with behaviour prompts)."""
    out: dict[str, Any] = {"recommended_layer": result["recommended_layer"], "n_layers": result["n_layers"],
                           "recommended_by": result.get("recommended_by")}
    for key in ("kl_first9", "p_first_token_trigger"):
        out |= {f"{key}_L{r['layer']}": r[key] for r in result["per_layer"] if r.get(key) is not None}
    return out


def write_locate(result: Mapping[str, Any], out: str | os.PathLike, plot: str | os.PathLike | None = None
                 ) -> tuple[Path, Path]:
    """Write the ``crossdiff locate`` interface atomically: ``out`` (JSON: ``per_layer`` rows ``{"layer",
    "kl_first9", "kl_response", "kl_template"[, "kl_first_token_trigger", "kl_first_token_other",
    "p_first_token_trigger", "by_behaviour": {name: {"kl_first_token", "p_first_token"}}]}``,
    ``recommended_layer``, ``rule``, ``recommended_by``, ``n_tokens``, ``models``, ...) and the plot
    (default: ``out`` with ``.png``)."""
    from .fileio import write_json

    out = Path(out)
    png = Path(plot) if plot else out.with_suffix(".png")
    write_json(dict(result), out)
    plot_locate(result, png)
    return out, png
