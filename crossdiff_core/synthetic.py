"""Planted ground truth: paired base/chat activations built from known features, and scoring of a
trained crosscoder against them.

Generative model (one token ``n``, model ``m`` in {base, chat}, planted feature ``i``)::

    a[n, i] = fires[n, i] · mag[n, i]          fires ~ Bernoulli(p_i), mag ~ LogNormal(0, magnitude_sigma)
    x_m[n]  = g_m · (Σ_i a[n, i] · scale_m[i] · dir_m[i] + noise_std · ε_m[n])      ε ~ N(0, I_d)

with ``g_base = 1``, ``g_chat = chat_gain``. Both models see the same ``a`` (one concept, two
renderings); what differs per class is ``scale_m`` and ``dir_m`` (unit vectors, zero where absent):

============================  ==========================  ===================================================
class                         base                        chat
============================  ==========================  ===================================================
``shared``                    ``s · u`` (u jittered)      ``s · u``
``chat_only``                 0                           ``s · u``
``base_only``                 ``s · u``                   0
``weakly_shared``             ``ρ s · u``, ρ∈[0.2, 0.5]   ``s · u``   (the Complete Shrinkage case)
``changed_direction``         ``s · w``, cos(u, w)∈[.3,.6] ``s · u``
============================  ==========================  ===================================================

``s`` is a per-feature scale (LogNormal(0, feature_scale_sigma)); firing probabilities are log-uniform
over a ``freq_spread`` range and sum to ``mean_active`` over all planted features. Tokens are laid
out in sequences of ``seq_len``; odd sequences are "chat" sources in which a ``template_frac`` share
of positions are chat-template tokens, and a ``template_feature_frac`` share of the chat-only features
fire only on template tokens (so template-share analysis has something to find).

Everything is drawn from ``seed``: the truth from one stream, each shard from its own, so a shard can
be regenerated alone (``generate_shard``) and the cache equals ``generate``'s output.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .fileio import atomic_write
from .decoder_norms import CLASSES, class_codes, decoder_stats, delta_norm
from .errors import CacheError, ConfigError

SHARED, CHAT_ONLY, BASE_ONLY, WEAKLY_SHARED, CHANGED = (
    "shared", "chat_only", "base_only", "weakly_shared", "changed_direction")
PLANTED_CLASSES = (SHARED, CHAT_ONLY, BASE_ONLY, WEAKLY_SHARED, CHANGED)
TRUTH_JSON, TRUTH_TENSORS = "truth.json", "truth.safetensors"
TRUTH_VERSION = 1


@dataclass
class SyntheticConfig:
    """Settings of the planted-feature generator (see the module docstring for the model)."""

    d_model: int = 64
    n_shared: int = 160
    n_chat_only: int = 40
    n_base_only: int = 40
    n_weakly_shared: int = 40
    n_changed: int = 40
    mean_active: float = 8.0  # expected active planted features per token (all classes)
    freq_spread: float = 10.0  # max/min firing probability (log-uniform in between)
    feature_scale_sigma: float = 0.25  # LogNormal σ of the per-feature scale s
    magnitude_sigma: float = 0.4  # LogNormal σ of the per-activation magnitude
    weak_scale: tuple[float, float] = (0.2, 0.5)  # weakly-shared: base scale / chat scale
    changed_cosine: tuple[float, float] = (0.3, 0.6)  # changed-direction: cos(base dir, chat dir)
    shared_jitter: float = 0.05  # shared: norm of the random perturbation of the base direction
    noise_std: float = 0.05  # isotropic noise per dimension, independent per model
    chat_gain: float = 1.0  # the chat model's overall activation scale (normalisation removes it)
    n_tokens: int = 200_000
    seq_len: int = 128
    shard_tokens: int = 65_536
    template_frac: float = 0.1  # share of a chat sequence's positions that are template tokens
    template_feature_frac: float = 0.25  # share of chat-only features that fire only on template tokens
    seed: int = 0

    def __post_init__(self) -> None:
        self.weak_scale = tuple(float(v) for v in self.weak_scale)
        self.changed_cosine = tuple(float(v) for v in self.changed_cosine)
        counts = [self.n_shared, self.n_chat_only, self.n_base_only, self.n_weakly_shared, self.n_changed]
        if self.d_model <= 0:
            raise ConfigError(f"d_model must be positive, got {self.d_model}")
        if min(counts) < 0 or sum(counts) == 0:
            raise ConfigError(f"feature counts must be >= 0 and not all zero, got {counts}")
        if self.n_tokens <= 0 or self.seq_len <= 0 or self.shard_tokens <= 0:
            raise ConfigError("n_tokens, seq_len and shard_tokens must be positive")
        if not 0 < self.mean_active <= sum(counts):
            raise ConfigError(f"mean_active must be in (0, {sum(counts)}] (the number of planted features), "
                              f"got {self.mean_active}")
        if self.freq_spread < 1:
            raise ConfigError(f"freq_spread is a max/min ratio and must be >= 1, got {self.freq_spread}")
        lo, hi = self.weak_scale
        if not 0 < lo <= hi < 1:
            raise ConfigError(f"weak_scale must satisfy 0 < lo <= hi < 1, got {self.weak_scale}")
        lo, hi = self.changed_cosine
        if not -1 < lo <= hi < 1:
            raise ConfigError(f"changed_cosine must satisfy -1 < lo <= hi < 1, got {self.changed_cosine}")
        for name in ("feature_scale_sigma", "magnitude_sigma", "shared_jitter", "noise_std"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.chat_gain <= 0:
            raise ConfigError(f"chat_gain must be positive, got {self.chat_gain}")
        if not 0 <= self.template_frac <= 1 or not 0 <= self.template_feature_frac <= 1:
            raise ConfigError("template_frac and template_feature_frac must be in [0, 1]")
        if self.template_feature_frac > 0 and self.n_chat_only > 0 and self.template_frac == 0:
            raise ConfigError("template_feature_frac > 0 needs template_frac > 0 (template-only features "
                              "would never fire): raise template_frac or set template_feature_frac=0")

    @property
    def counts(self) -> dict[str, int]:
        return dict(zip(PLANTED_CLASSES, (self.n_shared, self.n_chat_only, self.n_base_only,
                                          self.n_weakly_shared, self.n_changed)))

    @property
    def n_features(self) -> int:
        return sum(self.counts.values())

    @property
    def n_shards(self) -> int:
        return -(-self.n_tokens // self.shard_tokens)

    @classmethod
    def from_dict(cls, d: dict) -> "SyntheticConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Truth:
    """The planted features. ``N`` features, ``d`` dims; directions are unit rows (zero where absent)."""

    config: SyntheticConfig
    class_code: torch.Tensor  # [N] int64 index into PLANTED_CLASSES
    dir_base: torch.Tensor  # [N, d] float32
    dir_chat: torch.Tensor  # [N, d] float32
    scale_base: torch.Tensor  # [N] float32, 0 where absent
    scale_chat: torch.Tensor  # [N] float32 (before chat_gain), 0 where absent
    prob: torch.Tensor  # [N] float32 firing probability on the tokens it may fire on
    freq: torch.Tensor  # [N] float32 expected firing frequency over all tokens
    template_only: torch.Tensor  # [N] bool: fires only on chat-template tokens

    @property
    def n_features(self) -> int:
        return int(self.class_code.shape[0])

    def classes(self) -> list[str]:
        return [PLANTED_CLASSES[i] for i in self.class_code.tolist()]

    def write_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What one unit of activation writes: ``[N, d]`` for base and chat (chat includes ``chat_gain``)."""
        return (self.scale_base[:, None] * self.dir_base,
                self.config.chat_gain * self.scale_chat[:, None] * self.dir_chat)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"class_code": self.class_code, "dir_base": self.dir_base, "dir_chat": self.dir_chat,
                "scale_base": self.scale_base, "scale_chat": self.scale_chat, "prob": self.prob,
                "freq": self.freq, "template_only": self.template_only.to(torch.uint8)}

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write ``truth.safetensors`` (tensors) and ``truth.json`` (config, class names, counts) atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in self._tensors().items()}
        atomic_write(out / TRUTH_TENSORS, lambda p: save_file(tensors, str(p)))
        meta = {"version": TRUTH_VERSION, "classes": list(PLANTED_CLASSES), "counts": self.config.counts,
                "config": asdict(self.config),
                "mixing": "x_m = g_m (sum_i a_i scale_m[i] dir_m[i] + noise_std eps_m); g_base=1, g_chat=chat_gain"}
        atomic_write(out / TRUTH_JSON, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))


