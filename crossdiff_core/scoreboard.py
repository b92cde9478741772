"""The scoreboard (issue 13): every diffing method scored against the known behaviours the same way.

A *method* proposes ``N`` directions in block ``L``'s residual space (the chat model's units), most
promising first:

- ``<kind>_dnorm``: a crosscoder's ``N`` most chat-specific live latents (:func:`~crossdiff_core.chat_rank.chat_ranking`:
  Δnorm, then ν), each as its chat decoder row ``s_c W_dec[1, j]``;
- ``<kind>_nu``: its chat-only latents by ν rank (``latents.parquet``'s ``nu_rank``), filled up from the
  Δnorm ranking when fewer than ``N`` are chat-only;
- ``<kind>_dnorm_codes``, ``<kind>_nu_codes`` (``readings`` has ``codes``): the same latents read by their own
  codes instead of by a projection (step 1): a crosscoder's latent is a detector before it is a direction, and
  a latent that fires on the trigger tokens need not have a decoder row that stands out in ``h_chat``;
- ``<kind>_track`` (``rankings`` has ``track``): the latents that track the behaviours, the only method that reads
  the behaviour labels: per behaviour the live latents ranked as trackers on the prompts by the steer stage's rule
  (:func:`~crossdiff_core.behaviour_tracking.rank_trackers`: the AUROC of a latent's largest code, ties to
  chat-only, then ν), and the best trackers taken in turn (the best of each behaviour, then the second best, ...)
  up to ``N``. A latent that tracks
  a behaviour is often shared (the concept is in both models; what changed is how later blocks use it), so no
  chat-specificity ranking finds it. Its detection AUROC is cross-fitted, since a latent picked by its AUROC on
  the prompts it is scored on would beat every unsupervised method by construction: the prompts are split in two
  halves (stratified by what each should trigger, seeded), the best tracker of one half is scored on the other,
  and the two held-out AUROCs are averaged. Its steering and KL patch use the trackers picked on all prompts: a
  direction chosen for detecting a behaviour is not thereby chosen to cause it;
- ``lens``: the activation-difference lens at ``L`` (:mod:`crossdiff_core.diff_lens`): each source's ``δ_L``,
  then its per-position ``δ_{L,p}``, largest first;
- ``random``: ``N`` isotropic Gaussian directions (seeded): the floor every score is read against.

Each method's directions ``u_1..u_N`` are scored on the behaviour spec's prompts and the held-out
conversations with the same prompts, budgets and ``N``:

1. **Detection.** A prompt's score for ``u`` is ``max_t ⟨h_chat,L[t], u/‖u‖⟩`` over its tokens (BOS excluded);
   for a ``_codes`` method it is the latent's largest code ``max_t f_j(h_base,L[t], h_chat,L[t])`` there instead
   (:func:`~crossdiff_core.behaviour_tracking.prompt_max_activations`). Per behaviour ``b`` the AUROC of its
   trigger prompts against all others (:func:`~crossdiff_core.behaviour_tracking.auroc`). The method's
   detection is the best of its ``N`` (``_track``: cross-fitted, above); its ``steer_top`` best-detecting
   directions (a latent's chat decoder row, whatever the reading) are the ones steered, and a direction two
   methods share is steered and patched once.
2. **Steering.** Each of those directions, ``v = a · r_m · u/‖u‖``, is added at every position while the base
   and the chat model answer every prompt greedily, for each ``a``. ``r_m`` is a block-``L`` scale over the prompts'
   tokens (``steer_unit``):

   - ``peak`` (default): the direction's own reach, ``r = max_t ⟨h_c[t] − h̄_c, u/‖u‖⟩``, how far the chat model's
     tokens go along ``u`` above their mean (``h̄_c``), in the base model times the ratio of the two models'
     spreads. It is the analogue of the crosscoder steering stage's ``a · max_act_j`` (a latent pushed as far as
     it ever fires): a = 1 puts every token where the direction's strongest token already is;
   - ``spread``: the model's RMS distance of a token's activation from the mean, ``sqrt(E_t ‖h_t − h̄‖²)``, the
     same for every direction;
   - ``norm``: the model's mean norm ``E_t ‖h_t‖`` (the lens paper's).

   Models with massive activations (a few coordinates far from 0 on every token, as SmolLM2's) have a mean norm
   set by those coordinates, which no direction orthogonal to them moves: a × that norm wrecks the answers at
   a = 1 and moves nothing at 0.25, and a × the spread (0.69 of the norm there) still wrecks them at a = 1
   (BENCHMARKS.md): one scale for every direction is far too large for a single feature's direction. The
   behaviour's rate over all prompts (triggers and others pooled) at the best ``a`` and the best of the
   ``steer_top`` directions is the headline, beside the unsteered rate (per model): every method gets the same
   number of tries, so the random control's best is the floor for the same budget.
3. **KL gap.** On the held-out conversations the chat model's block-``L`` output is replaced by
   ``h_S = h_b + P_U (h_c − h_b)``, ``P_U`` the orthogonal projection onto the span of the method's ``N``
   directions, and the chat model runs on (:func:`~crossdiff_core.kl_eval.kl_gap`): the share
   ``1 − KL(p_chat‖p_S) / KL(p_chat‖p_base)`` of the gap closed, per token group (first 9 answer tokens,
   every answer token, template tokens). The same patch for every method: a crosscoder's own latent patch
   (the evaluate stage's sets) adds its codes instead, which no other method has.

What each method says changed: the chat model's logit-lens reading (final norm and unembedding,
:func:`~crossdiff_core.diff_lens.logit_lens`) of its first directions' top tokens, and for a crosscoder the
latent ids (whose cards the report shows).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .behaviour_tracking import auroc, prompt_max_activations, rank_trackers, tracking_table
from .behaviours import measure, rules
from .chat_rank import top_chat
from .config import from_dict, neutral
from .crosscoder import CrossCoder
from .decoder_norms import CHAT_ONLY
from .diff_lens import DiffLensConfig, logit_lens, token_readings
from .errors import ConfigError, CrossdiffError
from .generation import pad_token_id, render_prompts, right_pad
from .kl_eval import CATEGORIES, KLConfig, kl_gap
from .models import ModelPair
from .patch_sets import PatchSet, nu_order
from .steering import steering, subsample_prompts

FORMAT_VERSION = 1
RANKINGS = ("dnorm", "nu", "track")
READINGS = ("projection", "codes")
STEER_UNITS = ("peak", "spread", "norm")
MODELS = ("base", "chat")
_LENS = DiffLensConfig()


@dataclass
class ScoreboardConfig:
    """Settings of :func:`score_methods` (params.yaml ``scoreboard``): one protocol for every method."""

    n_directions: int = 8  # N: each method's top-N directions, the same for every method
    # a crosscoder's latents ranked by Δnorm (dnorm), ν (nu) and/or how well they track the behaviours (track,
    # the one supervised ranking; its AUROC is cross-fitted): a method each
    rankings: tuple[str, ...] = RANKINGS
    # how a crosscoder method's latents detect: projection (of h_chat on the chat decoder row, as every method) and/or
    # codes (the latent's own code): a method per ranking and reading
    readings: tuple[str, ...] = READINGS
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0)  # steering scale a, in units of steer_unit
    # each method's best-detecting directions steered per behaviour (the best rate counts): the detection-best
    # direction is often not the one that causes the behaviour, and every method gets the same tries
    steer_top: int = 2
    # r_m: peak, each direction's reach max_t <h_c[t] - mean h_c, u> (its strongest token); spread, the block-L
    # activations' sqrt(E||h - mean h||^2); norm, their mean norm (one scale for every direction)
    steer_unit: str = "peak"
    models: tuple[str, ...] = MODELS  # which models the best directions steer
    max_prompts: int | None = 60  # behaviour prompts (each behaviour keeps its share); None: all
    max_new_tokens: int = 20  # tokens generated per steered answer
    seed: int = 0  # the random directions and the prompt subsample
    dtype: str = "float32"  # the models' dtype
    # the lens's mean difference (defaults: DiffLensConfig's); the scoreboard steers its direction as every method's
    lens_positions: int = _LENS.n_positions  # window tokens per sequence
    lens_chat_window: str = _LENS.chat_window  # chat prompts: answer_start (last prompt tokens) or first
    lens_sequences: int = _LENS.n_sequences  # at most this many text documents and chat prompts per source
    lens_top_k: int = _LENS.top_k  # tokens in each of the lens's own logit-lens readings (lens.json)
    batch_size: int = neutral(32)  # prompts per forward / generation batch
    device: str = neutral("cpu")  # torch device
    progress: bool = neutral(True)  # progress bars

    def __post_init__(self) -> None:
        self.lens()  # the lens settings are checked where they live
        for key in ("n_directions", "steer_top"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"scoreboard.{key} must be an int >= 1, got {v!r}")
        self.rankings, self.models, self.readings = tuple(self.rankings), tuple(self.models), tuple(self.readings)
        self.alphas = tuple(float(a) for a in self.alphas)
        bad = [r for r in self.rankings if r not in RANKINGS] + [m for m in self.models if m not in MODELS]
        if bad or not self.rankings:
            raise ConfigError(f"scoreboard.rankings must be a non-empty subset of {RANKINGS} and models of {MODELS}; "
                              f"got {list(self.rankings)} and {list(self.models)}")
        if not self.readings or any(r not in READINGS for r in self.readings):
            raise ConfigError(f"scoreboard.readings must be a non-empty subset of {READINGS}, got {list(self.readings)}")
        if self.steer_unit not in STEER_UNITS:
            raise ConfigError(f"scoreboard.steer_unit must be one of {STEER_UNITS}, got {self.steer_unit!r}")
        if not self.alphas or not all(math.isfinite(a) for a in self.alphas):
            raise ConfigError(f"scoreboard.alphas must be finite numbers (at least one), got {list(self.alphas)}")
        if self.max_prompts is not None and (isinstance(self.max_prompts, bool) or self.max_prompts < 2):
            raise ConfigError(f"scoreboard.max_prompts must be >= 2 or null (all), got {self.max_prompts!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("scoreboard.max_new_tokens and batch_size must be >= 1")

    def lens(self, **data: Any) -> DiffLensConfig:
        """The lens settings of the mean difference (``data``: its data columns and split); no steering of its own."""
        return DiffLensConfig(n_positions=self.lens_positions, chat_window=self.lens_chat_window,
                              n_sequences=self.lens_sequences, top_k=self.lens_top_k, alphas=(), seed=self.seed,
                              dtype=self.dtype, batch_size=self.batch_size, device=self.device, progress=self.progress,
                              **data)

    @classmethod
    def from_dict(cls, d: dict, *, section: str = "scoreboard") -> "ScoreboardConfig":
        """From params.yaml's ``scoreboard`` section; unknown keys are an error."""
        return from_dict(cls, d, section=section)


