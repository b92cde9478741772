"""The activation-difference lens (Minder et al. 2025, "Narrow finetuning leaves clearly readable traces in
activation differences"): what a fine-tune adds to the residual stream on any input, read without training.
The baseline every crosscoder is compared with (issue 13).

**Mean difference.** For every block ``L`` (its residual output, as :func:`~crossdiff_core.models.block_outputs`
returns it) and a window of ``n = n_positions`` positions per sequence,

    δ_{L,p} = mean over sequences of  h_chat,L[p] − h_base,L[p]        [n_layers, n, d]
    δ_L     = mean over every window token                              [n_layers, d]

(``δ_L`` weights positions by their token counts: equal to the mean of the ``δ_{L,p}`` when every sequence
fills its window), from one forward pass of each model per batch, summed in float64
(:class:`~crossdiff_core.diff_means.DiffMeans`: ``update`` / ``merge`` / ``result``); also the mean norms
``‖h_base,L‖``, ``‖h_chat,L‖`` over the same tokens.
Each source has its own δ:

- ``text``: plain-text documents, BOS and their first ``n`` tokens; the window is positions ``1..n`` (BOS
  excluded: its activation is the same for every input and carries no text). Only those ``n + 1`` tokens
  run: in a causal model the first positions never see later ones.
- ``chat``: single-turn user prompts (the first user message of each conversation of the chat data)
  rendered with the chat template, the assistant turn opened. Window ``answer_start`` (default): the last
  ``n`` prompt tokens, ending where the answer's first token is predicted (the template tokens that open
  the assistant turn: where a fine-tune that changes how answers begin acts); ``first``: positions
  ``1..n``, the conversation's opening. Slot ``p`` is the ``p``-th position of the window in order (for
  ``answer_start`` slot ``n − 1`` is the last prompt token; a prompt shorter than the window fills its last slots).

**Logit lens.** Each ``δ_L`` (and each ``δ_{L,p}`` at the steering layer) is read through the CHAT model's
own final norm and unembedding, ``logits = head(norm(δ))`` with the model's soft-capping, computed by its
own forward with every block replaced (:func:`~crossdiff_core.patching.suffix_logits`, so Llama, Gemma and
GPT-2 style models need no special case): the ``top_k`` and bottom ``top_k`` tokens. We read ``δ`` itself,
as the paper does, not ``head(norm(h̄_base + δ)) − head(norm(h̄_base))``: the final norm makes the reading of
``δ`` depend on its direction only (the tokens the fine-tune's addition points to), whereas the
difference of the mean activation's readings is dominated by the mean activation's own tokens whenever
``‖δ‖ ≪ ‖h̄‖`` (the usual case before the last blocks) and changes with the offset ``h̄_base``.

**Steering.** At block ``L`` (given; else a ``crossdiff locate`` JSON's ``recommended_layer``; else the middle
block) each source's ``δ_L``, scaled to the steered model's mean residual norm at ``L`` on the same tokens,

    v = a · r_{m,L} · δ_L / ‖δ_L‖        (zero when δ_L = 0)

is added at every position (:func:`~crossdiff_core.steering.steering`) while base and chat model answer the
prompts greedily: generations, ``KL(p_unsteered || p_steered)`` (:func:`~crossdiff_core.steering.steering_kl`)
and, with a behaviour spec (or a toy ground truth), the behaviour rates (:func:`~crossdiff_core.behaviours.measure`).
``a = 1`` adds a vector as long as a typical residual there: a strong push, hence the default sweep below 1 and up to 2.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .behaviours import BehaviourSpec, load_behaviours
from .config import from_dict, neutral
from .data import describe_source, load_source
from .diff_means import WINDOWS, mean_differences
from .errors import ConfigError, CrossdiffError
from .generation import render_prompts
from .fileio import atomic_write, write_json
from .locate import is_spec, n_blocks
from .models import ModelPair, load_pair, text_config
from .patching import suffix_logits
from .steering import (SteerConfig, example_indices, first_user_turns, measure_generations, read_prompts, steering,
                       steering_kl, subsample_prompts)

FORMAT_VERSION = 1
METHOD = "activation_difference_lens"
SOURCES = ("text", "chat")
MODELS = ("base", "chat")
_CHARS_PER_TOKEN = 16  # only a text's opening is tokenized: this many characters per wanted token
_ROW_BATCH = 256  # dataset rows read per call


@dataclass
class DiffLensConfig:
    """Settings of :func:`diff_lens` (``crossdiff lens`` takes its defaults from here)."""

    n_positions: int = 5  # window tokens per sequence (BOS excluded): the paper's first k = 5
    chat_window: str = "answer_start"  # chat prompts: answer_start (last n prompt tokens) or first (positions 1..n)
    n_sequences: int = 1000  # at most this many text documents and chat prompts per source
    layer: int | None = None  # steering block; None: a locate JSON's recommended_layer, else the middle block
    top_k: int = 20  # tokens in each logit-lens reading (top and bottom)
    alphas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # steering coefficients a (units: the mean residual norm); () skips steering
    models: tuple[str, ...] = MODELS  # which models are steered
    steer_sources: tuple[str, ...] = SOURCES  # which sources' δ steer (those with data)
    max_prompts: int | None = 60  # at most this many steering prompts (each behaviour keeps its share); None: all
    max_new_tokens: int = 20  # tokens generated per steered answer
    n_examples: int = 6  # generations kept per run in the results (all are measured)
    seed: int = 0  # order of the text documents and prompt subsampling
    split: str = "train"  # dataset split for datasets names
    text_column: str = "text"  # the text data's column
    messages_column: str = "messages"  # the chat data's column of {role, content} lists
    dtype: str = "float32"  # model dtype: float32 or bfloat16
    batch_size: int = neutral(32)  # sequences per forward pass (and prompts per generation batch)
    device: str = neutral("cpu")  # torch device: cpu, cuda, cuda:N or auto
    progress: bool = neutral(True)  # show a progress bar

    def __post_init__(self) -> None:
        for name, lo in {"n_positions": 1, "n_sequences": 1, "top_k": 1, "max_new_tokens": 1, "batch_size": 1,
                         "n_examples": 0}.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"lens setting {name} must be an int >= {lo}, got {v!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise ConfigError(f"lens setting layer must be a block index >= 0 or None (automatic), got {self.layer!r}")
        if self.max_prompts is not None and (not isinstance(self.max_prompts, int) or self.max_prompts < 1):
            raise ConfigError(f"lens setting max_prompts must be a positive int or None (all), got {self.max_prompts!r}")
        if self.chat_window not in WINDOWS:
            raise ConfigError(f"lens setting chat_window must be one of {WINDOWS}, got {self.chat_window!r}")
        self.alphas = tuple(float(a) for a in self.alphas)
        self.models, self.steer_sources = tuple(self.models), tuple(self.steer_sources)
        for name, allowed in (("models", MODELS), ("steer_sources", SOURCES)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ConfigError(f"lens setting {name} must be a subset of {allowed}, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, *, section: str = "lens") -> DiffLensConfig:
        """From a params section or CLI options; unknown keys are an error (a typo would be ignored)."""
        return from_dict(cls, d, section=section)


# ---- the inputs ----------------------------------------------------------------------------------------

def text_rows(tokenizer: Any, texts: Sequence[str], n_positions: int) -> list[list[int]]:
    """Each text's opening as token ids: BOS (when the tokenizer has one) and its first ``n_positions``
    tokens. Texts without a token are dropped."""
    bos = tokenizer.bos_token_id
    cut = [t[: _CHARS_PER_TOKEN * n_positions] for t in texts]
    ids = tokenizer(cut, add_special_tokens=False)["input_ids"] if cut else []
    return [([bos] if bos is not None else []) + list(r[:n_positions]) for r in ids if r]


def load_texts(specs: Sequence[Any], cfg: DiffLensConfig) -> list[str]:
    """At most ``cfg.n_sequences`` non-empty documents of the text sources, in a seeded random order."""
    import datasets

    parts = []
    for spec in specs:
        ds = load_source(spec, split=cfg.split)
        if cfg.text_column not in ds.column_names:
            raise ConfigError(f"text source {describe_source(spec)!r} has no {cfg.text_column!r} column (columns: "
                              f"{ds.column_names}): rename it or set text_column")
        parts.append(ds.select_columns([cfg.text_column]))
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    order = np.random.default_rng(cfg.seed).permutation(len(ds))
    out: list[str] = []
    for a in range(0, len(order), _ROW_BATCH):
        out += [t for t in ds.select(order[a:a + _ROW_BATCH])[cfg.text_column] if isinstance(t, str) and t.strip()]
        if len(out) >= cfg.n_sequences:
            break
    return out[:cfg.n_sequences]


def steering_inputs(prompts: str | os.PathLike | None, behaviours: str | os.PathLike | None
                    ) -> tuple[list[dict] | None, BehaviourSpec | None]:
    """Steering prompts ``[{"text", "expected"}]`` and the behaviour spec (for rates), either None.
    ``behaviours``: a behaviour spec (``behaviours.yaml`` / ``.json``), a toy pair's ``ground_truth.json`` or
    its build directory (read as a spec, :func:`~crossdiff_core.behaviours.load_behaviours`), or a prompt file
    (prompts, no rates); ``prompts`` (a prompt file) takes precedence for the prompts."""
    spec = load_behaviours(behaviours) if behaviours is not None and is_spec(Path(behaviours)) else None
    if prompts is not None:
        return read_prompts(str(prompts)), spec
    if spec is not None:
        return spec.prompts(), spec
    return (read_prompts(str(behaviours)) if behaviours is not None else None), None


def resolve_layer(layer: int | None, locate: str | os.PathLike | None, n_layers: int) -> tuple[int, str]:
    """The steering block and where it came from: ``layer``, else the ``recommended_layer`` of a
    ``crossdiff locate`` JSON, else the middle block ``n_layers // 2``."""
    how = "given"
    if layer is None and locate is not None:
        try:
            layer, how = json.loads(Path(locate).read_text()).get("recommended_layer"), f"recommended_layer of {locate}"
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"cannot read a `crossdiff locate` JSON from {locate} ({exc}): pass one, or --layer") from exc
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ConfigError(f"{locate} has no integer recommended_layer: pass a `crossdiff locate` JSON or --layer")
    elif layer is None:
        layer, how = n_layers // 2, "the middle block"
    _check_layer(layer, n_layers)
    return int(layer), how