def load_truth(cache_dir: str | os.PathLike) -> Truth:
    """Read the planted truth that :func:`write_cache` stored in ``cache_dir``."""
    p = Path(cache_dir)
    if not (p / TRUTH_JSON).is_file() or not (p / TRUTH_TENSORS).is_file():
        raise CacheError(f"{p} has no planted truth ({TRUTH_JSON}, {TRUTH_TENSORS}): only caches made by "
                         "`crossdiff synth` have one; generate one with `crossdiff synth --out DIR`")
    meta = json.loads((p / TRUTH_JSON).read_text())
    if meta.get("version") != TRUTH_VERSION or meta.get("classes") != list(PLANTED_CLASSES):
        raise CacheError(f"{p / TRUTH_JSON} has version {meta.get('version')} / classes {meta.get('classes')}, "
                         f"this crossdiff reads version {TRUTH_VERSION}: regenerate it with `crossdiff synth`")
    t = load_file(str(p / TRUTH_TENSORS))
    return Truth(config=SyntheticConfig.from_dict(meta["config"]), class_code=t["class_code"],
                 dir_base=t["dir_base"], dir_chat=t["dir_chat"], scale_base=t["scale_base"],
                 scale_chat=t["scale_chat"], prob=t["prob"], freq=t["freq"],
                 template_only=t["template_only"].bool())


