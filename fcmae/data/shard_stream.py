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
   When the shard count is divisible by R x W, the shards hold equal counts
   and each rank's batches per epoch divide by W, no sample is read twice in
   an epoch and none is missed (beyond the remainder the plan leaves out);
   a note says when some are read twice.
4. An unreadable sample is replaced by the next readable one of its buffer
   (and reported), as a folder replaces an unreadable file, so every slot's
   position in its stream is the count of samples it gave. A buffer whose
   samples were all lost with their shard takes its stand-ins from the next
   buffer that has a readable one.

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

import itertools
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
        note = self.uneven_note()
        if note and rank == 0:
            logger(note)
        return usable

    def uneven_note(self) -> Optional[str]:
        """A note when an epoch reads some samples twice: a reader whose shards hold fewer samples than its batches
        take starts them again (with counts known, from the first epoch's shard order; else when the shard count
        does not divide over the readers)."""
        layout, shards = self._layout(), len(self.spec.urls)
        readers = layout.ranks * layout.workers
        rule = (f"every sample is read once per epoch when each reader's shards hold what its batches take: a shard "
                f"count divisible by {readers} ({layout.ranks} process(es) x {layout.workers} reader(s)), shards of "
                f"equal size, and each process's batches per epoch ({layout.batches}) divisible by {layout.workers}")
        if self.spec.counts is None:
            return None if shards % readers == 0 else f"note: {shards} shards for {readers} readers: {rule}"
        order = shard_order(shards, self.seed, 0)
        held = [sum(self.spec.counts[i] for i in order[g::readers]) for g in range(readers)]
        taken = [layout.slot_samples(g % layout.workers, 0, layout.batches) for g in range(readers)]
        twice = sum(max(0, t - h) for t, h in zip(taken, held))
        if twice == 0:
            return None
        return (f"note: about {twice} samples are read twice per epoch (and as many others not at all): some "
                f"readers' shards hold fewer samples than their batches take, so they start them again; {rule}")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Read epoch `epoch` from batch `start_batch` on (set before the epoch's DataLoader iterator starts)."""
        self.epoch, self.start_batch = epoch, start_batch

    def positions(self, epoch: int, batch: int) -> Dict[str, Any]:
        """Where each slot of each rank stands after `batch` batches of `epoch`: the checkpoint's record."""
        layout = self._layout()
        read = [[layout.slot_samples(s, 0, batch) for s in range(layout.workers)] for _ in range(layout.ranks)]
        return {"epoch": epoch, "batch": batch, "ranks": layout.ranks, "workers": layout.workers,
                "batch_size": layout.batch_size, "samples": layout.samples, "buffer": self.buffer,
                "shards": len(self.spec.urls), "samples_read": read}

    def resume_note(self, saved: Optional[Dict[str, Any]]) -> Optional[str]:
        """A note when a checkpoint's stream record was made with another layout (None when it matches)."""
        if not saved:
            return None
        now = self.positions(saved.get("epoch", 0), saved.get("batch", 0))
        keys = ("ranks", "workers", "batch_size", "samples", "buffer", "shards")
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
                for entry in read_shard(url, count, self.label_key, self.shard_estimate()):
                    if position >= start:
                        buffer_start = buffer_start if buffer else position
                        buffer.append(entry)
                        if len(buffer) == self.buffer:
                            yield buffer_start, buffer
                            buffer = []
                    position += 1
            if buffer:
                yield buffer_start, buffer
            if position == pass_start:  # raised in a loader worker: one line through torch's re-raise
                raise UnreadableImageError(f"the shards {', '.join(u for u, _ in shards[:3])} hold no samples")

    def shard_estimate(self) -> int:
        """The samples a shard of unknown length counts for when it is lost (an even share of the data set)."""
        return max(1, self.num_samples // len(self.spec.urls))

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

    def _item(self, shuffled: List[Entry], at: int, index: int,
              spares: Optional[List[Entry]] = None) -> Tuple[Any, tuple]:
        """The item at `at` of a shuffled buffer: its own sample, or the next readable one of the buffer, or when
        the buffer has none (all lost with their shard) the one at `at` of `spares` (the next buffer that has one).

        Samples lost with their shard are passed over without a try and reported once per shard; `max_retries`
        counts samples that fail to decode.
        """
        bad: Dict[str, tuple] = {}
        tries = 0
        for entries in (shuffled,) if spares is None else (shuffled, spares):
            for k in range(len(entries)):
                entry = entries[(at + k) % len(entries)]
                if entry.error is not None:
                    bad.setdefault(entry.name, entry.bad_record(OSError(entry.error)))
                    continue
                try:
                    return self.make_item(entry, index), tuple(bad.values())
                except UnreadableImageError:  # a sample no other may replace (a label outside the classes): stop
                    raise
                except UNREADABLE_IMAGE_ERRORS as e:
                    bad.setdefault(entry.name, entry.bad_record(e))
                    tries += 1
                    if tries >= self.max_retries:
                        raise UnreadableImageError(f"{tries} unreadable samples in a row from {shuffled[at].name}; "
                                                   f"the shards of {self.spec.where} look broken") from None
        raise UnreadableImageError(f"no readable sample near {shuffled[at].name}; the shards of {self.spec.where} "
                                   "look broken")

    def _shuffled(self, start: int, buffer: List[Entry], global_slot: int) -> List[Entry]:
        order = np.random.default_rng([self.seed, self.epoch, global_slot, start]).permutation(len(buffer))
        return [buffer[i] for i in order]

    def _spares(self, buffers: Iterator[Tuple[int, List[Entry]]], ahead: List[Tuple[int, List[Entry]]],
                global_slot: int) -> List[Entry]:
        """The next buffer with a readable sample, shuffled: the stand-ins of a buffer whose samples were all lost.
        Buffers read to find it wait in `ahead` for their own turn."""
        looked = 0
        for index in itertools.count():
            if index == len(ahead):
                ahead.append(next(buffers))
            start, buffer = ahead[index]
            if any(entry.error is None for entry in buffer):
                return self._shuffled(start, buffer, global_slot)
            looked += len(buffer)
            if looked > max(self.num_samples, self.buffer):
                raise UnreadableImageError(f"no readable sample in a whole pass over shards of {self.spec.where}")

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
        buffers = self.buffers(shards, self.first_buffer(shards, done))
        ahead: List[Tuple[int, List[Entry]]] = []  # buffers read early, as stand-ins
        while todo > 0:
            start, buffer = ahead.pop(0) if ahead else next(buffers)
            shuffled = self._shuffled(start, buffer, global_slot)
            readable = any(entry.error is None for entry in buffer)
            spares = None if readable else self._spares(buffers, ahead, global_slot)
            for at in range(max(done - start, 0), len(shuffled)):
                if todo == 0:
                    return
                yield self._item(shuffled, at, (global_slot << 32) + start + at, spares)
                todo -= 1

    def sample_seed(self, index: int) -> int:
        """The seed of stream sample `index` this epoch (its augmentation's)."""
        return sample_seed(self.seed, self.epoch, index)