def _check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer {layer} does not exist ({n_layers} blocks): choose a layer in 0..{n_layers - 1}")


# ---- the logit lens ------------------------------------------------------------------------------------

@torch.inference_mode()
def logit_lens(model: nn.Module, vectors: torch.Tensor) -> torch.Tensor:
    """``head(norm(v))`` for each row of ``vectors [K, d]``: ``[K, V]`` float32, through the model's own
    final norm, unembedding and soft-capping (its own forward with every block replaced, so no
    architecture needs its norm or head found by name)."""
    p = next(model.parameters())
    ids = torch.zeros(1, vectors.shape[0], dtype=torch.long, device=p.device)
    h = vectors.to(device=p.device, dtype=p.dtype)[None]
    last = int(text_config(model.config).num_hidden_layers) - 1
    return suffix_logits(model, last, ids, torch.ones_like(ids), h)[0].float()


def token_readings(logits: torch.Tensor, tokenizer: Any, k: int) -> list[dict[str, list[dict]]]:
    """Per row of ``logits [K, V]``: ``{"top": [...], "bottom": [...]}``, each ``k`` tokens ``{"id", "token"
    (decoded), "piece" (the vocabulary entry: readable where one token is part of a character), "logit", "p"}``
    (``p``: the softmax of that row), highest (lowest) logit first."""
    k = min(k, logits.shape[-1])
    p = torch.softmax(logits.float(), -1)
    out: list[dict[str, list[dict]]] = [{} for _ in range(logits.shape[0])]
    for side, largest in (("top", True), ("bottom", False)):
        val, idx = torch.topk(logits, k, dim=-1, largest=largest)
        prob = p.gather(-1, idx)
        flat = idx.reshape(-1).tolist()
        words, pieces = tokenizer.batch_decode([[i] for i in flat]), tokenizer.convert_ids_to_tokens(flat)
        for r in range(logits.shape[0]):
            out[r][side] = [{"id": flat[r * k + j], "token": words[r * k + j], "piece": pieces[r * k + j],
                             "logit": float(val[r, j]), "p": float(prob[r, j])} for j in range(k)]
    return out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)