class Method(NamedTuple):
    """One method's proposals."""

    name: str  # e.g. l1_dnorm, batchtopk_nu, lens, random
    family: str  # crosscoder, lens or random
    directions: torch.Tensor  # [n, d] float32, block-L residual space, the chat model's units; best first
    labels: list[str]  # one per direction (latent 17, δ chat, δ chat p2, random 3)
    latents: list[int] | None  # a crosscoder's latent ids (None for the others)
    description: str
    encoder: CrossCoder | None = None  # detection by these latents' codes; None: by projection (module docstring)
    # a supervised method's latents table: directions, labels and latents stay empty until score_methods picks
    # the trackers from it with the behaviour labels (:func:`tracker_order`); detection is then cross-fitted
    table: pd.DataFrame | None = None

    @property
    def supervised(self) -> bool:
        return self.table is not None


# ---- the methods --------------------------------------------------------------------------------------

def chat_directions(cc: CrossCoder, latents: Sequence[int]) -> torch.Tensor:
    """``s_c W_dec[1, j]`` for each latent: ``[n, d]`` float32 (the chat model's units)."""
    idx = torch.as_tensor(np.asarray(latents, dtype=np.int64), device=cc.W_dec.device)
    return (cc.scales[1].float() * cc.W_dec.detach()[1, idx].float()).cpu()


