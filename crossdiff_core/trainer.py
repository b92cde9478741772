"""Crosscoder training over an activation cache: Adam, LR warm-up/decay, λ warm-up, clipping,
checkpoints with resume, validation, NaN guard, progress bar.

Resume is exact: the data order is a pure function of ``(seed, epoch)`` and the step, and the
checkpoint holds the weights, Adam's state, the EMA threshold and the dead-latent counters, so an
interrupted run continued from its checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .allocator import keep_freed_memory
from .checkpoint import CHECKPOINT, read_checkpoint, remove_partial, settings_differences, write_checkpoint
from .config import from_dict, neutral, result_settings
from .crosscoder import KINDS, CrossCoder, CrossCoderSettings
from .crosscoder_config import DEFAULT_KINDS
from .fileio import atomic_write
from .errors import CacheError, CheckpointError, ConfigError, TrainingDivergedError
from .metrics import _autocast, evaluate
from .models import native_bf16
from .normalisation import cache_scales


log = logging.getLogger(__name__)

@dataclass
class TrainConfig:
    """Training settings (params.yaml ``train``): the crosscoder to build (``crosscoder``, as sparsify's
    ``TrainConfig.sae``) and its optimisation; ``tokens`` is the number of training tokens (epochs over
    the cache as needed). :func:`neutral` fields leave the trained weights unchanged: a checkpoint
    written under other values of them still resumes."""

    crosscoder: CrossCoderSettings = field(default_factory=CrossCoderSettings)  # dict_size, k, λ, AuxK, init
    tokens: int = 600_000  # training tokens
    batch_size: int = 1024  # tokens per step
    lr: float = 5e-4  # peak Adam learning rate
    warmup_frac: float = 0.05  # linear LR warm-up
    decay_frac: float = 0.2  # linear LR decay to 0 over the last fraction of steps
    l1_warmup_frac: float = 0.05  # λ grows linearly from 0 (L1 only)
    grad_clip: float = 1.0  # global gradient-norm clip (0: none)
    # a latent unfired this long is dead and AuxK takes it up (capped at half the training tokens): sooner than the
    # paper's 10M, which a CPU budget of ~1M tokens never reaches
    dead_tokens: int = 50_000
    val_tokens: int = 8192  # held out from the end of the cache (at most 10% of it)
    seed: int = 0  # init and data order
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (autocast; weights stay float32)
    val_every: int = neutral(100)  # steps between validations; 0 = only at the end
    checkpoint_every: int = neutral(100)  # steps between checkpoints; 0 = only at the end
    device: str = neutral("cpu")  # torch device
    progress: bool = neutral(True)  # progress bar
    keep_freed_memory: bool = neutral(True)  # CPU: reuse the step's freed [batch, F] pages (crossdiff_core.allocator)
    fused_adam: bool = neutral(True)  # Adam as torch's fused kernel (one pass over the parameters, CPU and CUDA): the same update to float round-off
    products: str = neutral("auto")  # the step's products: dense, sparse, or auto by code density (crossdiff_core.sparse_step)
    kinds: tuple[str, ...] = neutral(DEFAULT_KINDS)  # the pipeline trains one crosscoder of each kind (dvc.yaml's vars)
    nproc: int = neutral(1)  # > 1: data-parallel over this many processes with torchrun (crossdiff_core.distributed)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        negative = {f"--{k.replace('_', '-')}": getattr(self, k) for k in ("val_tokens", "val_every", "checkpoint_every")
                    if getattr(self, k) < 0}
        if negative or self.dead_tokens < 1:
            raise ConfigError(f"{negative or {'--dead-tokens': self.dead_tokens}}: --val-tokens, --val-every and "
                              "--checkpoint-every must be >= 0 (0: none / only at the end), --dead-tokens >= 1")
        fracs = {k: getattr(self, k) for k in ("warmup_frac", "decay_frac", "l1_warmup_frac")}
        if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in fracs.values()):
            raise ConfigError(f"train fractions must be in [0, 1], got {fracs}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError(f"grad_clip must be a finite number >= 0 (0: no clipping), got {self.grad_clip}")
        if self.tokens < self.batch_size:
            raise ConfigError(f"--tokens ({self.tokens}) is less than one batch ({self.batch_size}); raise --tokens")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        self.kinds = tuple(self.kinds)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"train.kinds must be a non-empty subset of {KINDS}, got {list(self.kinds)}")
        if self.nproc < 1:
            raise ConfigError(f"train.nproc must be >= 1, got {self.nproc}")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @classmethod
    def from_dict(cls, d: dict, *, section: str = "train") -> "TrainConfig":
        """From params.yaml's ``train`` section (or a saved ``asdict``); unknown keys are an error."""
        return from_dict(cls, d, section=section)

    @classmethod
    def for_kind(cls, d: dict, kind: str) -> "TrainConfig":
        """From params.yaml's ``train`` section, for a ``kind`` crosscoder: the other kinds' knobs cleared
        (:meth:`CrossCoderSettings.for_kind`: they are no setting of this run)."""
        tc = cls.from_dict(d)
        return replace(tc, crosscoder=tc.crosscoder.for_kind(kind))