# ---- generation --------------------------------------------------------------------------------

def _generator(cfg: SyntheticConfig, stream: int) -> torch.Generator:
    """Independent torch stream per purpose (0 = truth, 1 + i = shard i), from the config's seed."""
    state = np.random.SeedSequence([int(cfg.seed), int(stream)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def template_share(cfg: SyntheticConfig) -> float:
    """Expected share of template tokens: half the sequences are chat, ``template_frac`` of their positions."""
    return 0.5 * cfg.template_frac


def make_truth(cfg: SyntheticConfig) -> Truth:
    """Draw the planted features of ``cfg`` (deterministic in ``cfg.seed``)."""
    g = _generator(cfg, 0)
    d, counts = cfg.d_model, cfg.counts
    N = cfg.n_features
    code = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(counts.values())])
    u = _unit(torch.randn(N, d, generator=g))
    other = torch.randn(N, d, generator=g)
    jitter = _unit(torch.randn(N, d, generator=g))
    rho = torch.empty(N).uniform_(*cfg.weak_scale, generator=g)
    cos = torch.empty(N).uniform_(*cfg.changed_cosine, generator=g)
    s = torch.exp(cfg.feature_scale_sigma * torch.randn(N, generator=g))
    logp = torch.empty(N).uniform_(0.0, float(np.log(cfg.freq_spread)), generator=g)
    tmpl_draw = torch.rand(N, generator=g)

    is_ = {c: code == i for i, c in enumerate(PLANTED_CLASSES)}
    # changed direction: w = cos·u + sin·(unit part of `other` orthogonal to u)
    perp = _unit(other - (other * u).sum(-1, keepdim=True) * u)
    w = cos[:, None] * u + (1 - cos**2).sqrt()[:, None] * perp
    shared_b = _unit(u + cfg.shared_jitter * jitter)
    dir_chat = torch.where(is_[BASE_ONLY][:, None], torch.zeros_like(u), u)
    dir_base = torch.where(is_[SHARED][:, None], shared_b, u)
    dir_base = torch.where(is_[CHANGED][:, None], w, dir_base)
    dir_base = torch.where(is_[CHAT_ONLY][:, None], torch.zeros_like(u), dir_base)
    scale_chat = torch.where(is_[BASE_ONLY], 0.0, s)
    scale_base = torch.where(is_[CHAT_ONLY], 0.0, torch.where(is_[WEAKLY_SHARED], rho * s, s))

    freq = torch.exp(logp)
    freq = freq * (cfg.mean_active / freq.sum())
    if float(freq.max()) > 1:
        raise ConfigError(f"mean_active={cfg.mean_active} with freq_spread={cfg.freq_spread} asks for firing "
                          "probabilities above 1: lower mean_active or freq_spread, or plant more features")
    n_tmpl = round(cfg.template_feature_frac * counts[CHAT_ONLY])
    chat_idx = is_[CHAT_ONLY].nonzero().squeeze(1)
    template_only = torch.zeros(N, dtype=torch.bool)
    template_only[chat_idx[tmpl_draw[chat_idx].argsort()[:n_tmpl]]] = True
    # template-only features keep their overall frequency where they can: fire with p/share on template tokens
    share = template_share(cfg)
    prob = torch.where(template_only, (freq / max(share, 1e-12)).clamp(max=1.0), freq)
    freq = torch.where(template_only, prob * share, freq)
    return Truth(cfg, code, dir_base.float(), dir_chat.float(), scale_base.float(), scale_chat.float(),
                 prob.float(), freq.float(), template_only)