def crosscoder_methods(cc: CrossCoder, table: pd.DataFrame, kind: str, n: int,
                       rankings: Sequence[str] = RANKINGS, readings: Sequence[str] = ("projection",)) -> list[Method]:
    """A crosscoder's methods: its top ``n`` live latents by each ranking in ``rankings``, read by each of
    ``readings`` (module docstring); the ``track`` ranking is one method whatever the readings (its trackers are
    picked, and read, by their codes)."""
    out = []
    for r in rankings:
        if r == "track":
            out.append(Method(f"{kind}_track", "crosscoder", torch.zeros(0, cc.cfg.d_model), [], [],
                              f"{kind} crosscoder: the live latents that track the behaviours best on the prompts "
                              "(supervised; AUROC cross-fitted)", cc, table))
            continue
        if r == "dnorm":
            lat = [int(j) for j in top_chat(table, n)]
            what = "the most chat-specific live latents (Δnorm, then ν)"
        else:
            co = table[(table["class"] == CHAT_ONLY) & np.isfinite(table["max_act"].to_numpy(dtype=float))]
            lat = [int(j) for j in nu_order(co)][:n]
            lat += [int(j) for j in top_chat(table, n + len(lat)) if int(j) not in lat][: n - len(lat)]
            what = "the chat-only latents by ν rank, filled up by Δnorm"
        if not lat:
            continue  # no live latent: nothing to propose
        dirs, labels = chat_directions(cc, lat), [f"latent {j}" for j in lat]
        if "projection" in readings:
            out.append(Method(f"{kind}_{r}", "crosscoder", dirs, labels, lat, f"{kind} crosscoder: {what}"))
        if "codes" in readings:
            out.append(Method(f"{kind}_{r}_codes", "crosscoder", dirs, labels, lat,
                              f"{kind} crosscoder: {what}, detecting by their codes", cc))
    return out


def lens_method(tensors: Mapping[str, torch.Tensor], layer: int, n: int) -> Method | None:
    """The lens's directions at block ``layer`` from :func:`~crossdiff_core.diff_lens.lens_pair`'s tensors:
    each source's ``δ_L`` (chat first), then the per-position ``δ_{L,p}`` of both, largest first; zero
    vectors (identical models) left out. None when nothing is left."""
    pooled, per = [], []
    for src in ("chat", "text"):
        if f"{src}/delta" not in tensors:
            continue
        pooled.append((f"δ {src}", tensors[f"{src}/delta"][layer].float()))
        pp = tensors[f"{src}/delta_per_position"][layer].float()  # [n_positions, d]
        per += [(f"δ {src} p{p}", pp[p]) for p in range(pp.shape[0])]
    per.sort(key=lambda t: -float(t[1].norm()))
    keep = [(lab, v) for lab, v in pooled + per if float(v.norm()) > 0][:n]
    if not keep:
        return None
    return Method("lens", "lens", torch.stack([v for _, v in keep]), [lab for lab, _ in keep], None,
                  "activation-difference lens: mean chat − base at the layer (pooled, then per position)")


