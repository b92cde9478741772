"""Steering with crosscoder latents (DESIGN §1 "Steering").

Steering adds ``a · max_act_j · d_j^c`` to block ``L``'s output at every position while the model
generates (base or chat model), for a sweep of ``a``. ``d_j^c`` is the latent's chat decoder row in the
steered model's own units (``s_m · W_dec[1, j]``), ``max_act_j`` its largest code value (``latents.parquet``).
Per latent, model and ``a`` we record greedy generations, ``KL(p_unsteered || p_steered)`` of the
next-token distributions on the prompts (teacher-forced; mean over prompt tokens, and at the last prompt
position, where the answer starts), and, with a behaviour spec (:mod:`crossdiff_core.behaviours`; the toy
pair's ground truth is one), each behaviour's rates as :func:`crossdiff_core.behaviours.measure` measures them.
Which latents track a behaviour and which are steered by default: :mod:`crossdiff_core.behaviour_tracking`.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .behaviour_tracking import behaviour_tracking, choose_latents, tracking_summary
from .behaviours import load_behaviours, measure, steering_record
from .config import from_dict, neutral
from .crosscoder import CrossCoder
from .data import load_source
from .errors import ConfigError, CrossdiffError
from .fileio import json_safe
from .generation import generate_texts, left_pad, pad_token_id, render_prompts
from .models import ModelPair, decoder_layers, resolve_device
from .runs import CROSSCODER_SHA, pair_for, read_latents

MODELS = ("base", "chat")


def steering_vectors(cc: CrossCoder, latents: Sequence[int], max_act: Sequence[float], *, model: str) -> torch.Tensor:
    """``max_act_j · s_m · W_dec[1, j]`` for each latent: ``[K, d]`` float32, in model ``m``'s units
    (``model``: ``"base"`` or ``"chat"``, the model that is steered)."""
    if model not in MODELS:
        raise ConfigError(f"model must be 'base' or 'chat', got {model!r}")
    idx = torch.as_tensor(np.asarray(latents, dtype=np.int64), device=cc.W_dec.device)
    m = torch.as_tensor(np.asarray(max_act, dtype=np.float32), device=cc.W_dec.device)
    if not torch.all(torch.isfinite(m)):
        raise CrossdiffError(f"latents {np.asarray(latents)[~np.isfinite(np.asarray(max_act, dtype=float))].tolist()} "
                             "never fired (max_act is NaN): they cannot be steered; pick latents that fire")
    s = cc.scales[MODELS.index(model)].float()
    return m[:, None] * s * cc.W_dec.detach()[1, idx].float()


@contextmanager
def steering(model: nn.Module, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """Add ``vector`` (``[d]``, or ``[batch, 1, d]`` one per row) to block ``layer``'s output at every
    position, for every forward pass inside the ``with`` (generation included)."""
    def hook(_m: nn.Module, _a: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        h = h + vector.to(device=h.device, dtype=h.dtype)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---- KL ------------------------------------------------------------------------------------------

@torch.inference_mode()
def steering_kl(model: nn.Module, tokenizer: Any, prompts: Sequence[str], layer: int, vectors: torch.Tensor, *,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``KL(p_unsteered || p_steered)`` for each steering vector ``vectors [A, d]`` on the rendered prompts:
    (mean over every prompt token, at the last prompt position), each ``[A]`` float64.

    Per chunk of prompts, one forward pass holds the unsteered copy and one steered copy per vector."""
    device = next(model.parameters()).device
    A, d = vectors.shape
    rows, pad = render_prompts(tokenizer, prompts), pad_token_id(tokenizer)
    sums, lasts, n_tok = np.zeros(A), np.zeros(A), 0
    per = max(1, batch_size // (A + 1))
    for a in range(0, len(rows), per):
        ids, mask = left_pad(rows[a:a + per], pad, device)
        B = ids.shape[0]
        vec = torch.cat([torch.zeros(1, d, device=vectors.device), vectors]).repeat_interleave(B, 0)[:, None, :]
        with steering(model, layer, vec):
            logits = model(input_ids=ids.repeat(A + 1, 1), attention_mask=mask.repeat(A + 1, 1), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), -1).view(A + 1, B, ids.shape[1], -1)
        kl = (logp[0].exp() * (logp[0] - logp[1:])).sum(-1).clamp_min(0.0)  # [A, B, T]
        m = mask.bool()
        sums += kl[:, m].sum(-1).double().cpu().numpy()
        lasts += kl[:, :, -1].sum(-1).double().cpu().numpy()  # left padding: the last position is real
        n_tok += int(m.sum())
    return sums / max(1, n_tok), lasts / max(1, len(rows))


