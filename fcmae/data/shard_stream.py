"""An epoch of shard samples: split over ranks and loader workers, shuffled per (seed, epoch), resumed exactly.

How an epoch is read (the rule that the docs state, docs/own-data.md):

1. The shards are put in an order drawn from (seed, epoch). With R ranks of
   W loader workers each there are R x W readers ("slots"); slot g reads
   the shards at positions g, g + R x W, g + 2 R x W, ... of that order.
2. A slot reads its shards one after the other, `buffer` samples at a time
   (fewer at the end of its shards, so a pass over them ends whole), and
   gives each buffer's samples in an order drawn from (seed, epoch, g,
   buffer position): the sample shuffle.
3. The batches of a rank are dealt to its workers in turn (batch b from
   worker b mod W, as torch's DataLoader takes them), so each slot gives a
   known number of samples per epoch. A slot whose shards hold fewer starts
   them again; one whose shards hold more leaves the rest for the epoch.
   When the shard count is divisible by R x W and the shards hold equal
   counts, no sample is read twice in an epoch and none is missed (beyond
   the remainder the plan leaves out); otherwise a note says so.
4. An unreadable sample is replaced by the next readable one of its buffer
   (and reported), as a folder replaces an unreadable file, so every slot's
   position in its stream is the count of samples it gave.

Exact resume: after B batches of an epoch, slot s has given the samples of
its batches among the first B, a number the layout alone decides. A resumed
loader starts each slot there: it skips whole shards unopened where
`_info.json` gives their counts, skips the rest of the way through the tar
stream without decoding, and re-reads only the current buffer; worker w
plays slot (w + B) mod W, so batch B + i still comes from the slot that
would have given it. The positions are saved in each checkpoint
(`positions`); a run resumed with other R or W reads the rest of the epoch
with its own layout from the same fraction of it, with a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from fcmae.data.folder import sample_seed
from fcmae.data.image_io import UNREADABLE_IMAGE_ERRORS, DataError, UnreadableImageError
from fcmae.data.shards import Entry, ShardSpec, read_shard


@dataclass(frozen=True)
class EpochLayout:
    """How one rank's epoch is cut into batches and dealt to its loader workers.

    Args:
        rank: this process's rank.
        ranks: the processes of the run.
        workers: loader workers per rank that read shards (1 when the main process reads).
        batch_size: the per-process batch.
        samples: this rank's samples per epoch (the last batch may be partial).
    """

    rank: int
    ranks: int
    workers: int
    batch_size: int
    samples: int

    @property
    def batches(self) -> int:
        return -(-self.samples // self.batch_size)

    def batch_len(self, batch: int) -> int:
        return min(self.batch_size, self.samples - batch * self.batch_size)

    def slot_samples(self, slot: int, first_batch: int, end_batch: int) -> int:
        """The samples that slot `slot` gives for batches first_batch .. end_batch - 1."""
        start = first_batch + (slot - first_batch) % self.workers
        return sum(self.batch_len(b) for b in range(start, min(end_batch, self.batches), self.workers))

    def global_slot(self, slot: int) -> int:
        return self.rank * self.workers + slot


def shard_order(count: int, seed: int, epoch: int) -> List[int]:
    """The shard order of an epoch, drawn from (seed, epoch)."""
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5AAD]).permutation(count)]


class ShardStream(IterableDataset):
    """The samples of a ShardSpec, an epoch at a time, for one rank's DataLoader (see the module docstring).

    Subclasses make the training item from an Entry (`make_item(entry, index)`, raising one of
    UNREADABLE_IMAGE_ERRORS for an unreadable sample); the stream yields (item, bad), bad being the records of
    the unreadable samples replaced for it (fcmae.data.folder.BadImageTracker).

    Args:
        spec: the shards.
        num_samples: the samples in the shards (`--train_num_samples`, or the spec's count).
        seed: the run's seed.
        buffer: the samples shuffled together (the sample buffer).
        max_retries: unreadable samples in a row before the data set counts as broken.
        label_key: the member suffix that holds the class index.
    """

    def __init__(self, spec: ShardSpec, num_samples: int, seed: int = 0, buffer: int = 1000,
                 max_retries: int = 20, label_key: str = "cls"):
        if buffer < 1:
            raise DataError(f"shuffle_buffer must be at least 1, got {buffer}")
        self.spec, self.num_samples, self.seed, self.buffer = spec, int(num_samples), seed, int(buffer)
        self.max_retries, self.label_key = max_retries, label_key
        self.epoch, self.start_batch = 0, 0
        self.epoch_layout: Optional[EpochLayout] = None

    def __len__(self) -> int:
        return self.num_samples

    # ------------------------------------------------------------ the layout
    def split_epochs(self, batch_size: int, samples_per_rank: int, rank: int, ranks: int, workers: int,
                     logger=print) -> int:
        """Fix the epoch's layout for this rank; returns the loader workers to use (at most the shards each
        rank's workers can share; 0 stays 0: the main process reads)."""
        shards = len(self.spec.urls)
        if shards < ranks:
            raise DataError(f"{shards} shard(s) for {ranks} processes: each process needs at least one shard; "
                            "make more, smaller shards (fcmae-make-shards --samples_per_shard)")
        usable = min(workers, shards // ranks)
        if usable < workers and rank == 0:
            logger(f"note: {workers} loader workers per process but {shards} shard(s) for {ranks} process(es): "
                   f"using {usable} worker(s), each reading whole shards")
        slots = max(usable, 1)
        self.epoch_layout = EpochLayout(rank, ranks, slots, batch_size, samples_per_rank)
        if shards % (ranks * slots) and rank == 0:
            logger(f"note: {shards} shards do not divide evenly over {ranks} process(es) x {slots} reader(s): "
                   "within an epoch some samples are read twice and others not at all; a shard count divisible "
                   f"by {ranks * slots} makes each epoch read every sample once")
        return usable

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Read epoch `epoch` from batch `start_batch` on (set before the epoch's DataLoader iterator starts)."""
        self.epoch, self.start_batch = epoch, start_batch

    def positions(self, epoch: int, batch: int) -> Dict[str, Any]:
        """Where each slot of each rank stands after `batch` batches of `epoch`: the checkpoint's record."""
        layout = self._layout()
        read = [[layout.slot_samples(s, 0, batch) for s in range(layout.workers)] for _ in range(layout.ranks)]
        return {"epoch": epoch, "batch": batch, "ranks": layout.ranks, "workers": layout.workers,
                "buffer": self.buffer, "shards": len(self.spec.urls), "samples_read": read}

    def resume_note(self, saved: Optional[Dict[str, Any]]) -> Optional[str]:
        """A note when a checkpoint's stream record was made with another layout (None when it matches)."""
        if not saved:
            return None
        now = self.positions(saved.get("epoch", 0), saved.get("batch", 0))
        keys = ("ranks", "workers", "buffer", "shards")
        if all(saved.get(k) == now[k] for k in keys):
            return None
        was = ", ".join(f"{k} {saved.get(k)}" for k in keys)
        new = ", ".join(f"{k} {now[k]}" for k in keys)
        return (f"note: the checkpoint read its shards with {was}; this run uses {new}: the rest of epoch "
                f"{saved.get('epoch', 0) + 1} is read from the same fraction of the new layout's streams (a few "
                "samples may repeat or be missed in it); later epochs are exact")

    def _layout(self) -> EpochLayout:
        if self.epoch_layout is None:
            raise RuntimeError("ShardStream.split_epochs must run before the stream is read")
        return self.epoch_layout

    # ------------------------------------------------------------ reading
    def slot_shards(self, global_slot: int, slots: int) -> List[Tuple[str, Optional[int]]]:
        """(url, count) of the shards slot `global_slot` of `slots` reads this epoch, in order."""
        counts = self.spec.counts
        picked = shard_order(len(self.spec.urls), self.seed, self.epoch)[global_slot::slots]
        return [(self.spec.urls[i], counts[i] if counts is not None else None) for i in picked]

    def buffers(self, shards: List[Tuple[str, Optional[int]]], start: int) -> Iterator[Tuple[int, List[Entry]]]:
        """(first position, entries) of the slot's sample buffers, from the buffer that starts at `start`.

        The slot's stream is its shards, again and again; a buffer holds `self.buffer` samples, or fewer at the
        end of a pass over the shards (so that a pass is read whole before the next begins). Shards before
        `start` are skipped unopened when their counts are known, the rest of the way undecoded.
        """
        position = 0
        while True:
            pass_start, buffer, buffer_start = position, [], position
            for url, count in shards:
                if count is not None and position + count <= start:
                    position += count
                    continue
                for entry in read_shard(url, count, self.label_key):
                    if position >= start:
                        buffer_start = buffer_start if buffer else position
                        buffer.append(entry)
                        if len(buffer) == self.buffer:
                            yield buffer_start, buffer
                            buffer = []
                    position += 1
            if buffer:
                yield buffer_start, buffer
            if position == pass_start:
                raise DataError(f"the shards {', '.join(u for u, _ in shards[:3])} hold no samples")

    def first_buffer(self, shards: List[Tuple[str, Optional[int]]], done: int) -> int:
        """Where the buffer holding position `done` starts, when the shards' counts say; else 0 (read from the
        start of the epoch, undecoded)."""
        counts = [count for _, count in shards]
        if None in counts or sum(counts) == 0:
            return 0
        per_pass = sum(counts)
        return done // per_pass * per_pass + done % per_pass // self.buffer * self.buffer

    def make_item(self, entry: Entry, index: int):
        raise NotImplementedError

    def _item(self, chunk: List[Entry], at: int, index: int) -> Tuple[Any, tuple]:
        """The item at `at` of the shuffled chunk: its own sample, or the next readable one of the chunk."""
        bad = []
        for attempt in range(min(self.max_retries, len(chunk))):
            entry = chunk[(at + attempt) % len(chunk)]
            try:
                return self.make_item(entry, index), tuple(bad)
            except UnreadableImageError:  # a sample no other may replace (a label outside the classes): stop
                raise
            except UNREADABLE_IMAGE_ERRORS as e:
                bad.append(entry.bad_record(e))
        raise UnreadableImageError(f"{len(bad)} unreadable samples in a row from {chunk[at].name}; the shards of "
                                   f"{self.spec.where} look broken")

    def __iter__(self):
        layout = self._layout()
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        if num_workers != layout.workers:
            raise RuntimeError(f"the stream was split for {layout.workers} readers but runs in {num_workers}")
        slot = (worker_id + self.start_batch) % layout.workers
        done = layout.slot_samples(slot, 0, self.start_batch)  # given before a resume: skipped, not decoded
        todo = layout.slot_samples(slot, self.start_batch, layout.batches)
        global_slot = layout.global_slot(slot)
        shards = self.slot_shards(global_slot, layout.ranks * layout.workers)
        for start, buffer in self.buffers(shards, self.first_buffer(shards, done)):
            order = np.random.default_rng([self.seed, self.epoch, global_slot, start]).permutation(len(buffer))
            shuffled = [buffer[i] for i in order]
            for at in range(max(done - start, 0), len(shuffled)):
                if todo == 0:
                    return
                yield self._item(shuffled, at, (global_slot << 32) + start + at)
                todo -= 1
            if todo == 0:
                return

    def sample_seed(self, index: int) -> int:
        """The seed of stream sample `index` this epoch (its augmentation's)."""
        return sample_seed(self.seed, self.epoch, index)
