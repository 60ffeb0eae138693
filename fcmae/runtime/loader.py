"""The training loader of a run and the process's seeds, shared by both commands.

`train_loader` gives each process its shard of the training set in an order
that resumes mid-epoch (ResumableDistributedSampler), with loader
workers that ignore stop signals (only the main process decides when a run
stops: fcmae.runtime.signals).
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from fcmae.runtime import distributed
from fcmae.runtime.plan import Plan
from fcmae.runtime.signals import ignore_stop_signals


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after `start_batch` batches of `batch_size`."""

    def __init__(self, dataset, batch_size: int, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.start_batch = 0
        self.max_batches: Optional[int] = None  # cap on batches per epoch (e.g. a multiple of update_freq)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def batches_per_epoch(self) -> int:
        full = self.num_samples // self.batch_size
        return full if self.max_batches is None else min(full, self.max_batches)

    def __iter__(self):
        indices = list(super().__iter__())
        usable = self.batches_per_epoch() * self.batch_size
        return iter(indices[self.start_batch * self.batch_size:usable])

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_batch, 0) * self.batch_size



def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (callers add the rank so processes differ)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def train_loader(dataset, plan: Plan, num_workers: int, seed: int, info: distributed.DistInfo,
                 collate_fn=None) -> DataLoader:
    """This process's shard of the training set, in an order that resumes mid-epoch."""
    sampler = ResumableDistributedSampler(dataset, plan.batch_size, num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=seed)
    sampler.max_batches = plan.iters_per_epoch
    # Its own generator keeps the global RNG untouched by the loader; seeded per rank, so that the
    # workers' RNGs differ between ranks and restarts do not depend on torch's default seed.
    return DataLoader(dataset, batch_size=plan.batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=info.device.type == "cuda", drop_last=True, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed + info.rank),
                      worker_init_fn=ignore_stop_signals)  # the main process alone decides when to stop