def adam(params, lr: float, *, fused: bool = True) -> torch.optim.Adam:
    """The trainer's Adam (β = 0.9, 0.999). ``fused``: torch's fused kernel where every parameter is a floating
    CPU or CUDA tensor (the per-parameter loop makes several passes over weights, gradients and both moments;
    at the paper's shape that loop was a third of the step: BENCHMARKS.md)."""
    params = list(params)
    ok = fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True if ok else None)


def lr_factor(step: int, steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warm-up over the first ``warmup_frac`` of steps, linear decay to 0 over the last ``decay_frac``."""
    warm = max(1, int(warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    decay_start = int((1.0 - decay_frac) * steps)
    if decay_frac > 0 and step >= decay_start:
        return max(0.0, (steps - step) / max(1, steps - decay_start))
    return 1.0


def l1_factor(step: int, steps: int, warmup_frac: float) -> float:
    """λ warm-up: linear from 0 over the first ``warmup_frac`` of steps."""
    warm = int(warmup_frac * steps)
    return 1.0 if warm == 0 else min(1.0, step / warm)


def threshold_decay(steps: int, decay: float | None = None) -> float:
    """EMA decay of BatchTopK's inference threshold: ``decay`` when set, else ``1 − 1/w`` with a window ``w`` of a
    tenth of the run (10 to 1000 steps; 0.999 from 10k steps on, as the paper's). A fixed 0.999 over a 1k-step
    run still weighs its first steps' scores, which shrink as training goes: measured on planted data, θ came
    out too high (L0 6.0 at k = 8) and 57% of the latents never passed it."""
    if decay is not None:
        return decay
    return 1.0 - 1.0 / min(1000.0, max(10.0, steps / 10))


def split_rows(n_tokens: int, val_tokens: int) -> tuple[int, int]:
    """(train_stop, val_start): the last ``val_tokens`` rows (at most 10% of the cache) are held out."""
    n_val = min(val_tokens, n_tokens // 10)
    return n_tokens - n_val, n_tokens - n_val


class Trainer:
    """Trains ``model`` on ``cache`` (an :class:`~crossdiff_core.cache.ActivationCache`), writing to ``out_dir``.

    Data-parallel training (:class:`crossdiff_core.distributed.DistributedTrainer`) overrides the hooks
    ``_batches``, ``_optimise``, ``_note_fired`` and ``save_checkpoint``.
    """

    is_main = True  # the process that writes files and reports metrics

    def __init__(self, model: CrossCoder, cache, cfg: TrainConfig, out_dir: str | os.PathLike,
                 on_metrics: Callable[[int, dict], None] | None = None):
        if cache.d_model != model.cfg.d_model:
            raise ConfigError(
                f"the cache has d_model={cache.d_model} but the crosscoder expects {model.cfg.d_model}: "
                "train a crosscoder with --d-model matching the cache (crossdiff train reads it from the manifest)"
            )
        self.model, self.cache, self.cfg = model, cache, cfg
        self.out = Path(out_dir)
        self.on_metrics = on_metrics
        self.device = torch.device(cfg.device)
        self.compute_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
        if self.compute_dtype is not None and not native_bf16(self.device):
            log.warning("train dtype bfloat16 on %s, which has no native bfloat16 (no AVX512-BF16 or AMX): torch "
                        "emulates it, ~20x slower than float32 here (BENCHMARKS.md); set train.dtype: float32",
                        self.device)
        self.train_stop, self.val_start = split_rows(cache.n_tokens, cfg.val_tokens)
        self.batches_per_epoch = cache.batches_per_epoch(cfg.batch_size, start=0, stop=self.train_stop)
        if self.batches_per_epoch == 0:
            raise CacheError(
                f"the cache holds {cache.n_tokens} tokens, fewer than one training batch of {cfg.batch_size}: "
                "cache more tokens or lower --batch-size"
            )
        self.dead_after = max(1, min(cfg.dead_tokens, cfg.tokens // 2))
        self.opt = adam(model.parameters(), cfg.lr, fused=cfg.fused_adam)
        self.step = 0
        self.since_fired = torch.zeros(model.cfg.dict_size, dtype=torch.int64, device=self.device)
        self.history: list[dict] = []

    # ---- state ---------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "since_fired": self.since_fired,
            "history": self.history,
            "train_config": asdict(self.cfg),
            "model_config": asdict(self.model.cfg),
        }

    def save_checkpoint(self) -> None:
        write_checkpoint(self.out, self._state())

    def try_resume(self) -> bool:
        """Continue from the checkpoint in ``out_dir`` (:mod:`crossdiff_core.checkpoint`) if the same
        configuration wrote it; refuse one written by other settings, naming each that differs."""
        if self.is_main:
            remove_partial(self.out)  # what a killed checkpoint write left behind
        st = read_checkpoint(self.out)
        if st is None:
            return False
        path = self.out / CHECKPOINT
        same = result_settings(TrainConfig, self.cfg)
        diff = (settings_differences(result_settings(TrainConfig, st["train_config"]), same)
                + settings_differences(st["model_config"], asdict(self.model.cfg), prefix="model."))
        if diff:
            raise ConfigError(
                f"{path} was written by other settings ({'; '.join(diff)}): re-run with the old settings to "
                f"resume, use another --out, or delete {path} and {self.out}/checkpoint-*.safetensors to start over"
            )
        try:
            self.model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["opt"])
            self.step = int(st["step"])
            if st["since_fired"].shape != self.since_fired.shape or st["since_fired"].dtype != torch.int64:
                raise ValueError(f"since_fired is {st['since_fired'].dtype} {list(st['since_fired'].shape)}")
            self.since_fired = st["since_fired"].to(self.device)
            self.history = st["history"]
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path} does not fit this crosscoder ({type(err).__name__}: {err}); delete {path} "
                                  f"and {self.out}/checkpoint-*.safetensors to start over") from None
        return True

    # ---- data ----------------------------------------------------------------------------------
    def _batches(self) -> Iterator[torch.Tensor]:
        epoch, skip = divmod(self.step, self.batches_per_epoch)
        while True:
            yield from self.cache.shuffled_batches(
                self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch, skip_batches=skip,
                start=0, stop=self.train_stop, dtype=torch.float32, device=self.device)
            epoch, skip = epoch + 1, 0

    def _val_batches(self) -> Iterator[torch.Tensor]:
        start = self.val_start if self.val_start < self.cache.n_tokens else 0
        for _, x in self.cache.iter_sequential(self.cfg.batch_size, start=start, dtype=torch.float32,
                                               device=self.device):
            yield x

    def validate(self) -> dict:
        self.model.eval()
        has_thr = bool(torch.isfinite(self.model.threshold))
        use_batch = self.model.cfg.sparsity == "batchtopk" and not has_thr
        m = evaluate(self.model, self._val_batches(), batch_topk=use_batch, autocast_dtype=self.compute_dtype)
        self.model.train()
        m["step"] = self.step
        m["tokens_seen"] = self.step * self.cfg.batch_size
        m["dead_train_fraction"] = float((self.since_fired >= self.dead_after).float().mean())
        return m

    # ---- loop ----------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, model = self.cfg, self.model
        steps = cfg.steps
        warm_steps = max(1, int(cfg.warmup_frac * steps))
        decay = threshold_decay(steps, model.cfg.threshold_decay)
        if cfg.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        model.train()
        batches = self._batches()
        bar = tqdm(total=steps, initial=self.step, disable=not cfg.progress, unit="step",
                   desc=f"train {model.cfg.kind}", dynamic_ncols=True)
        t0, tokens0 = time.perf_counter(), self.step * cfg.batch_size
        last = {}
        while self.step < steps:
            x = next(batches)
            lrf = lr_factor(self.step, steps, cfg.warmup_frac, cfg.decay_frac)
            for g in self.opt.param_groups:
                g["lr"] = cfg.lr * lrf
            dead = self.since_fired >= self.dead_after if model.cfg.sparsity == "batchtopk" else None
            l1 = model.cfg.l1_coeff * l1_factor(self.step, steps, cfg.l1_warmup_frac)
            out = self._optimise(x, l1_coeff=l1, dead=dead)
            loss = out.loss
            with torch.no_grad():
                self._note_fired(out.fired, x.shape[0])
                if model.cfg.sparsity == "batchtopk" and self.step >= warm_steps:
                    model.update_threshold(out.min_kept_score, decay)
            self.step += 1
            last = {"loss": loss.item(), "l0": float(out.l0)}
            if model.cfg.sparsity == "batchtopk" and dead is not None:
                last["dead"] = float(dead.float().mean())
            if (cfg.val_every and self.step % cfg.val_every == 0) or self.step == steps:
                m = self.validate()
                m.update(loss=last["loss"], lr=cfg.lr * lrf, train_l0=last["l0"])
                self.history.append(m)
                if self.on_metrics:
                    self.on_metrics(self.step, m)
                last.update(fve_b=m["fve_base"], fve_c=m["fve_chat"])
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == steps:
                self.save_checkpoint()
            rate = (self.step * cfg.batch_size - tokens0) / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix({k: f"{v:.3g}" for k, v in last.items()} | {"tok/s": f"{rate:,.0f}"}, refresh=False)
            bar.update(1)
        bar.close()
        elapsed = time.perf_counter() - t0
        final = self.history[-1] if self.history else self.validate()
        return {"final": final, "history": self.history, "steps": steps,
                "tokens_per_second": (steps * cfg.batch_size - tokens0) / max(elapsed, 1e-9)}

    def _optimise(self, x: torch.Tensor, *, l1_coeff: float, dead: torch.Tensor | None):
        return optimisation_step(self.model, self.opt, x, l1_coeff=l1_coeff, dead=dead, grad_clip=self.cfg.grad_clip,
                                 compute_dtype=self.compute_dtype, step=self.step, out_path=self.out / CHECKPOINT,
                                 products=self.cfg.products)

    def _note_fired(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Dead-latent counters: ``n_tokens`` more tokens seen, reset for the ``fired [F]`` latents."""
        self.since_fired += n_tokens
        self.since_fired[fired] = 0


def optimisation_step(model: CrossCoder, opt: torch.optim.Optimizer, x: torch.Tensor, *, l1_coeff: float,
                      dead: torch.Tensor | None, grad_clip: float, compute_dtype: torch.dtype | None,
                      step: int = 0, out_path: Path | None = None, loss_fn: Callable | None = None,
                      products: str | None = None):
    """One Adam step on ``x [batch, 2, d]``: loss (autocast to ``compute_dtype``), NaN guard, backward,
    clipping, and the partitioned kinds' constraints re-asserted after the step
    (:meth:`~crossdiff_core.crosscoder.CrossCoder.enforce_constraints`). Returns the :class:`~crossdiff_core.crosscoder.LossOutput` (loss as float32).
    ``loss_fn`` (default ``model.loss``) lets a DistributedDataParallel wrapper compute the loss; ``products``
    (dense, sparse, None/auto) is passed to it (:meth:`~crossdiff_core.crosscoder.CrossCoder.loss`)."""
    with _autocast(x.device, compute_dtype):
        out = (loss_fn or model.loss)(x, l1_coeff=l1_coeff, dead=dead, products=products)
    loss = out.loss.float()
    if not torch.isfinite(loss):
        bad_input = not bool(torch.isfinite(x).all())
        where = ("the input batch contains NaN/inf activations: check the cache (crossdiff cache-info "
                 "--cache DIR) and rebuild the bad shards" if bad_input else
                 "lower --lr, or train in float32 if you used bfloat16")
        raise TrainingDivergedError(
            f"loss became {loss.item()} at step {step}; {where}. The last good checkpoint "
            f"({out_path or CHECKPOINT}, if any) was kept; re-running resumes from it."
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    opt.step()
    model.enforce_constraints()
    return out._replace(loss=loss)


def cache_mean(cache) -> torch.Tensor:
    """``[2, d]`` float64 mean activation of each model over the cache (model units), from its manifest: every
    rank of a data-parallel run and every resume sees the same one."""
    from .cache import MODELS

    return torch.tensor([cache.manifest["stats"][m]["mean"] for m in MODELS], dtype=torch.float64)


def train_crosscoder(cache_dir: str | os.PathLike, out_dir: str | os.PathLike, *, kind: str, train: TrainConfig,
                     on_metrics=None, trainer_cls=Trainer) -> dict:
    """Train a ``kind`` crosscoder (``train.crosscoder``) on the cache at ``cache_dir``; writes the
    crosscoder directory (DESIGN §2), ``metrics.json`` and the checkpoint (:data:`CHECKPOINT`) into
    ``out_dir``. Resumes from the checkpoint if present.
    ``trainer_cls``: a :class:`Trainer` factory (data-parallel training passes its own)."""
    from .cache import ActivationCache

    cache = ActivationCache(cache_dir)
    train = replace(train, crosscoder=train.crosscoder.for_kind(kind))  # the other kind's knob is no setting of this run
    cfg = train.crosscoder.config(kind, cache.d_model, training_tokens=train.tokens,
                                  cache=str(Path(cache_dir).resolve()), cache_manifest_hash=cache.manifest_hash)
    torch.manual_seed(train.seed)
    scales = cache_scales(cache, cfg.normalisation)
    model = CrossCoder(cfg, scales=scales, mean=cache_mean(cache), device=train.device, seed=train.seed)
    trainer = trainer_cls(model, cache, train, out_dir, on_metrics=on_metrics)
    trainer.try_resume()
    result = trainer.train()
    metrics = {"kind": kind, "dict_size": cfg.dict_size, "k": cfg.k, "l1_coeff": cfg.l1_coeff, **result["final"],
               "tokens_per_second": result["tokens_per_second"]}
    if not trainer.is_main:
        return metrics
    model.save(out_dir)
    atomic_write(Path(out_dir) / "metrics.json", lambda p: Path(p).write_text(json.dumps(metrics, indent=2) + "\n"))
    atomic_write(Path(out_dir) / "history.json",
            lambda p: Path(p).write_text(json.dumps(result["history"], indent=2) + "\n"))
    return metrics