def lens_source(model: nn.Module, tokenizer: Any, means: Mapping[str, torch.Tensor], layer: int, top_k: int) -> dict:
    """A source's JSON block: per block ``δ_L``'s norm (absolute, relative to the mean ``‖h_base‖``), its
    cosine to the mean base activation, the mean norms and the logit lens; at ``layer`` the same per slot.
    A zero ``δ`` (a block the fine-tune has not reached: every token ties) has no reading (None)."""
    delta, per_pos, count = means["delta"], means["delta_per_position"], means["count"]
    n_layers, filled = delta.shape[0], (count > 0).nonzero().flatten().tolist()
    vecs = torch.cat([delta, per_pos[layer, filled]])  # one lens pass for both
    reads, norms = token_readings(logit_lens(model, vecs), tokenizer, top_k), vecs.norm(dim=-1)

    def reading(i: int) -> dict[str, Any]:
        some = bool(norms[i] > 0)
        return {"delta_norm": float(norms[i]), "top_tokens": reads[i]["top"] if some else None,
                "bottom_tokens": reads[i]["bottom"] if some else None}

    bn, cn, cos = means["base_norm"], means["chat_norm"], _cosine(delta, means["base_mean"])
    rows = [{"layer": L, **reading(L), "delta_norm_relative": float(norms[L] / bn[L]) if bn[L] > 0 else None,
             "base_norm": float(bn[L]), "chat_norm": float(cn[L]),
             "cos_base_mean": float(cos[L]) if norms[L] > 0 else None} for L in range(n_layers)]
    positions = [{"position": p, "n_tokens": int(count[p]), "delta_norm": None, "top_tokens": None, "bottom_tokens": None}
                 for p in range(per_pos.shape[1])]
    for j, p in enumerate(filled):
        positions[p].update(reading(n_layers + j))
    return {"n_sequences": None, "n_tokens": int(count.sum()), "n_tokens_per_position": count.tolist(),
            "per_layer": rows, "at_layer": {"layer": layer, "positions": positions}}