def random_method(d: int, n: int, seed: int = 0) -> Method:
    """``n`` isotropic Gaussian directions in ``d`` dimensions (seeded): the control."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    return Method("random", "random", torch.randn(n, d, generator=g, dtype=torch.float64).float(),
                  [f"random {i}" for i in range(n)], None, f"{n} random directions (seed {seed}): the floor")


# ---- detection ----------------------------------------------------------------------------------------

def unit(directions: torch.Tensor) -> torch.Tensor:
    """Rows scaled to norm 1 (a zero row stays zero): ``[n, d]`` float32."""
    d = directions.double()
    n = d.norm(dim=1, keepdim=True)
    return torch.where(n > 0, d / n.clamp_min(1e-300), torch.zeros_like(d)).float()


def halves(expected: np.ndarray, seed: int = 0) -> np.ndarray:
    """``[P]`` int64 in {0, 1}: the prompts split in two halves, each kind of ``expected`` (what a prompt should
    trigger, "" for nothing) dealt alternately after a seeded shuffle, so each half has its share of every kind."""
    expected = np.asarray(expected)
    fold = np.zeros(len(expected), dtype=np.int64)
    rng = np.random.default_rng(int(seed) + 104729)
    for kind in sorted(set(expected.tolist())):
        idx = rng.permutation(np.flatnonzero(expected == kind))
        fold[idx] = np.arange(len(idx)) % 2
    return fold


def _desc(a: np.ndarray) -> np.ndarray:
    """Column order by AUROC, best first, NaN last, ties by column (a stable sort)."""
    return np.argsort(-np.nan_to_num(np.asarray(a, dtype=np.float64), nan=-np.inf), kind="stable")


def tracker_order(table: pd.DataFrame, acts: np.ndarray, expected: np.ndarray, behaviour: str) -> np.ndarray:
    """The live latents of ``table`` as trackers of ``behaviour`` on these prompts, best first
    (:func:`~crossdiff_core.behaviour_tracking.rank_trackers` on the prompt-max codes ``acts [P, F]``; ``expected
    [P]`` what each prompt should trigger): ``[≤ F]`` int64 latent ids, empty when a side has no prompt."""
    tracking = tracking_table(acts, expected, [behaviour])
    return rank_trackers(table, tracking, behaviour)["latent"].to_numpy(np.int64)


def pick_trackers(orders: Sequence[Sequence[int]], n: int) -> list[int]:
    """``n`` ids from per-behaviour orders (best first), taken in turn: every behaviour's best, then every
    behaviour's second best, ..., each id once."""
    picked: list[int] = []
    for rank in range(max((len(o) for o in orders), default=0)):  # stops after at most n ranks
        for o in orders:
            if rank < len(o) and int(o[rank]) not in picked:
                picked.append(int(o[rank]))
            if len(picked) == n:
                return picked
    return picked


def crossfit_auroc(table: pd.DataFrame, acts: np.ndarray, expected: np.ndarray, behaviour: str,
                   fold: np.ndarray) -> float:
    """The held-out AUROC of picking the best tracker of ``behaviour`` (:func:`tracker_order`): the best on one
    half of the prompts (``fold`` 0 / 1) scored on the other, both ways, averaged. NaN when a half lacks a side."""
    acts, expected = np.asarray(acts), np.asarray(expected)
    positive, held = expected == behaviour, []
    for f in (0, 1):
        pick, test = fold != f, fold == f
        order = tracker_order(table, acts[pick], expected[pick], behaviour)
        if not len(order):
            return float("nan")
        held.append(float(auroc(acts[test][:, [int(order[0])]], positive[test])[0]))
    return float(np.mean(held))


class Projections(NamedTuple):
    """What :func:`prompt_projections` reads from the prompts' block-L activations."""

    scores: torch.Tensor  # [P, K] float32: each prompt's largest projection max_t <h_c[t], u> (detection)
    scales: dict[str, dict[str, float]]  # {"norm": {"base": E||h_b||, "chat": ...}, "spread": {...}}: per model
    peaks: torch.Tensor  # [K] float32: each direction's reach max_t <h_c[t] - mean h_c, u> over all prompts' tokens


