"""The training loader of a run and the process's seeds, shared by both commands.

`train_loader` gives each process its shard of the training set in an order
that resumes mid-epoch (fcmae.data.ResumableDistributedSampler), with loader
workers that ignore stop signals (only the main process decides when a run
stops: fcmae.runtime.signals).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from fcmae.runtime import distributed
from fcmae.runtime.plan import Plan
from fcmae.runtime.signals import ignore_stop_signals


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (callers add the rank so processes differ)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def train_loader(dataset, plan: Plan, num_workers: int, seed: int, info: distributed.DistInfo,
                 collate_fn=None) -> DataLoader:
    """This process's shard of the training set, in an order that resumes mid-epoch."""
    from fcmae.data import ResumableDistributedSampler

    sampler = ResumableDistributedSampler(dataset, plan.batch_size, num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=seed)
    sampler.max_batches = plan.iters_per_epoch
    # Its own generator keeps the global RNG untouched by the loader; seeded per rank, so that the
    # workers' RNGs differ between ranks and restarts do not depend on torch's default seed.
    return DataLoader(dataset, batch_size=plan.batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=info.device.type == "cuda", drop_last=True, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed + info.rank),
                      worker_init_fn=ignore_stop_signals)  # the main process alone decides when to stop
