"""The training loader of a run and the process's seeds, shared by both commands.

`train_loader` gives each process its shard of the training set in an order
that resumes mid-epoch (ResumableDistributedSampler; a stream of WebDataset
shards splits itself, fcmae.data.shard_stream), with loader
workers that ignore stop signals (only the main process decides when a run
stops: fcmae.runtime.signals) and end with it (fcmae.runtime.lifeline).
`usable_workers` caps every loader's workers (the evaluation loaders' too)
at the CPUs the process may run on.
"""

from __future__ import annotations

import os
import random
from typing import Optional, Set, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from fcmae.runtime import distributed
from fcmae.runtime.lifeline import end_loader_workers_at_exit, loader_worker_init
from fcmae.runtime.logs import log
from fcmae.runtime.plan import Plan


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after `start_batch` batches of `batch_size`.

    By default each process's share ends with whole batches (the rest of the shuffled order is left out).
    With `keep_last` the last, partial batch is kept too: the shares are made equal as torch's sampler makes
    them (a few images repeated), so every process runs the same number of batches. `max_samples` caps each
    epoch's share (the plan's: whole optimizer steps, or an even last batch for Mixup/CutMix).
    """

    def __init__(self, dataset, batch_size: int, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, keep_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=not keep_last)
        self.batch_size, self.keep_last = batch_size, keep_last
        self.start_batch = 0
        self.max_samples: Optional[int] = None  # cap on this process's samples per epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def samples_per_epoch(self) -> int:
        """This process's samples in one epoch (with `keep_last`, the last partial batch's included)."""
        count = self.num_samples if self.keep_last else self.num_samples // self.batch_size * self.batch_size
        return count if self.max_samples is None else min(count, self.max_samples)

    def batches_per_epoch(self) -> int:
        return -(-self.samples_per_epoch() // self.batch_size)

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start_batch * self.batch_size:self.samples_per_epoch()])

    def __len__(self) -> int:
        return max(self.samples_per_epoch() - self.start_batch * self.batch_size, 0)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, as torch's DataLoader counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


_CAPS_NOTED: Set[Tuple[int, int]] = set()  # (asked, used): each cap is noted once per process


def usable_workers(requested: int) -> int:
    """`requested` loader workers, at most `available_cpus()` (torch warns about more in every run), with a
    one-line note the first time a request is capped. Every loader asks here, so this also makes sure workers
    left running end with the process (fcmae.runtime.lifeline.end_loader_workers_at_exit)."""
    if requested > 0:
        end_loader_workers_at_exit()
    cpus = available_cpus()
    if requested <= cpus:
        return requested
    if (requested, cpus) not in _CAPS_NOTED:
        _CAPS_NOTED.add((requested, cpus))
        log(f"note: num_workers {requested} is more than the {cpus} CPU(s) this process may use; "
            f"using {cpus} loader worker(s)")
    return cpus


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (callers add the rank so processes differ)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def train_loader(dataset, plan: Plan, num_workers: int, seed: int, info: distributed.DistInfo,
                 collate_fn=None) -> DataLoader:
    """This process's shard of the training set, in an order that resumes mid-epoch.

    Each epoch is the plan's: whole batches, or with `plan.keep_last` the last, partial batch too.
    """
    workers = usable_workers(num_workers)
    generator = torch.Generator().manual_seed(seed + info.rank)
    pin = info.device.type == "cuda"
    if isinstance(dataset, IterableDataset):  # shards: the stream splits itself (fcmae.data.shard_stream)
        workers = dataset.split_epochs(plan.batch_size, plan.images_per_epoch // info.world_size, info.rank,
                                       info.world_size, workers, logger=log)
        return DataLoader(dataset, batch_size=plan.batch_size, num_workers=workers, pin_memory=pin, drop_last=False,
                          collate_fn=collate_fn, generator=generator, worker_init_fn=loader_worker_init)
    sampler = ResumableDistributedSampler(dataset, plan.batch_size, num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=seed, keep_last=plan.keep_last)
    sampler.max_samples = plan.images_per_epoch // info.world_size
    # Its own generator keeps the global RNG untouched by the loader; seeded per rank, so that the
    # workers' RNGs differ between ranks and restarts do not depend on torch's default seed.
    return DataLoader(dataset, batch_size=plan.batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                      drop_last=not plan.keep_last, collate_fn=collate_fn, generator=generator,
                      worker_init_fn=loader_worker_init)  # the main process alone decides when to stop


def start_epoch(loader: DataLoader, epoch: int, start_batch: int) -> None:
    """Point a `train_loader` at `epoch`, from batch `start_batch` (after a mid-epoch resume); set before the
    epoch's iterator starts."""
    if isinstance(loader.dataset, IterableDataset):
        loader.dataset.set_epoch(epoch, start_batch)
    else:
        loader.sampler.set_epoch(epoch, start_batch=start_batch)
        loader.dataset.set_epoch(epoch)
