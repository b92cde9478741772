"""Data-parallel crosscoder training (torch DDP): ``torchrun --nproc-per-node N -m crossdiff_core.distributed``.

Every rank reads the same global batch of ``batch_size`` tokens (the single-process data order) and
trains on its own contiguous ``batch_size / world`` rows. What must span the global batch does:

- BatchTopK selection: the ``k · batch_size``-th largest score over the global batch is found exactly
  by gathering each rank's top ``k · batch_size`` local scores (the global top set is a subset of their
  union) and taking the k-th largest of that; each rank then keeps its own scores above it. The
  threshold is the same on every rank, so the EMA inference threshold stays in sync too.
- AuxK's denominator ``Σ ||e − mean(e)||²`` comes from all-reduced sums of ``e`` and ``||e||²``.
- Gradients are averaged by DistributedDataParallel; the per-rank losses are batch means over equal
  shares, so their average is the global batch's loss.
- Dead-latent counters count the global batch and reset for latents fired on any rank.

So N processes train the same crosscoder as one process with the same global batch, up to float
rounding. Backends: ``gloo`` on CPU, ``nccl`` on GPUs (chosen from the device unless given).
Rank 0 alone writes checkpoints, the crosscoder directory and the metrics; every rank resumes from
the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .crosscoder import CrossCoder, batch_kth_largest
from .errors import ConfigError
from .trainer import CHECKPOINT, TrainConfig, Trainer, optimisation_step, train_crosscoder


class GlobalBatch:
    """BatchTopK reductions over the global batch of a process group (see the module docstring)."""

    def __init__(self, group=None):
        self.group = group
        self.world = dist.get_world_size(group)

    def kth_largest(self, v: torch.Tensor, k_per_token: int) -> torch.Tensor:
        """The ``(k_per_token · global batch)``-th largest of the scores, ``v [local batch, F]`` on each rank."""
        flat = v.reshape(-1)
        kb = min(k_per_token * v.shape[0] * self.world, flat.numel() * self.world)  # every rank has as many
        # the global top kb lies within the union of the ranks' local top kb
        c = min(kb, flat.numel())
        cand = flat
        if c < flat.numel():
            cand = flat[flat >= batch_kth_largest(flat, c)]
            if cand.numel() > c:  # ties at the local threshold: any c of them will do
                cand = cand.topk(c, sorted=False).values
        parts = [torch.empty_like(cand) for _ in range(self.world)]
        dist.all_gather(parts, cand.contiguous(), group=self.group)
        return batch_kth_largest(torch.cat(parts), kb)

    def top_entries(self, v: torch.Tensor, k_per_token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx, t)``: :meth:`kth_largest`'s global ``t`` and the flat indices (sorted) of this rank's scores ``>= t``."""
        t = self.kth_largest(v, k_per_token)
        return (v.reshape(-1) >= t).nonzero().squeeze(1), t

    def aux_denominator(self, e: torch.Tensor) -> torch.Tensor:
        """``Σ ||e − mean(e)||²`` over the global batch divided by the world size: DDP averages the
        per-rank losses, so each rank's share of ``L_aux`` is scaled to make the average exact."""
        e64 = e.detach().double()
        sums = torch.cat([e64.sum(0).reshape(-1), e64.pow(2).sum().reshape(1),
                          torch.tensor([e.shape[0]], dtype=torch.float64, device=e.device)])
        dist.all_reduce(sums, group=self.group)
        s, sq, n = sums[:-2].view_as(e[0]), sums[-2], sums[-1]
        total = sq - s.pow(2).sum() / n
        return (total / self.world).to(e.dtype)


class _Objective(torch.nn.Module):
    """The crosscoder's training loss as ``forward``, so DistributedDataParallel can wrap it."""

    def __init__(self, model: CrossCoder):
        super().__init__()
        self.model = model

    def forward(self, x, *, l1_coeff, dead, products=None):
        return self.model.loss(x, l1_coeff=l1_coeff, dead=dead, products=products)


class DistributedTrainer(Trainer):
    """A :class:`~crossdiff_core.trainer.Trainer` for one rank of an initialised process group."""

    def __init__(self, model: CrossCoder, cache, cfg: TrainConfig, out_dir, on_metrics=None, group=None):
        if not dist.is_initialized():
            raise ConfigError("torch.distributed is not initialised: launch with torchrun, or use crossdiff train")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch_size={cfg.batch_size} does not split evenly over {self.world} processes: "
                              f"use a multiple of {self.world}")
        self.is_main = self.rank == 0
        super().__init__(model, cache, cfg, out_dir, on_metrics=on_metrics if self.is_main else None)
        model.batch_reduce = GlobalBatch(group)
        ids = [self.device.index or 0] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(_Objective(model), device_ids=ids, process_group=group,
                                           broadcast_buffers=False)

    def _batches(self) -> Iterator[torch.Tensor]:
        share = self.cfg.batch_size // self.world
        for x in super()._batches():
            yield x[self.rank * share:(self.rank + 1) * share]

    def _optimise(self, x, *, l1_coeff, dead):
        return optimisation_step(self.model, self.opt, x, l1_coeff=l1_coeff, dead=dead, grad_clip=self.cfg.grad_clip,
                                 compute_dtype=self.compute_dtype, step=self.step, out_path=self.out / CHECKPOINT,
                                 loss_fn=self.ddp, products=self.cfg.products)

    def _note_fired(self, fired: torch.Tensor, n_tokens: int) -> None:
        anywhere = fired.to(torch.uint8)
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX, group=self.group)
        super()._note_fired(anywhere.bool(), n_tokens * self.world)

    def save_checkpoint(self) -> None:
        if self.is_main:
            super().save_checkpoint()
        dist.barrier(group=self.group)


def default_backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def train_distributed(cache_dir, out_dir, *, kind: str, train: TrainConfig, on_metrics=None,
                      backend: str | None = None) -> dict:
    """:func:`~crossdiff_core.trainer.train_crosscoder` on every rank of a torchrun launch (reads
    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment). On GPUs each rank takes
    ``cuda:LOCAL_RANK``. Returns the metrics (rank 0 writes the files)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError("RANK/WORLD_SIZE are not set: start data-parallel training with torchrun "
                          "(torchrun --nproc-per-node N -m crossdiff_core.distributed ...)")
    if torch.device(train.device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        train.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group(backend or default_backend(train.device))
    try:
        if dist.get_rank() != 0:
            train.progress = False
        return train_crosscoder(cache_dir, out_dir, kind=kind, train=train, on_metrics=on_metrics,
                                trainer_cls=DistributedTrainer)
    finally:
        if own_group:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """``torchrun ... -m crossdiff_core.distributed --cache C --out O --config JSON``: ``JSON`` holds
    ``kind`` and ``train`` (TrainConfig fields, the crosscoder's in ``train.crosscoder``)."""
    p = argparse.ArgumentParser(prog="python -m crossdiff_core.distributed", description=main.__doc__)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", required=True, help="JSON object, or @file holding one")
    p.add_argument("--backend", default=None, help="gloo or nccl (default: from the device)")
    a = p.parse_args(argv)
    text = open(a.config[1:]).read() if a.config.startswith("@") else a.config
    c = json.loads(text)
    train = TrainConfig.from_dict(c["train"])
    metrics = train_distributed(a.cache, a.out, kind=c["kind"], train=train, backend=a.backend)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: metrics.get(k) for k in ("fve_base", "fve_chat", "l0", "dead_fraction")}))


if __name__ == "__main__":
    main()