@torch.inference_mode()
def prompt_projections(pair: ModelPair, prompts: Sequence[str], U: torch.Tensor, *, batch_size: int = 32
                       ) -> Projections:
    """Each prompt's largest projection ``max_t ⟨h_chat,L[t], u⟩`` on each direction ``U [K, d]`` (unit rows)
    over its rendered tokens (BOS excluded), each model's block-L scales over those tokens (``norm`` E‖h‖ and
    ``spread`` sqrt(E‖h − h̄‖²)) and each direction's reach above the chat model's mean token (the ``peak``
    steering unit): :class:`Projections`."""
    rows, pad = render_prompts(pair.tokenizer, prompts), pad_token_id(pair.tokenizer)
    bos = pair.tokenizer.bos_token_id
    Ud = U.to(device=pair.device, dtype=torch.float32)
    out = torch.empty(len(rows), U.shape[0], dtype=torch.float32)
    # per model, float64 sums over tokens of ‖h‖, ‖h‖² and h: the mean norm and the spread E‖h‖² − ‖E h‖²
    norm_sum, sq_sum = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    vec_sum, n_tok = torch.zeros(2, pair.d_model, dtype=torch.float64), 0
    for a in range(0, len(rows), batch_size):
        chunk = rows[a:a + batch_size]
        ids, attn = right_pad(chunk, pad)
        h_b, h_c = pair.residuals(ids.to(pair.device), attn.to(pair.device))  # [B, T, d] each
        m = (attn.bool() & (ids != bos)) if bos is not None else attn.bool()
        m = m.to(h_c.device)
        proj = h_c.float() @ Ud.T  # [B, T, K]
        proj = proj.masked_fill(~m[..., None], float("-inf"))
        out[a:a + len(chunk)] = proj.amax(1).cpu()
        h = torch.stack([h_b[m], h_c[m]]).double()  # [2, tokens, d]
        norm_sum += h.norm(dim=-1).sum(1).cpu()
        sq_sum += h.pow(2).sum((1, 2)).cpu()
        vec_sum += h.sum(1).cpu()
        n_tok += int(m.sum())
    n = max(1, n_tok)
    spread = (sq_sum / n - (vec_sum / n).pow(2).sum(1)).clamp_min(0).sqrt()
    scales = {"norm": norm_sum / n, "spread": spread}
    # max_t <h_c[t], u> - <mean h_c, u>: the prompts' own maxima, less the mean token's projection (>= 0)
    peaks = (out.double().amax(0) - (vec_sum[1] / n) @ U.detach().double().cpu().T).clamp_min(0) if len(rows) \
        else torch.zeros(U.shape[0])
    return Projections(out, {u: {"base": float(v[0]), "chat": float(v[1])} for u, v in scales.items()}, peaks.float())


def steer_scales(steer_unit: str, scales: Mapping[str, Mapping[str, float]], peak: float) -> dict[str, float]:
    """``r_m`` per model for one direction (module docstring, step 2): the model's ``spread`` or ``norm``, or for
    ``peak`` the direction's reach ``peak`` in the chat model, in the base model in its units (times the ratio of
    the base's spread to the chat's)."""
    if steer_unit != "peak":
        return dict(scales[steer_unit])
    sp = scales["spread"]
    ratio = sp["base"] / sp["chat"] if sp["chat"] > 0 else 1.0
    return {"base": peak * ratio, "chat": peak}


# ---- KL -----------------------------------------------------------------------------------------------

class SubspacePatcher:
    """What each set adds to ``h_b``: ``P_U (h_c − h_b)``, ``P_U`` the projection onto the span of the set's
    directions (the chat and base references add nothing; the chat one is not patched at all)."""

    def __init__(self, sets: Sequence[PatchSet], bases: Mapping[str, torch.Tensor], device: Any):
        # an orthonormal basis of each set's span (QR of its [d, n] directions; dependent ones add nothing)
        self.sets = list(sets)
        self.Q: list[torch.Tensor | None] = []
        for s in self.sets:
            D = bases.get(s.name)
            if D is None:
                self.Q.append(None)
                continue
            q, r = torch.linalg.qr(D.double().T)  # [d, n]
            keep = r.diagonal().abs() > 1e-8 * max(1.0, float(r.diagonal().abs().max()))
            self.Q.append(q[:, keep].float().to(device))

    @torch.no_grad()
    def deltas(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, 2, d]`` (base, chat) -> ``[S, N, d]`` float32."""
        diff = (x[:, 1] - x[:, 0]).float()
        out = torch.zeros(len(self.sets), *diff.shape, dtype=torch.float32, device=diff.device)
        for i, Q in enumerate(self.Q):  # a handful of sets
            if Q is not None:
                out[i] = (diff @ Q) @ Q.T
        return out


def subspace_kl(pair: ModelPair, methods: Sequence[Method], sequences: Sequence[Any], cfg: KLConfig) -> dict[str, dict]:
    """Per method: ``kl`` and ``gap_closed`` per token group (:data:`~crossdiff_core.kl_eval.CATEGORIES`) of
    the subspace patch; ``"base"``: the base activation's KL (the gap)."""
    sets = [PatchSet("chat", chat=True), PatchSet("base")] + [PatchSet(m.name) for m in methods]
    bases = {m.name: m.directions for m in methods}
    res = kl_gap(pair, None, sequences, sets, cfg,
                 patcher=lambda ordered: SubspacePatcher(ordered, bases, pair.device))
    gap = res.gap_closed()

    def num(v: float) -> float | None:
        return float(v) if math.isfinite(float(v)) else None

    out = {s.name: {"kl": {c: num(res.kl[k, i]) for i, c in enumerate(CATEGORIES)},
                    "gap_closed": {c: num(gap[k, i]) for i, c in enumerate(CATEGORIES)}}
           for k, s in enumerate(sets) if s.name != "chat"}
    out["n_tokens"] = {c: int(res.n_tokens[i]) for i, c in enumerate(CATEGORIES)}
    out["n_sequences"] = res.n_sequences
    return out


# ---- steering -----------------------------------------------------------------------------------------