# ---- prompts -------------------------------------------------------------------------------------

def subsample_prompts(prompts: Sequence[dict], n: int | None, seed: int = 0) -> list[dict]:
    """At most ``n`` prompts, each ``expected`` label keeping its share (seeded; order kept)."""
    prompts = list(prompts)
    if n is None or n >= len(prompts):
        return prompts
    rng = np.random.default_rng(seed)
    labels = np.array([str(p.get("expected")) for p in prompts])
    keep: list[int] = []
    for lab in sorted(set(labels)):
        idx = np.nonzero(labels == lab)[0]
        keep += rng.permutation(idx)[: max(1, round(n * idx.size / len(prompts)))].tolist()
    return [prompts[i] for i in sorted(keep)]


def read_prompts(path: str) -> list[dict]:
    """Prompts from a file: ``.txt`` (one per line), ``.jsonl`` / ``.json`` (objects with ``text`` and an
    optional ``expected`` behaviour, or plain strings)."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt file {p} does not exist")
    if p.suffix == ".txt":
        items: list[Any] = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    elif p.suffix == ".jsonl":
        items = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    elif p.suffix == ".json":
        items = json.loads(p.read_text())
    else:
        raise ConfigError(f"cannot read prompts from {p}: use .txt (one per line), .jsonl or .json")
    out = []
    for it in items:
        if isinstance(it, str):
            out.append({"text": it, "expected": None})
        elif isinstance(it, dict) and isinstance(it.get("text"), str):
            out.append({"text": it["text"], "expected": it.get("expected")})
        else:
            raise ConfigError(f"{p}: each prompt must be a string or an object with a `text` string, got {it!r:.60}")
    if not out:
        raise ConfigError(f"{p} holds no prompts")
    return out


def first_user_turns(chats: Sequence[str], messages_column: str = "messages", n: int = 200) -> list[dict]:
    """Prompts from chat data (files or ``datasets`` names with a ``messages`` column): the first user
    message of each conversation, at most ``n``."""
    out: list[dict] = []
    for spec in chats:
        for msgs in load_source(spec).select_columns([messages_column])[messages_column]:
            user = next((m["content"] for m in msgs or [] if m.get("role") == "user"), None)
            if user:
                out.append({"text": user, "expected": None})
            if len(out) >= n:
                return out
    return out


# ---- the sweep -----------------------------------------------------------------------------------

@dataclass
class SteerConfig:
    """Settings of a steering run (params.yaml ``steer``, ``crossdiff steer``): the sweep of
    :func:`run_steering` and the choice of prompts and latents of :func:`steer_crosscoder`."""

    # DESIGN's sweep (-0.5 .. 1.5) plus 3 and 6: the toy pair's latents need a larger a to move its answers
    alphas: tuple[float, ...] = (-0.5, 0.5, 1.0, 1.5, 3.0, 6.0)
    models: tuple[str, ...] = MODELS  # which models are steered
    max_new_tokens: int = 20  # tokens generated per answer
    n_examples: int = 6  # generations kept per run in the results (all are measured)
    # behaviour spec (behaviours.yaml/.json, or a toy ground_truth.json): tracking, rates and default prompts;
    # None: none. The library's and the CLI's; the pipeline leaves it out of params.yaml and passes the spec
    # pair.json records (models.behaviours)
    behaviours: str | None = None
    prompts: str | None = None  # prompt file (.txt lines, .jsonl/.json with `text`); None: the behaviour spec's
    latents: list[int] | None = None  # latents to steer; None: chosen by ν rank, behaviour tracking and a shared sample
    n_top: int = 8  # default choice: most chat-specific chat-only latents (ν rank)
    n_tracking: int = 4  # default choice: best trackers of each behaviour over all live latents (+ each class's best)
    n_shared: int = 2  # default choice: random shared latents (controls)
    max_prompts: int | None = 60  # at most this many prompts (each behaviour keeps its share); None: all
    seed: int = 0  # prompt subsampling and the shared sample
    dtype: str = "float32"  # the models' dtype
    batch_size: int = neutral(64)  # prompts per generation batch
    device: str = neutral("cpu")  # torch device: cpu, cuda or auto
    progress: bool = neutral(True)  # progress bar
    allow_mismatch: bool = neutral(False)  # deliberate cross-use: models or latents.parquet not the crosscoder's own

    def __post_init__(self) -> None:
        self.alphas = tuple(float(a) for a in self.alphas)
        if not all(math.isfinite(a) for a in self.alphas):
            raise ConfigError(f"steering coefficients must be finite numbers, got {list(self.alphas)}")
        if self.max_prompts is not None and self.max_prompts < 0:
            raise ConfigError(f"max_prompts must be >= 0 (0 or None: all prompts), got {self.max_prompts}")
        self.models = tuple(self.models)
        if not self.alphas:
            raise ConfigError("give at least one steering coefficient a")
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models:
            raise ConfigError(f"models must be a subset of {MODELS}, got {self.models}")
        if self.max_new_tokens <= 0 or self.batch_size <= 0 or self.n_examples < 0:
            raise ConfigError(f"max_new_tokens and batch_size must be positive, n_examples >= 0: {self}")

    @classmethod
    def from_dict(cls, d: dict, *, section: str = "steer") -> "SteerConfig":
        """From params.yaml's ``steer`` section; unknown keys are an error."""
        return from_dict(cls, d, section=section)