def token_layout(cfg: SyntheticConfig, start: int, stop: int, g: torch.Generator) -> dict[str, np.ndarray]:
    """Token columns (DESIGN §2 ``tokens.parquet`` minus shard/row) of global rows ``[start, stop)``."""
    rows = torch.arange(start, stop, dtype=torch.int64)
    seq = rows // cfg.seq_len
    chat_seq = (seq % 2) == 1
    tmpl = chat_seq & (torch.rand(stop - start, generator=g) < cfg.template_frac)
    return {"sequence": seq.numpy(), "position": (rows % cfg.seq_len + 1).to(torch.int32).numpy(),
            "source": np.where(chat_seq.numpy(), "chat", "text"),
            "is_template": tmpl.numpy(), "is_assistant": (chat_seq & ~tmpl).numpy()}


def generate_shard(cfg: SyntheticConfig, truth: Truth, index: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Shard ``index``: ``base, chat [n, d]`` float32 and its token columns; ``token_id`` is 1 + the
    strongest planted feature of the token (0 if none fired), so "top contexts" can be checked by eye."""
    if not 0 <= index < cfg.n_shards:
        raise ConfigError(f"shard index {index} is outside [0, {cfg.n_shards}) for n_tokens={cfg.n_tokens}")
    start, stop = index * cfg.shard_tokens, min(cfg.n_tokens, (index + 1) * cfg.shard_tokens)
    n = stop - start
    g = _generator(cfg, 1 + index)
    tokens = token_layout(cfg, start, stop, g)
    acts = planted_activations(truth, torch.from_numpy(tokens["is_template"]), g)  # [n, N]
    wb, wc = truth.write_vectors()
    base = acts @ wb + cfg.noise_std * torch.randn(n, cfg.d_model, generator=g)
    chat = acts @ wc + cfg.chat_gain * cfg.noise_std * torch.randn(n, cfg.d_model, generator=g)
    strongest = acts.max(dim=1)
    tokens["token_id"] = torch.where(strongest.values > 0, strongest.indices + 1, 0).to(torch.int32).numpy()
    return base, chat, tokens


def planted_activations(truth: Truth, is_template: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``a [n, N]`` float32: Bernoulli(prob) firing times LogNormal(0, magnitude_sigma) magnitude;
    template-only features fire only where ``is_template [n]``."""
    n = is_template.shape[0]
    p = truth.prob[None, :] * torch.where(truth.template_only[None, :], is_template[:, None].float(), 1.0)
    fires = torch.rand(n, truth.n_features, generator=g) < p
    # magnitudes only for the few entries that fire (a few % of them)
    idx = fires.nonzero(as_tuple=True)
    acts = torch.zeros(n, truth.n_features)
    acts[idx] = torch.exp(truth.config.magnitude_sigma * torch.randn(idx[0].numel(), generator=g))
    return acts


def generate(cfg: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor, Truth]:
    """All tokens in memory: ``base, chat [n_tokens, d]`` float32 and the truth (small configs, tests)."""
    truth = make_truth(cfg)
    parts = [generate_shard(cfg, truth, i)[:2] for i in range(cfg.n_shards)]
    return torch.cat([b for b, _ in parts]), torch.cat([c for _, c in parts]), truth


def write_cache(cfg: SyntheticConfig, out_dir: str | os.PathLike, *, dtype: str = "float32",
                progress: bool = False, overwrite: bool = False) -> dict:
    """Write the planted data as an activation cache (DESIGN §2) plus ``truth.json``/``truth.safetensors``;
    returns the manifest. Shards already complete for the same config are kept (re-runs resume); a
    directory holding a cache of another config is refused unless ``overwrite`` (its cache files are
    deleted first, :class:`~crossdiff_core.cache.CacheWriter`)."""
    from .cache import CacheWriter

    truth = make_truth(cfg)
    meta = {"models": {"base": "synthetic:base", "chat": "synthetic:chat"}, "source": "synthetic",
            "synthetic": asdict(cfg)}
    with CacheWriter(out_dir, d_model=cfg.d_model, layer=0, dtype=dtype, metadata=meta, overwrite=overwrite) as writer:
        it = range(cfg.n_shards)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="synth shards", unit="shard")
        for i in it:
            if not writer.is_complete(i):
                base, chat, tokens = generate_shard(cfg, truth, i)
                writer.write_shard(i, base, chat, tokens)
        manifest = writer.finalize(cfg.n_shards)
    truth.save(out_dir)
    return manifest


# ---- scoring -----------------------------------------------------------------------------------

def ideal_delta_norm(truth: Truth, scales: torch.Tensor) -> torch.Tensor:
    """``[N]`` Δnorm a perfect latent for each feature would have in the crosscoder's normalised space
    (decoder norms ∝ write-vector norm / s_m), given the crosscoder's ``scales [2]`` = (s_b, s_c)."""
    wb, wc = truth.write_vectors()
    s = torch.as_tensor(scales, dtype=torch.float32).reshape(2)
    return delta_norm(wb.norm(dim=-1) / s[0], wc.norm(dim=-1) / s[1])