# ---- steering ------------------------------------------------------------------------------------------

def steering_vector(delta: torch.Tensor, norm: float, alpha: float) -> torch.Tensor:
    """``a · r · δ / ‖δ‖`` as float32 ``[d]`` (zero when ``δ = 0``: identical models have nothing to add)."""
    d = delta.double()
    n = float(d.norm())
    return (d * (alpha * norm / n) if n > 0 else torch.zeros_like(d)).float()


def steer_lens(pair: ModelPair, directions: Mapping[str, torch.Tensor], norms: Mapping[str, Mapping[str, float]],
               layer: int, prompts: Sequence[dict], cfg: DiffLensConfig, *,
               ground_truth: BehaviourSpec | None = None) -> dict:
    """Steer each model in ``cfg.models`` with each source's ``directions[source] [d]`` at block ``layer``,
    scaled to ``norms[source][model]`` (the model's mean residual norm there), for each ``a`` in
    ``cfg.alphas``: ``baseline`` (unsteered) and ``runs`` ``{source, model, alpha, vector_norm, kl_mean,
    kl_last, rates, examples}`` (``rates`` None without a ground truth)."""
    scfg = SteerConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=False)
    models = {"base": pair.base, "chat": pair.chat}
    ex = example_indices(prompts, cfg.n_examples)
    texts = [q["text"] for q in prompts]

    def examples(gens: list[str]) -> list[dict]:
        return [{"prompt": prompts[i]["text"], "expected": prompts[i].get("expected"), "response": gens[i]} for i in ex]

    baseline = {}
    for name in cfg.models:
        gens, rates = measure_generations(models[name], pair.tokenizer, list(prompts), ground_truth, scfg)
        baseline[name] = {"rates": rates, "examples": examples(gens)}
    runs = []
    todo = [(s, m) for s in directions for m in cfg.models]
    with tqdm(total=len(todo) * len(cfg.alphas), disable=not cfg.progress, desc="lens steer", unit="run") as bar:
        for source, name in todo:
            vecs = torch.stack([steering_vector(directions[source], norms[source][name], a) for a in cfg.alphas])
            kl_mean, kl_last = steering_kl(models[name], pair.tokenizer, texts, layer, vecs.to(pair.device),
                                           batch_size=cfg.batch_size)
            for k, a in enumerate(cfg.alphas):
                with steering(models[name], layer, vecs[k]):
                    gens, rates = measure_generations(models[name], pair.tokenizer, list(prompts), ground_truth, scfg)
                runs.append({"source": source, "model": name, "alpha": a, "vector_norm": float(vecs[k].norm()),
                             "kl_mean": float(kl_mean[k]), "kl_last": float(kl_last[k]), "rates": rates,
                             "examples": examples(gens)})
                bar.update(1)
    return {"layer": layer, "alphas": list(cfg.alphas), "models": list(cfg.models), "sources": list(directions),
            "n_prompts": len(prompts), "has_ground_truth": ground_truth is not None,
            "prompt_kinds": {k: sum(1 for q in prompts if str(q.get("expected")) == k)
                             for k in sorted({str(q.get("expected")) for q in prompts})},
            "target_norms": {s: dict(norms[s]) for s in directions}, "baseline": baseline, "runs": runs}