def example_indices(prompts: Sequence[dict], n: int) -> list[int]:
    """Up to ``n`` prompts spread over the ``expected`` labels (round robin), for the results file."""
    by: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by.setdefault(str(p.get("expected")), []).append(i)
    out: list[int] = []
    while len(out) < min(n, len(prompts)):
        for idx in by.values():
            if idx and len(out) < n:
                out.append(idx.pop(0))
    return sorted(out)


def measure_generations(model: nn.Module, tokenizer: Any, prompts: list[dict], behaviours: Any,
                        cfg: SteerConfig) -> tuple[list[str], dict | None]:
    """Generations (and behaviour rates when there are ``behaviours``: a spec or a ground truth) with
    whatever hooks are on."""
    if behaviours is None:
        return generate_texts(model, tokenizer, [p["text"] for p in prompts], max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.batch_size), None
    m = measure(model, behaviours, prompts, tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size)
    return [g["response"] for g in m["generations"]], {"rates": m["rates"], "any_rate": m["any_rate"]}


def run_steering(pair: ModelPair, cc: CrossCoder, table: pd.DataFrame, latents: Sequence[int],
                 prompts: Sequence[dict | str], cfg: SteerConfig | None = None, *,
                 behaviours: Any = None, chosen_for: dict[int, list[str]] | None = None) -> dict:
    """Steer each latent in ``latents`` on each model with each ``a``; returns a JSON-friendly dict:
    ``baseline`` (unsteered generations and rates per model), ``behaviours`` (name, answer, onset of each;
    ``[]`` without a spec) and per latent its runs ``{model, alpha, kl_mean, kl_last, rates, examples}`` and
    ``chosen_for`` (why it was chosen, when given). ``behaviours``: a spec or ground truth (rates), or None."""
    cfg = cfg or SteerConfig()
    prompts = [{"text": p, "expected": None} if isinstance(p, str) else dict(p) for p in prompts]
    if not prompts:
        raise ConfigError("no steering prompts: pass some (or a behaviour spec with prompts)")
    latents = [int(j) for j in latents]
    rows = table.set_index("latent").reindex(latents)
    if rows["max_act"].isna().any():
        missing = [j for j, v in zip(latents, rows["max_act"]) if not np.isfinite(v)]
        raise CrossdiffError(f"latents {missing} are not in the table or never fired: steer latents that fire")
    t0 = time.perf_counter()
    ex = example_indices(prompts, cfg.n_examples)
    models = {"base": pair.base, "chat": pair.chat}
    baseline = {}
    for name in cfg.models:
        gens, rates = measure_generations(models[name], pair.tokenizer, prompts, behaviours, cfg)
        baseline[name] = {"rates": rates, "examples": [{"prompt": prompts[i]["text"], "expected": prompts[i]["expected"],
                                                        "response": gens[i]} for i in ex]}
    results = []
    todo = [(j, name) for j in latents for name in cfg.models]
    bar = tqdm(total=len(todo) * len(cfg.alphas), disable=not cfg.progress, desc="steer", unit="run")
    per_latent: dict[int, list[dict]] = {j: [] for j in latents}
    for j, name in todo:
        vec = steering_vectors(cc, [j], [rows.loc[j, "max_act"]], model=name)[0]
        alphas = torch.tensor(cfg.alphas, dtype=torch.float32, device=vec.device)
        kl_mean, kl_last = steering_kl(models[name], pair.tokenizer, [p["text"] for p in prompts], pair.layer,
                                       alphas[:, None] * vec[None], batch_size=cfg.batch_size)
        for k, a in enumerate(cfg.alphas):
            with steering(models[name], pair.layer, a * vec):
                gens, rates = measure_generations(models[name], pair.tokenizer, prompts, behaviours, cfg)
            per_latent[j].append({"model": name, "alpha": a, "kl_mean": float(kl_mean[k]), "kl_last": float(kl_last[k]),
                                  "rates": rates,
                                  "examples": [{"prompt": prompts[i]["text"], "expected": prompts[i]["expected"],
                                                "response": gens[i]} for i in ex]})
            bar.update(1)
    bar.close()
    for j in latents:
        r = rows.loc[j]
        results.append({"latent": j, "class": r["class"], "max_act": float(r["max_act"]),
                        "nu_rank": float(r["nu_rank"]) if "nu_rank" in r and np.isfinite(r["nu_rank"]) else None,
                        "chosen_for": (chosen_for or {}).get(j, ["given"]), "runs": per_latent[j]})
    out = {"alphas": list(cfg.alphas), "models": list(cfg.models), "n_prompts": len(prompts),
           "prompt_kinds": {k: sum(1 for p in prompts if str(p.get("expected")) == k)
                            for k in sorted({str(p.get("expected")) for p in prompts})},
           "has_ground_truth": behaviours is not None,
           "behaviours": steering_record(behaviours) if behaviours is not None else [],
           "baseline": baseline, "latents": results, "config": asdict(cfg), "seconds": time.perf_counter() - t0}
    return json_safe(out)