def match_features(W_dec: torch.Tensor, truth: Truth, *, threshold: float = 0.9, scales=None):
    """Best-matching latent for every planted feature, as a pandas DataFrame (one row per feature).

    ``W_dec [2, F, d]``. The match score is the decoder-row cosine with the chat direction for classes
    present in chat (shared, chat-only, weakly-shared), with the base direction for base-only, and the
    smaller of both cosines for changed-direction (both rows must match). Columns: ``feature``,
    ``planted_class``, ``latent``, ``cosine`` (the match score), ``cosine_base``, ``cosine_chat``,
    ``recovered`` (cosine > threshold), ``delta_norm`` and ``latent_class`` of the matched latent, and
    ``ideal_delta_norm`` when ``scales`` are given.
    """
    import pandas as pd

    if W_dec.ndim != 3 or W_dec.shape[0] != 2 or W_dec.shape[2] != truth.config.d_model:
        raise ConfigError(f"W_dec must be [2, F, {truth.config.d_model}] to match the planted truth, got "
                          f"{list(W_dec.shape)}: score a crosscoder trained on this synthetic cache")
    W = W_dec.detach().float().cpu()
    Wn = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos_b = truth.dir_base @ Wn[0].T  # [N, F]
    cos_c = truth.dir_chat @ Wn[1].T
    code = truth.class_code
    crit = torch.where((code == PLANTED_CLASSES.index(BASE_ONLY))[:, None], cos_b, cos_c)
    crit = torch.where((code == PLANTED_CLASSES.index(CHANGED))[:, None], torch.minimum(cos_b, cos_c), crit)
    best, latent = crit.max(dim=1)
    rows = torch.arange(truth.n_features)
    stats = decoder_stats(W)
    df = pd.DataFrame({
        "feature": rows.numpy(),
        "planted_class": truth.classes(),
        "latent": latent.numpy(),
        "cosine": best.numpy(),
        "cosine_base": cos_b[rows, latent].numpy(),
        "cosine_chat": cos_c[rows, latent].numpy(),
        "recovered": (best > threshold).numpy(),
        "delta_norm": stats["delta_norm"][latent].numpy(),
        "latent_class": [CLASSES[i] for i in stats["class_code"][latent].tolist()],
    })
    if scales is not None:
        ideal = ideal_delta_norm(truth, scales)
        df["ideal_delta_norm"] = ideal.numpy()
        df["ideal_class"] = [CLASSES[i] for i in class_codes(ideal).tolist()]
    return df


def score(crosscoder, truth: Truth, *, threshold: float = 0.9) -> dict:
    """Score a crosscoder (or a bare ``W_dec [2, F, d]``) against the planted truth.

    Returns ``recovery`` (share of planted features matched at cosine > threshold, per planted class
    and ``overall``), ``n_features`` per class, ``confusion`` (for recovered features: planted class ->
    Δnorm class of the matched latent -> count), ``chat_only_share`` (per planted class, the share of
    its recovered features whose latent is labelled chat-only: the Complete Shrinkage signature on
    weakly-shared features), ``mean_delta_norm`` per class over recovered features, ``latents_used``
    (distinct latents among the matches) and ``matches`` (the DataFrame of :func:`match_features`).
    """
    if isinstance(crosscoder, torch.Tensor):
        W_dec, scales = crosscoder, None
    else:
        W_dec, scales = crosscoder.W_dec, crosscoder.scales
    df = match_features(W_dec, truth, threshold=threshold, scales=scales)
    rec = df[df["recovered"]]
    recovery, n_feat, confusion, chat_share, mean_dn = {}, {}, {}, {}, {}
    for c in PLANTED_CLASSES:
        sel = df["planted_class"] == c
        n_feat[c] = int(sel.sum())
        if not n_feat[c]:
            continue
        recovery[c] = float(df.loc[sel, "recovered"].mean())
        r = rec[rec["planted_class"] == c]
        confusion[c] = {k: int((r["latent_class"] == k).sum()) for k in CLASSES}
        chat_share[c] = float((r["latent_class"] == CLASSES[0]).mean()) if len(r) else float("nan")
        mean_dn[c] = float(r["delta_norm"].mean()) if len(r) else float("nan")
    recovery["overall"] = float(df["recovered"].mean())
    return {"threshold": threshold, "recovery": recovery, "n_features": n_feat, "confusion": confusion,
            "chat_only_share": chat_share, "mean_delta_norm": mean_dn,
            "latents_used": int(rec["latent"].nunique()), "matches": df}