def pooled_rate(r: Mapping[str, Any]) -> float:
    """A behaviour's rate over all prompts from its trigger and other rates (NaN sides count as empty)."""
    nt, no = int(r.get("n_trigger") or 0), int(r.get("n_other") or 0)
    tr, ot = r.get("trigger_rate"), r.get("other_rate")
    hits = (tr * nt if nt and tr is not None and math.isfinite(tr) else 0.0) + \
           (ot * no if no and ot is not None and math.isfinite(ot) else 0.0)
    return hits / (nt + no) if nt + no else float("nan")


def _rates(model: Any, pair: ModelPair, spec: Any, prompts: list[dict], cfg: ScoreboardConfig) -> dict:
    m = measure(model, spec, prompts, tokenizer=pair.tokenizer, max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size)
    return {b: {**r, "rate": pooled_rate(r)} for b, r in m["rates"].items()}


# ---- the whole board ----------------------------------------------------------------------------------

def score_methods(pair: ModelPair, methods: Sequence[Method], spec: Any, sequences: Sequence[Any],
                  cfg: ScoreboardConfig | None = None, kl_cfg: KLConfig | None = None) -> dict:
    """Score every method (module docstring) on the behaviour spec ``spec`` (its prompts, at most
    ``cfg.max_prompts``) and the held-out conversations ``sequences``; ``pair`` is at the methods' layer.
    Returns the JSON-friendly board: ``methods`` (per method its directions, top tokens, KL and, per
    behaviour, ``auroc``, ``aurocs``, ``best``, ``steer``), ``rows`` (one per method and behaviour: the
    table), ``unsteered`` rates, ``kl_base`` and the settings."""
    cfg = cfg or ScoreboardConfig()
    methods = list(methods)
    if not methods:
        raise ConfigError("the scoreboard got no methods: train a crosscoder or give the lens data")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"method names must be unique, got {names}")
    d = pair.d_model
    for m in methods:
        if m.directions.ndim != 2 or m.directions.shape[1] != d or not bool(torch.isfinite(m.directions).all()):
            raise CrossdiffError(f"method {m.name}: directions must be finite [n, {d}], got {list(m.directions.shape)}")
        if m.encoder is not None and (m.latents is None or len(m.latents) < min(cfg.n_directions, len(m.directions))):
            raise CrossdiffError(f"method {m.name} reads codes: it needs a latent id per direction")
        if m.supervised and m.encoder is None:
            raise CrossdiffError(f"method {m.name} picks trackers: it needs the crosscoder (encoder) whose codes it reads")
    behaviours = [b.name for b in rules(spec)]
    prompts = subsample_prompts(spec.prompts(), cfg.max_prompts, cfg.seed)
    expected = np.array([p.get("expected") or "" for p in prompts])
    fold = halves(expected, cfg.seed)
    t0 = time.perf_counter()
    texts = [p["text"] for p in prompts]
    codes: dict[int, torch.Tensor] = {}  # per crosscoder: each latent's largest code on each prompt [P, F]
    for m in methods:
        if m.encoder is not None and id(m.encoder) not in codes:
            codes[id(m.encoder)] = prompt_max_activations(pair, m.encoder, texts, batch_size=cfg.batch_size).cpu()
    crossfit: dict[int, dict[str, float]] = {}  # supervised methods: the cross-fitted AUROC per behaviour
    for i, m in enumerate(methods):
        if m.supervised:
            acts = codes[id(m.encoder)].numpy()
            crossfit[i] = {b: crossfit_auroc(m.table, acts, expected, b, fold) for b in behaviours}
            lat = pick_trackers([tracker_order(m.table, acts, expected, b) for b in behaviours], cfg.n_directions)
            methods[i] = m._replace(directions=chat_directions(m.encoder, lat), latents=lat,
                                    labels=[f"latent {j}" for j in lat])
    U = [unit(m.directions[: cfg.n_directions]) for m in methods]
    sizes = [u.shape[0] for u in U]
    proj = prompt_projections(pair, texts, torch.cat(U), batch_size=cfg.batch_size)
    per_method = list(torch.split(proj.scores, sizes, dim=1))
    for i, m in enumerate(methods):
        if m.encoder is not None:
            per_method[i] = codes[id(m.encoder)][:, torch.as_tensor(m.latents[: sizes[i]], dtype=torch.long)]
    peaks = torch.split(proj.peaks, sizes)
    t1 = time.perf_counter()

    # detection first: per method and behaviour its steer_top best directions, hence the steering runs to make;
    # methods that share a direction (a ranking read two ways) share its runs
    det = [{b: auroc(sc.numpy(), expected == b) for b in behaviours} for sc in per_method]
    tops = [{b: [int(j) for j in _desc(a)[: cfg.steer_top]] for b, a in dm.items()} for dm in det]
    key = [[u[j].detach().cpu().numpy().tobytes() for j in range(u.shape[0])] for u in U]
    todo: dict[bytes, tuple[int, int]] = {}
    for i, tm in enumerate(tops):
        for j in sorted({j for js in tm.values() for j in js}):
            todo.setdefault(key[i][j], (i, j))
    models = {"base": pair.base, "chat": pair.chat}
    unsteered = {name: _rates(models[name], pair, spec, prompts, cfg) for name in cfg.models}
    steered: dict[bytes, dict[str, list[dict]]] = {}
    reach = {k: steer_scales(cfg.steer_unit, proj.scales, float(peaks[i][j])) for k, (i, j) in todo.items()}
    with tqdm(total=len(todo) * len(cfg.models) * len(cfg.alphas), disable=not cfg.progress,
              desc="scoreboard steer", unit="run") as bar:
        for k, (i, j) in todo.items():
            steered[k] = {}
            for name in cfg.models:
                runs = steered[k][name] = []
                for alpha in cfg.alphas:
                    with steering(models[name], pair.layer, (U[i][j] * (alpha * reach[k][name])).to(pair.device)):
                        runs.append({"alpha": alpha, "rates": _rates(models[name], pair, spec, prompts, cfg)})
                    bar.update(1)
    board = []
    for i, (m, u) in enumerate(zip(methods, U)):
        rec = {"name": m.name, "family": m.family, "description": m.description, "labels": m.labels[: u.shape[0]],
               "reading": "projection" if m.encoder is None else "codes", "supervised": m.supervised,
               "latents": None if m.latents is None else m.latents[: u.shape[0]],
               "norms": [float(v) for v in m.directions[: u.shape[0]].norm(dim=1)], "behaviours": {}}
        for b in behaviours:
            a, js = det[i][b], tops[i][b]
            steer, scale = {}, {}
            for name in cfg.models:
                tried = [(j, r) for j in js for r in steered[key[i][j]][name]]  # (direction, run)
                runs = [{"label": rec["labels"][j], "alpha": r["alpha"],
                         **{x: r["rates"][b][x] for x in ("rate", "trigger_rate", "other_rate")}} for j, r in tried]
                k = int(np.nanargmax(np.nan_to_num([r["rate"] for r in runs], nan=-1.0)))
                steer[name] = {"unsteered": unsteered[name][b]["rate"], "best": runs[k]["rate"],
                               "best_alpha": runs[k]["alpha"], "best_label": runs[k]["label"], "runs": runs}
                scale[name] = reach[key[i][tried[k][0]]][name]
            in_sample = float(a[js[0]]) if np.isfinite(a[js[0]]) else None
            held = crossfit[i][b] if i in crossfit else in_sample
            rec["behaviours"][b] = {"auroc": held if held is None or math.isfinite(held) else None,
                                    "aurocs": [float(v) if np.isfinite(v) else None for v in a],
                                    "best": js[0], "best_label": rec["labels"][js[0]], "steer": steer,
                                    "steer_scale": scale}
            if i in crossfit:
                rec["behaviours"][b]["auroc_in_sample"] = in_sample
        board.append(rec)
    t2 = time.perf_counter()
    spans: dict[bytes, Method] = {}  # one patch per distinct set of directions
    patch_of = {}
    for m in methods:
        top = m.directions[: cfg.n_directions]
        patch_of[m.name] = spans.setdefault(top.detach().cpu().float().numpy().tobytes(),
                                            Method(m.name, m.family, top, m.labels, m.latents, m.description)).name
    kl = subspace_kl(pair, list(spans.values()), sequences, kl_cfg or KLConfig(progress=cfg.progress))
    for rec in board:
        rec.update(kl=kl[patch_of[rec["name"]]]["kl"], gap_closed=kl[patch_of[rec["name"]]]["gap_closed"])
    t3 = time.perf_counter()
    readings = token_readings(logit_lens(pair.chat, torch.cat(U).to(pair.device)), pair.tokenizer, 8)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    for rec, a in zip(board, starts):  # each method's first three directions
        rec["top_tokens"] = [{"label": lab, **rd} for lab, rd in zip(rec["labels"][:3], readings[a:a + 3])]
    rows = [{"method": rec["name"], "family": rec["family"], "reading": rec["reading"], "supervised": rec["supervised"],
             "behaviour": b, "auroc": v["auroc"], "best": v["best_label"],
             **{f"steer_{name}": v["steer"][name]["best"] for name in cfg.models},
             **{f"steered_{name}": v["steer"][name]["best_label"] for name in cfg.models},
             **{f"unsteered_{name}": v["steer"][name]["unsteered"] for name in cfg.models},
             **{f"steer_scale_{name}": v["steer_scale"][name] for name in cfg.models},
             "gap_closed_first9": rec["gap_closed"]["first9"], "gap_closed_response": rec["gap_closed"]["response"]}
            for rec in board for b, v in rec["behaviours"].items()]
    return {"format_version": FORMAT_VERSION, "layer": pair.layer, "n_directions": cfg.n_directions,
            "behaviours": behaviours, "n_prompts": len(prompts),
            "prompt_kinds": {k: int((expected == k).sum()) for k in sorted(set(expected))},
            "steer_norms": proj.scales.get(cfg.steer_unit), "steer_unit": cfg.steer_unit, "steer_scales": proj.scales,
            "unsteered": unsteered, "kl_base": kl["base"]["kl"],
            "kl_tokens": kl["n_tokens"], "kl_sequences": kl["n_sequences"], "methods": board, "rows": rows,
            "config": asdict(cfg), "timings": {"detect_s": t1 - t0, "steer_s": t2 - t1, "kl_s": t3 - t2,
                                               "total_s": time.perf_counter() - t0}}