def behaviour_names(steer: dict) -> list[str]:
    """The behaviours a steering result measured (its ``behaviours`` record, else its baseline's rates)."""
    if steer.get("behaviours"):
        return [b["name"] for b in steer["behaviours"]]
    for b in (steer.get("baseline") or {}).values():
        if (b or {}).get("rates"):
            return list(b["rates"]["rates"])
    return []


def behaviour_effects(steer: dict, behaviour: str, model: str = "base") -> pd.DataFrame:
    """One row per (latent, a) run on ``model``: the ``behaviour``'s trigger and other rates steered and
    unsteered, the same for its onset (answers that open with its first word), and the rises on trigger
    prompts (``rise``, ``onset_rise``) and on the other prompts (``other_rise``, ``onset_other_rise``: for the
    chat model, which already shows the behaviour on its triggers). Empty without behaviour rates."""
    rows = []
    if not steer.get("has_ground_truth"):
        return pd.DataFrame(rows)
    base_rates = (steer["baseline"].get(model) or {}).get("rates") or {}
    b0 = base_rates.get("rates", {}).get(behaviour, {})
    for lat in steer["latents"]:
        for run in lat["runs"]:
            if run["model"] != model or not run.get("rates"):
                continue
            r = run["rates"]["rates"].get(behaviour, {})
            rows.append({"latent": lat["latent"], "class": lat["class"], "nu_rank": lat.get("nu_rank"),
                         "alpha": run["alpha"], "trigger_rate": r.get("trigger_rate"), "other_rate": r.get("other_rate"),
                         "trigger_rate_unsteered": b0.get("trigger_rate"), "other_rate_unsteered": b0.get("other_rate"),
                         "onset_trigger_rate": r.get("onset_trigger_rate"), "onset_other_rate": r.get("onset_other_rate"),
                         "onset_trigger_rate_unsteered": b0.get("onset_trigger_rate"),
                         "onset_other_rate_unsteered": b0.get("onset_other_rate"),
                         "n_trigger": r.get("n_trigger"), "kl_mean": run["kl_mean"]})
    df = pd.DataFrame(rows)
    if len(df):
        df["rise"] = df["trigger_rate"].astype(float) - df["trigger_rate_unsteered"].astype(float)
        df["onset_rise"] = df["onset_trigger_rate"].astype(float) - df["onset_trigger_rate_unsteered"].astype(float)
        df["other_rise"] = df["other_rate"].astype(float) - df["other_rate_unsteered"].astype(float)
        df["onset_other_rise"] = df["onset_other_rate"].astype(float) - df["onset_other_rate_unsteered"].astype(float)
    return df