# ---- the whole run -------------------------------------------------------------------------------------

def lens_pair(pair: ModelPair, rows: Mapping[str, Sequence[Sequence[int]]], layer: int, cfg: DiffLensConfig, *,
              prompts: Sequence[dict] | None = None, ground_truth: BehaviourSpec | None = None
              ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The lens on a loaded pair: ``rows`` maps each source to its token rows (``text``: :func:`text_rows`;
    ``chat``: rendered prompts). Returns the ``crossdiff lens`` JSON (without ``inputs``) and the tensors of
    the safetensors file (see :func:`write_lens`)."""
    n_layers = n_blocks(pair)
    _check_layer(layer, n_layers)
    t0 = time.perf_counter()
    means: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[str, Any] = {}
    with tqdm(total=sum(map(len, rows.values())), disable=not cfg.progress, desc="lens", unit="seq") as bar:
        for src, r in rows.items():
            window = "first" if src == "text" else cfg.chat_window
            acc = mean_differences(pair, r, n_layers, n_positions=cfg.n_positions, window=window,
                                   batch_size=cfg.batch_size, bar=bar)
            means[src] = acc.result()
            sources[src] = lens_source(pair.chat, pair.tokenizer, means[src], layer, cfg.top_k)
            sources[src].update(n_sequences=acc.n_sequences, window=window)
    t1 = time.perf_counter()
    steer_src = [s for s in cfg.steer_sources if s in means]
    skipped = ("no steering prompts: pass --prompts or --behaviours" if not prompts else
               "no steering coefficients (alphas)" if not cfg.alphas else
               "no source of steer_sources has data" if not steer_src else None)
    steering = None
    if skipped is None:
        norms = {s: {"base": float(means[s]["base_norm"][layer]), "chat": float(means[s]["chat_norm"][layer])}
                 for s in steer_src}
        steering = steer_lens(pair, {s: means[s]["delta"][layer] for s in steer_src}, norms, layer,
                              subsample_prompts(prompts, cfg.max_prompts, cfg.seed), cfg, ground_truth=ground_truth)
    t2 = time.perf_counter()
    out = {"format_version": FORMAT_VERSION, "method": METHOD, "layer": layer, "n_layers": n_layers,
           "n_positions": cfg.n_positions, "sources": sources, "steering": steering, "steering_skipped": skipped,
           "models": pair.metadata()["models"] | {"n_layers": n_layers, "d_model": pair.d_model},
           "config": asdict(cfg), "timings": {"means_s": t1 - t0, "steering_s": t2 - t1, "total_s": t2 - t0}}
    return out, lens_tensors(means)


def lens_tensors(means: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The safetensors content, float32 (``count`` int64): per source ``{source}/layer_{L}`` (``δ_L [d]``),
    ``{source}/delta`` ``[n_layers, d]``, ``{source}/delta_per_position`` ``[n_layers, n_positions, d]``,
    ``{source}/base_mean``, ``{source}/chat_mean`` ``[n_layers, d]``, ``{source}/base_norm``,
    ``{source}/chat_norm`` ``[n_layers]`` and ``{source}/count`` ``[n_positions]``."""
    out: dict[str, torch.Tensor] = {}
    for src, m in means.items():
        for key, v in m.items():
            out[f"{src}/{key}"] = v.detach().cpu().contiguous() if key == "count" else v.detach().float().cpu().contiguous()
        for L in range(m["delta"].shape[0]):
            out[f"{src}/layer_{L}"] = m["delta"][L].detach().float().cpu().contiguous()
    return out


def diff_lens(base: str, chat: str, *, text: Sequence[Any] | None = None, chats: Sequence[Any] | None = None,
              prompts: str | os.PathLike | None = None, behaviours: str | os.PathLike | None = None,
              locate: str | os.PathLike | None = None, cfg: DiffLensConfig | None = None
              ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The activation-difference lens of a base/chat pair on text data and/or chat data (the first user
    turn of each conversation), steering on ``prompts`` / ``behaviours`` (see :func:`steering_inputs`) at
    the block :func:`resolve_layer` picks. Returns the ``crossdiff lens`` JSON and its tensors."""
    cfg = cfg or DiffLensConfig()
    text, chats = list(text or []), list(chats or [])
    if not text and not chats:
        raise ConfigError("no data for the mean difference: pass plain text (--text, a `text` column) and/or chat "
                          "data (--chats, a `messages` column)")
    steer_prompts, gt = steering_inputs(prompts, behaviours)
    t0 = time.perf_counter()
    pair = load_pair(base, chat, layer=0, dtype=cfg.dtype, device=cfg.device)
    layer, layer_from = resolve_layer(cfg.layer, locate, n_blocks(pair))
    rows: dict[str, list[list[int]]] = {}
    if text:
        rows["text"] = text_rows(pair.tokenizer, load_texts(text, cfg), cfg.n_positions)
        if not rows["text"]:
            raise ConfigError(f"the text data {text} holds no text: pass data with a non-empty {cfg.text_column!r} column")
    if chats:
        turns = first_user_turns(chats, cfg.messages_column, cfg.n_sequences)
        if not turns:
            raise ConfigError(f"the chat data {chats} holds no user message: pass data with a `messages` column")
        rows["chat"] = render_prompts(pair.tokenizer, [q["text"] for q in turns])
    load_s = time.perf_counter() - t0
    out, tensors = lens_pair(pair, rows, layer, cfg, prompts=steer_prompts, ground_truth=gt)
    out["layer_from"] = layer_from
    out["inputs"] = {"text": text, "chats": chats, "prompts": None if prompts is None else str(prompts),
                     "behaviours": None if behaviours is None else str(behaviours),
                     "locate": None if locate is None else str(locate)}
    out["timings"]["load_s"] = load_s  # models and data
    return out, tensors


def vectors_path(out: str | os.PathLike) -> Path:
    """Where the tensors of a lens JSON ``out`` live: beside it, with ``.safetensors``."""
    return Path(out).with_suffix(".safetensors")


def write_lens(result: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], out: str | os.PathLike
               ) -> tuple[Path, Path]:
    """Write the JSON (``out``) and the tensors (:func:`vectors_path`), each atomically; the JSON names
    the tensors file and its keys."""
    from safetensors.torch import save_file

    out = Path(out)
    st = vectors_path(out)
    meta = {"format_version": str(FORMAT_VERSION), "method": METHOD, "layer": str(result["layer"]),
            "n_layers": str(result["n_layers"]), "sources": ",".join(result["sources"])}
    atomic_write(st, lambda p: save_file(dict(tensors), p, metadata=meta))
    write_json(dict(result) | {"vectors": st.name, "vector_keys": sorted(tensors)}, out)
    return out, st


def read_lens_vectors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors a ``crossdiff lens`` run wrote (the ``.safetensors`` file, or its JSON): see :func:`lens_tensors`."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    p = vectors_path(p) if p.suffix == ".json" else p
    if not p.is_file():
        raise CrossdiffError(f"no lens vectors at {p}: run `crossdiff lens ... --out FILE.json` (it writes FILE.safetensors)")
    try:
        with safe_open(str(p), framework="pt") as f:
            if (f.metadata() or {}).get("method") != METHOD:
                raise CrossdiffError(f"{p} was not written by `crossdiff lens`: pass the lens run's .safetensors")
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise CrossdiffError(f"{p} is not a readable safetensors file ({exc}): rerun `crossdiff lens`") from exc