def headline(board: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics/scoreboard.json``: per method and behaviour the AUROC and the steered rates, per method the
    KL gap closed (first 9 answer tokens and every answer token); numbers only (a DVC metric)."""
    out: dict[str, Any] = {}
    for rec in board["methods"]:
        m = {"gap_closed_first9": rec["gap_closed"]["first9"], "gap_closed_response": rec["gap_closed"]["response"]}
        for b, v in rec["behaviours"].items():
            m[b] = {"auroc": v["auroc"], **{f"steer_{name}": s["best"] for name, s in v["steer"].items()}}
        out[rec["name"]] = m
    return out


def build_scoreboard(crosscoders: Mapping[str, tuple[str, str]], *, behaviours: Any, evaluate: Any,
                     text: Sequence[Any] = (), text_column: str = "text", cfg: ScoreboardConfig | None = None,
                     base: str | None = None, chat: str | None = None, layer: int | None = None
                     ) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """The scoreboard of a pipeline run: ``crosscoders`` maps each kind to its (crosscoder directory,
    ``latents.parquet``), all trained on one cache (their pair and layer are the models'); ``behaviours``: the
    spec (a path or :class:`~crossdiff_core.behaviours.BehaviourSpec`); ``evaluate``: an
    :class:`~crossdiff_core.kl_eval.EvaluateConfig` (the held-out conversations of the KL gap, whose first
    user turns are also the lens's chat prompts); ``text``: plain-text sources for the lens (their
    ``text_column``); ``base``, ``chat``, ``layer``: the pair and block, default those of the first crosscoder's
    training cache. Returns the
    board, the lens JSON and the lens tensors (:func:`~crossdiff_core.diff_lens.write_lens` writes them)."""
    from .behaviours import load_behaviours
    from .data import build_corpus
    from .diff_lens import lens_pair, load_texts, text_rows
    from .models import resolve_device
    from .runs import CROSSCODER_SHA, pair_for, read_latents
    from .steering import first_user_turns

    cfg = cfg or ScoreboardConfig()
    if not crosscoders:
        raise ConfigError("the scoreboard needs at least one trained crosscoder (train.kinds)")
    if behaviours is None:
        raise ConfigError("the scoreboard needs a behaviour spec (models.behaviours, or the toy pair's ground truth): "
                          "it scores each method against known behaviours")
    spec = load_behaviours(behaviours)
    dev = str(resolve_device(cfg.device))
    loaded = {k: CrossCoder.load(cc_dir, device=dev) for k, (cc_dir, _) in crosscoders.items()}
    first = next(iter(loaded.values()))
    pair = pair_for(first, base=base, chat=chat, layer=layer, dtype=cfg.dtype, device=dev)
    methods: list[Method] = []
    inputs = {"crosscoders": {}, "behaviours": spec.source or "given", "layer": pair.layer,
              "models": {"base": pair.base_name, "chat": pair.chat_name}, "fingerprints": pair.fingerprints()}
    for kind, cc in loaded.items():
        if cc.cfg.d_model != pair.d_model or (cc.cfg.cache != first.cfg.cache):
            raise CrossdiffError(f"the {kind} crosscoder was trained on another cache ({cc.cfg.cache}, not "
                                 f"{first.cfg.cache}): every method of one scoreboard reads the same layer of one pair")
        table = read_latents(crosscoders[kind][1], cc)
        methods += crosscoder_methods(cc, table, kind, cfg.n_directions, cfg.rankings, cfg.readings)
        inputs["crosscoders"][kind] = {"crosscoder": str(crosscoders[kind][0]), CROSSCODER_SHA: cc.weights_sha256,
                                       "latents": str(crosscoders[kind][1])}
    lc = cfg.lens(split=evaluate.split, messages_column=evaluate.messages_column, text_column=text_column)
    rows: dict[str, list[list[int]]] = {}
    if text:
        rows["text"] = text_rows(pair.tokenizer, load_texts(list(text), lc), lc.n_positions)
    turns = first_user_turns(list(evaluate.chats), evaluate.messages_column, lc.n_sequences) if evaluate.chats else []
    if turns:
        rows["chat"] = render_prompts(pair.tokenizer, [q["text"] for q in turns])
    rows = {k: v for k, v in rows.items() if v}
    lens_json, lens_t = ({}, {})
    if rows:
        lens_json, lens_t = lens_pair(pair, rows, pair.layer, lc)  # no prompts: the lens's own steering is skipped
        lm = lens_method(lens_t, pair.layer, cfg.n_directions)
        if lm is not None:
            methods.append(lm)
    methods.append(random_method(pair.d_model, cfg.n_directions, cfg.seed))
    seqs = build_corpus(pair.tokenizer, evaluate.data()).sequences
    board = score_methods(pair, methods, spec, seqs, cfg, evaluate.kl())
    board["inputs"] = inputs | {"lens_sources": sorted(rows), "evaluate": evaluate.data().to_dict()}
    return board, lens_json, lens_t