def raising_runs(eff: pd.DataFrame, rise: str, *tie: str) -> pd.DataFrame:
    """The rows of :func:`behaviour_effects` with ``rise > 0`` (a rise column), largest rise first, then ``tie``
    columns ascending, then the latent."""
    cols = [rise, *tie, "latent"]
    return eff[eff[rise] > 0].sort_values(cols, ascending=[False] + [True] * (len(cols) - 1), kind="stable")


def steer_crosscoder(crosscoder: str | os.PathLike, latents: str | os.PathLike, *, prompts: Sequence[dict] | None = None,
                     behaviours: Any = None, cfg: SteerConfig | None = None, base: str | None = None,
                     chat: str | None = None, layer: int | None = None) -> tuple[dict, pd.DataFrame | None]:
    """Behaviour tracking (with a behaviour spec), the choice of latents and the steering sweep for a
    crosscoder directory and its ``latents.parquet``. ``behaviours``: a spec (a path
    :func:`~crossdiff_core.behaviours.load_behaviours` reads, or a ``BehaviourSpec``), else
    ``cfg.behaviours``, else none. Prompts: ``prompts``, else ``cfg.prompts`` (a file), else the spec's;
    at most ``cfg.max_prompts`` (each behaviour keeps its share). Latents: ``cfg.latents``, else
    :func:`choose_latents`. Returns the :func:`run_steering` result (plus ``inputs``, ``tracking``: the
    :func:`tracking_summary`, and ``chosen``) and the tracking table (None without a spec)."""
    cfg = cfg or SteerConfig()
    dev = str(resolve_device(cfg.device))
    behaviours = behaviours if behaviours is not None else cfg.behaviours
    spec = load_behaviours(behaviours) if behaviours is not None else None
    cc = CrossCoder.load(crosscoder, device=dev)
    table = read_latents(latents, cc, allow_mismatch=cfg.allow_mismatch)
    if prompts is None and cfg.prompts:
        prompts = read_prompts(cfg.prompts)
    if prompts is None:
        if spec is None:
            raise ConfigError("steering needs prompts: pass a prompt file or a behaviour spec (--behaviours SPEC)")
        prompts = spec.prompts()
    plist = subsample_prompts(prompts, cfg.max_prompts, cfg.seed)
    pair = pair_for(cc, base=base, chat=chat, layer=layer, dtype=cfg.dtype, device=dev, allow_mismatch=cfg.allow_mismatch)
    track = behaviour_tracking(pair, cc, spec, plist, batch_size=cfg.batch_size) if spec is not None else None
    if cfg.latents:
        chosen = [{"latent": int(j), "reasons": ["given"]} for j in cfg.latents]
    else:
        chosen = choose_latents(table, n_top=cfg.n_top, n_shared=cfg.n_shared, tracking=track,
                                n_tracking=cfg.n_tracking, seed=cfg.seed)
    res = run_steering(pair, cc, table, [c["latent"] for c in chosen], plist, cfg, behaviours=spec,
                       chosen_for={c["latent"]: c["reasons"] for c in chosen})
    res["tracking"] = json_safe(tracking_summary(table, track)) if track is not None else None
    res["inputs"] = {"crosscoder": str(crosscoder), CROSSCODER_SHA: cc.weights_sha256, "latents": str(latents),
                     "fingerprints": pair.fingerprints(), "models_check": pair.models_check,
                     "behaviours": (spec.source or "given") if spec is not None else None,
                     "models": {"base": pair.base_name, "chat": pair.chat_name}, "layer": pair.layer}
    return res, track
