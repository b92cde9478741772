"""Crosscoder training over an activation cache: Adam, LR warm-up/decay, λ warm-up, clipping,
checkpoints with resume, validation, NaN guard, progress bar.

Resume is exact: the data order is a pure function of ``(seed, epoch)`` and the step, and the
checkpoint holds the weights, Adam's state, the EMA threshold and the dead-latent counters, so an
interrupted run continued from its checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .allocator import keep_freed_memory
from .crosscoder import CrossCoder, CrossCoderConfig
from .fileio import atomic_write
from .errors import CacheError, ConfigError, TrainingDivergedError
from .metrics import _autocast, evaluate

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Optimisation settings; ``tokens`` is the number of training tokens (epochs over the cache as needed)."""

    tokens: int
    batch_size: int = 2048
    lr: float = 1e-4
    warmup_frac: float = 0.05  # linear LR warm-up
    decay_frac: float = 0.2  # linear LR decay to 0 over the last fraction of steps
    l1_warmup_frac: float = 0.05  # λ grows linearly from 0 (L1 only)
    grad_clip: float = 1.0
    checkpoint_every: int = 500  # steps; 0 = only at the end
    val_every: int = 250  # steps; 0 = only at the end
    val_tokens: int = 8192  # held out from the end of the cache (at most 10% of it)
    dead_tokens: int = 10_000_000  # a latent unfired this long is dead (capped at half the training tokens)
    seed: int = 0
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (autocast; weights stay float32)
    device: str = "cpu"
    progress: bool = True
    keep_freed_memory: bool = True  # CPU: reuse the step's freed [batch, F] pages (see crossdiff_core.allocator)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.tokens < self.batch_size:
            raise ConfigError(f"--tokens ({self.tokens}) is less than one batch ({self.batch_size}); raise --tokens")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# settings that do not change the trained weights: a checkpoint written under other values still resumes
RESULT_NEUTRAL = ("progress", "device", "checkpoint_every", "val_every", "keep_freed_memory")


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
        self.train_stop, self.val_start = split_rows(cache.n_tokens, cfg.val_tokens)
        self.bpe = cache.batches_per_epoch(cfg.batch_size, start=0, stop=self.train_stop)
        if self.bpe == 0:
            raise CacheError(
                f"the cache holds {cache.n_tokens} tokens, fewer than one training batch of {cfg.batch_size}: "
                "cache more tokens or lower --batch-size"
            )
        self.dead_after = max(1, min(cfg.dead_tokens, cfg.tokens // 2))
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
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
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / CHECKPOINT, lambda p: torch.save(self._state(), p))

    def try_resume(self) -> bool:
        """Continue from ``out_dir/checkpoint.pt`` if it was written by the same configuration."""
        path = self.out / CHECKPOINT
        if not path.exists():
            return False
        st = torch.load(path, map_location=self.device, weights_only=False)
        same = {k: v for k, v in asdict(self.cfg).items() if k not in RESULT_NEUTRAL}
        old = {k: v for k, v in st["train_config"].items() if k in same}
        if old != same or st["model_config"] != asdict(self.model.cfg):
            raise ConfigError(
                f"{path} was written by a different training configuration; use another --out, "
                "or delete the checkpoint to start over"
            )
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.step = st["step"]
        self.since_fired = st["since_fired"].to(self.device)
        self.history = st["history"]
        return True

    # ---- data ----------------------------------------------------------------------------------
    def _batches(self) -> Iterator[torch.Tensor]:
        epoch, skip = divmod(self.step, self.bpe)
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
        use_batch = self.model.cfg.kind == "batchtopk" and not has_thr
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
        decay = model.cfg.threshold_decay
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
            dead = self.since_fired >= self.dead_after if model.cfg.kind == "batchtopk" else None
            l1 = model.cfg.l1_coeff * l1_factor(self.step, steps, cfg.l1_warmup_frac)
            out = self._optimise(x, l1_coeff=l1, dead=dead)
            loss = out.loss
            with torch.no_grad():
                self._note_fired(out.fired, x.shape[0])
                if model.cfg.kind == "batchtopk" and self.step >= warm_steps:
                    v = out.min_kept_score.float()
                    thr = model.threshold
                    thr.copy_(v if not torch.isfinite(thr) else decay * thr + (1 - decay) * v)
            self.step += 1
            last = {"loss": loss.item(), "l0": float(out.l0)}
            if model.cfg.kind == "batchtopk" and dead is not None:
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
                                 compute_dtype=self.compute_dtype, step=self.step, out_path=self.out / CHECKPOINT)

    def _note_fired(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Dead-latent counters: ``n_tokens`` more tokens seen, reset for the ``fired [F]`` latents."""
        self.since_fired += n_tokens
        self.since_fired[fired] = 0


def optimisation_step(model: CrossCoder, opt: torch.optim.Optimizer, x: torch.Tensor, *, l1_coeff: float,
                      dead: torch.Tensor | None, grad_clip: float, compute_dtype: torch.dtype | None,
                      step: int = 0, out_path: Path | None = None, loss_fn: Callable | None = None):
    """One Adam step on ``x [batch, 2, d]``: loss (autocast to ``compute_dtype``), NaN guard, backward,
    clipping. Returns the :class:`~crossdiff_core.crosscoder.LossOutput` (loss as float32).
    ``loss_fn`` (default ``model.loss``) lets a DistributedDataParallel wrapper compute the loss."""
    with _autocast(x.device, compute_dtype):
        out = (loss_fn or model.loss)(x, l1_coeff=l1_coeff, dead=dead)
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
    return out._replace(loss=loss)


def train_crosscoder(cache_dir: str | os.PathLike, out_dir: str | os.PathLike, *, kind: str, dict_size: int,
                     k: int | None = None, l1_coeff: float = 0.0, train: TrainConfig,
                     model_overrides: dict | None = None, on_metrics=None, trainer_cls=Trainer) -> dict:
    """Train a crosscoder on the cache at ``cache_dir``; writes the crosscoder directory (DESIGN §2),
    ``metrics.json`` and ``checkpoint.pt`` into ``out_dir``. Resumes from the checkpoint if present.
    ``trainer_cls``: a :class:`Trainer` factory (data-parallel training passes its own)."""
    from .cache import ActivationCache

    cache = ActivationCache(cache_dir)
    cfg = CrossCoderConfig(kind=kind, d_model=cache.d_model, dict_size=dict_size, k=k, l1_coeff=l1_coeff,
                           training_tokens=train.tokens, cache=str(Path(cache_dir).resolve()),
                           cache_manifest_hash=cache.manifest_hash, **(model_overrides or {}))
    torch.manual_seed(train.seed)
    model = CrossCoder(cfg, scales=cache.scales(), device=train.device, seed=train.seed)
    trainer = trainer_cls(model, cache, train, out_dir, on_metrics=on_metrics)
    trainer.try_resume()
    result = trainer.train()
    metrics = {"kind": kind, "dict_size": dict_size, "k": k, "l1_coeff": l1_coeff, **result["final"],
               "tokens_per_second": result["tokens_per_second"]}
    if not trainer.is_main:
        return metrics
    model.save(out_dir)
    atomic_write(Path(out_dir) / "metrics.json", lambda p: Path(p).write_text(json.dumps(metrics, indent=2) + "\n"))
    atomic_write(Path(out_dir) / "history.json",
            lambda p: Path(p).write_text(json.dumps(result["history"], indent=2) + "\n"))
    return metrics
