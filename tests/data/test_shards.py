"""WebDataset shards: what a data path names, reading shards, the epoch's split over ranks and workers, resume."""

import io
import json
import shutil
import tarfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from fcmae.data.folder import BadImageTracker, ImageFolderDataset, collate_images
from fcmae.data.image_io import DataError
from fcmae.data.shard_sets import LabelError, ShardEvalSet, ShardImages
from fcmae.data.shard_stream import EpochLayout, ShardStream
from fcmae.data.shards import MissingShardError, find_shards, read_shard
from tests.helpers import write_shards


class NameStream(ShardStream):
    """A stream whose items are the samples' names (or raise for unreadable ones), to see what is read."""

    def make_item(self, entry, index):
        if entry.error is not None:
            raise OSError(entry.error)
        return entry.name.rsplit(":", 1)[1].split(".")[0]


def read_epoch(stream, rank, ranks, workers, batch_size, samples, epoch=0, start_batch=0):
    """The batches (lists of keys) one rank's DataLoader gives for an epoch."""
    used = stream.split_epochs(batch_size, samples, rank, ranks, workers, logger=lambda m: None)
    stream.set_epoch(epoch, start_batch)
    loader = DataLoader(stream, batch_size=batch_size, num_workers=used, collate_fn=collate_images)
    return [list(keys) for keys, _ in loader]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    keys = write_shards(folder, shards=8, per_shard=6, size=16)
    return folder, keys


# ---------------------------------------------------------------- what a data path names
def test_a_brace_pattern_a_folder_and_one_file_name_the_shards_with_their_counts(shard_dir):
    folder, _ = shard_dir
    brace = find_shards(f"{folder}/train-{{000000..000007}}.tar")
    assert [u.rsplit("/", 1)[1] for u in brace.urls] == [f"train-{i:06d}.tar" for i in range(8)]
    assert brace.counts == (6,) * 8 and brace.num_samples == 48 and brace.classes == ("class0", "class1", "class2")
    assert find_shards(folder).urls == brace.urls
    assert find_shards(f"{folder}/train-{{000002..000003}}.tar").num_samples == 12
    assert find_shards(folder / "train-000001.tar").num_samples == 6
    assert find_shards(folder.parent) is None  # no .tar in it: an image folder


def test_a_folder_with_train_and_val_shards_gives_the_split_asked_for(tmp_path):
    write_shards(tmp_path, 2, 3, size=8, prefix="train")
    info = json.loads((tmp_path / "_info.json").read_text())
    write_shards(tmp_path, 1, 4, size=8, prefix="val", info=False)
    info["splits"]["val"] = {"name": "val", "num_samples": 4, "filenames": ["val-000000.tar"], "shard_lengths": [4]}
    (tmp_path / "_info.json").write_text(json.dumps(info))
    assert find_shards(tmp_path).num_samples == 6
    assert find_shards(tmp_path, "val").num_samples == 4
    assert find_shards(tmp_path, "test", any_split=False) is None


def test_a_spec_that_matches_no_file_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match=r"no shard matches .*none of its 3 file\(s\) exists"):
        find_shards(f"{tmp_path}/train-{{000000..000002}}.tar")
    write_shards(tmp_path, 1, 2, size=8)
    with pytest.raises(DataError, match=r"2 of the 3 shards of .* do not exist"):
        find_shards(f"{tmp_path}/train-{{000000..000002}}.tar")


def test_without_info_the_count_is_unknown_and_a_broken_info_is_an_error(tmp_path):
    write_shards(tmp_path, 2, 3, size=8, info=False)
    assert find_shards(tmp_path).counts is None
    (tmp_path / "_info.json").write_text("{not json")
    with pytest.raises(DataError, match="_info.json is not a readable shard index"):
        find_shards(tmp_path)


# ---------------------------------------------------------------- reading shards
def test_a_shard_cut_short_gives_unreadable_entries_for_what_it_lost(shard_dir, tmp_path):
    folder, keys = shard_dir
    data = (folder / "train-000000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:len(data) // 2])
    entries = list(read_shard(str(cut), 6))
    assert len(entries) == 6  # the count holds: later positions do not move
    good = [e for e in entries if e.error is None]
    assert 0 < len(good) < 6 and all(e.error is None for e in entries[:len(good)])
    lost = entries[-1]
    assert lost.name == str(cut) and "cut short after" in lost.error and lost.lost == 6 - len(good)
    unknown = list(read_shard(str(cut)))  # without a count: one entry stands for the rest
    assert len(unknown) == len(good) + 1 and unknown[-1].error is not None


def test_pipe_urls_read_the_same_samples_and_a_failing_command_is_reported(shard_dir):
    folder, _ = shard_dir
    local = [e.name.rsplit(":", 1)[1] for e in read_shard(str(folder / "train-000003.tar"))]
    piped = [e.name.rsplit(":", 1)[1] for e in read_shard(f"pipe:cat {folder}/train-000003.tar")]
    assert piped == local and len(local) == 6
    failed = list(read_shard("pipe:exit 3"))
    assert len(failed) == 1 and "cut short after 0 samples" in failed[0].error


def test_a_shard_that_vanishes_is_an_error_naming_it(tmp_path):
    with pytest.raises(MissingShardError, match=r"shard .*gone.tar does not exist"):
        list(read_shard(str(tmp_path / "gone.tar")))


# ---------------------------------------------------------------- the epoch's split
def test_layout_deals_batches_to_workers_in_turn():
    layout = EpochLayout(rank=0, ranks=1, workers=3, batch_size=4, samples=30)  # batches of 4 x 7, then 2
    assert layout.batches == 8
    assert [layout.slot_samples(s, 0, 8) for s in range(3)] == [4 * 3, 4 + 4 + 2, 4 * 2]  # b0,3,6 | b1,4,7 | b2,5
    assert sum(layout.slot_samples(s, 0, 5) + layout.slot_samples(s, 5, 8) for s in range(3)) == 30


@pytest.mark.parametrize("ranks,workers", [(1, 0), (1, 2), (2, 2), (2, 4)])
def test_an_epoch_reads_every_sample_once_when_shards_divide_evenly(shard_dir, ranks, workers):
    folder, keys = shard_dir
    spec = find_shards(folder)
    read = []
    for rank in range(ranks):
        stream = NameStream(spec, 48, seed=1, buffer=5)
        read += [k for batch in read_epoch(stream, rank, ranks, workers, 3, 48 // ranks) for k in batch]
    assert sorted(read) == sorted(keys)


def test_the_order_depends_on_seed_and_epoch_only(shard_dir):
    spec = find_shards(shard_dir[0])
    epoch0 = read_epoch(NameStream(spec, 48, seed=1, buffer=5), 0, 1, 2, 4, 48)
    assert read_epoch(NameStream(spec, 48, seed=1, buffer=5), 0, 1, 2, 4, 48) == epoch0
    assert read_epoch(NameStream(spec, 48, seed=1, buffer=5), 0, 1, 2, 4, 48, epoch=1) != epoch0
    assert read_epoch(NameStream(spec, 48, seed=2, buffer=5), 0, 1, 2, 4, 48) != epoch0
    within_shard = [int(k) // 6 for k in epoch0[0]]  # the buffer mixes the samples of a shard
    assert [int(k) for k in epoch0[0]] != sorted(int(k) for k in epoch0[0]) or len(set(within_shard)) > 1


@pytest.mark.parametrize("workers,start", [(0, 5), (2, 5), (2, 6), (3, 7)])
def test_a_resumed_epoch_gives_the_batches_an_uninterrupted_one_gives(shard_dir, workers, start):
    spec = find_shards(shard_dir[0])
    whole = read_epoch(NameStream(spec, 48, seed=3, buffer=4), 0, 1, 1, 3, 48) if workers == 0 else \
        read_epoch(NameStream(spec, 48, seed=3, buffer=4), 0, 1, workers, 3, 48)
    resumed = read_epoch(NameStream(spec, 48, seed=3, buffer=4), 0, 1, workers, 3, 48, start_batch=start)
    assert resumed == whole[start:]


def test_resume_skips_whole_shards_without_opening_them(shard_dir, tmp_path, monkeypatch):
    folder, _ = shard_dir
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    spec = find_shards(copy)
    stream = NameStream(spec, 48, seed=0, buffer=4)
    whole = read_epoch(stream, 0, 1, 0, 4, 48)
    shards = stream.slot_shards(0, 1)
    (copy / shards[0][0].rsplit("/", 1)[1]).unlink()  # the first shard of the epoch, read before batch 4
    assert read_epoch(NameStream(spec, 48, seed=0, buffer=4), 0, 1, 0, 4, 48, start_batch=4) == whole[4:]
    with pytest.raises(MissingShardError):  # from the start it is needed, and its loss stops the run
        read_epoch(NameStream(spec, 48, seed=0, buffer=4), 0, 1, 0, 4, 48)


def test_uneven_shards_are_noted_and_slots_that_run_out_start_again(shard_dir):
    folder, keys = shard_dir
    spec = find_shards(f"{folder}/train-{{000000..000004}}.tar")  # 5 shards, 30 samples
    notes = []
    stream = NameStream(spec, 30, seed=0, buffer=4)
    used = stream.split_epochs(3, 30, 0, 1, 2, logger=notes.append)
    assert used == 2 and any("about 3 samples are read twice per epoch" in n for n in notes)  # 12 held, 15 taken
    stream.set_epoch(0)
    batches = [list(k) for k, _ in DataLoader(stream, batch_size=3, num_workers=2, collate_fn=collate_images)]
    assert len(batches) == 10 and all(len(b) == 3 for b in batches)


def test_more_workers_than_shards_are_capped_and_too_few_shards_for_the_ranks_is_an_error(shard_dir):
    spec = find_shards(f"{shard_dir[0]}/train-{{000000..000002}}.tar")
    notes = []
    assert NameStream(spec, 18).split_epochs(3, 9, 0, 2, 4, logger=notes.append) == 1
    assert "using 1 worker(s)" in notes[0]
    with pytest.raises(DataError, match="3 shard\\(s\\) for 4 processes"):
        NameStream(spec, 18).split_epochs(3, 4, 0, 4, 1)


def test_unreadable_samples_are_replaced_from_their_buffer_and_reported(shard_dir, tmp_path):
    folder, _ = shard_dir
    data = (folder / "train-000000.tar").read_bytes()
    (tmp_path / "train-000000.tar").write_bytes(data[:len(data) // 2])  # cut short: its rest is unreadable
    for i in range(1, 4):
        shutil.copy(folder / f"train-{i:06d}.tar", tmp_path)
    info = json.loads((folder / "_info.json").read_text())
    info["splits"]["train"].update(filenames=[f"train-{i:06d}.tar" for i in range(4)], shard_lengths=[6] * 4)
    (tmp_path / "_info.json").write_text(json.dumps(info))
    stream = NameStream(find_shards(tmp_path), 24, seed=0, buffer=24)
    stream.split_epochs(4, 24, 0, 1, 0)
    stream.set_epoch(0)
    items = list(stream)
    assert len(items) == 24  # every position gives a sample
    bad = [b for _, reported in items for b in reported]
    assert bad and all("cut short" in reason for _, reason, _ in bad)
    tracker = BadImageTracker(24, 0.5, logger=lambda m: None)
    tracker.update(bad)
    assert tracker.lost == bad[0][2] and len(tracker.seen) == 1  # one line for the shard, its lost samples counted


def _read_on_gloo(rank: int, folder: str, store: str, result: str) -> None:
    """One rank of a 2-process gloo group: read epoch 1 with 2 loader workers; rank 0 writes all ranks' keys."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        keys = [k for batch in read_epoch(NameStream(find_shards(folder), 48, seed=5, buffer=4), rank, 2, 2, 3, 24,
                                          epoch=1) for k in batch]
        gathered = [None, None]
        dist.all_gather_object(gathered, keys)
        if rank == 0:
            with open(result, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_on_gloo_read_every_sample_once(shard_dir, tmp_path):
    folder, keys = shard_dir
    result = tmp_path / "keys.json"
    mp.start_processes(_read_on_gloo, args=(str(folder), str(tmp_path / "store"), str(result)), nprocs=2,
                       start_method="spawn")
    per_rank = json.loads(result.read_text())
    assert [len(k) for k in per_rank] == [24, 24]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)


# ---------------------------------------------------------------- the pre-training set
def test_shard_images_crop_as_the_folder_does_for_16_bit_samples(tmp_path):
    keys = write_shards(tmp_path / "shards", 2, 4, size=24, kind="png16")
    folder = tmp_path / "folder"
    folder.mkdir()
    for entry in read_shard(str(tmp_path / "shards" / "train-000000.tar")):
        (folder / entry.name.rsplit(":", 1)[1]).write_bytes(entry.data)
    shards = ShardImages(find_shards(tmp_path / "shards"), 8, input_size=16, in_chans=1, mean="auto", std="auto",
                         logger=lambda m: None)
    assert shards.dtype == "uint16" and shards.bit_depth == 16 and len(shards.mean) == 1
    images = ImageFolderDataset(folder, input_size=16, in_chans=1, mean=shards.mean, std=shards.std,
                                logger=lambda m: None)
    with images.open(0) as image:
        from_folder = images.crop_image(image, 7)
    entry = next(iter(read_shard(str(tmp_path / "shards" / "train-000000.tar"))))
    with entry.open("auto", 1, "uint16") as image:
        from_shard = shards.crop_image(image, 7)
    assert torch.equal(from_folder, from_shard) and from_shard.shape == (1, 16, 16)
    assert shards.fixed_batch(3).shape == (3, 1, 16, 16)
    assert len(keys) == 8


@pytest.mark.parametrize("ranks,workers", [(1, 2), (3, 1), (2, 3)])
def test_an_evaluation_split_gives_every_sample_once_even_with_fewer_shards_than_readers(tmp_path, ranks, workers):
    keys = write_shards(tmp_path, shards=2, per_shard=5, size=8, classes=10)  # label = sample number
    seen = []
    for rank in range(ranks):
        split = ShardEvalSet(find_shards(tmp_path), 10)
        split.split(rank, ranks)
        split.transform = lambda picture: 0
        part = [int(label) for _, labels in DataLoader(split, batch_size=2, num_workers=workers) for label in labels]
        assert part, f"rank {rank} of {ranks} got no sample"
        seen += part
    assert sorted(seen) == [int(k) for k in keys]


def test_batches_that_do_not_deal_evenly_are_noted_even_with_even_shards(shard_dir):
    spec = find_shards(shard_dir[0])  # 8 shards of 6
    notes = []
    NameStream(spec, 48).split_epochs(5, 48 - 48 % 5, 0, 1, 2, logger=notes.append)  # 9 batches of 5 for 2 workers
    assert any("read twice" in n and "divisible by 2" in n for n in notes)
    notes.clear()
    NameStream(spec, 48).split_epochs(3, 48, 0, 1, 2, logger=notes.append)  # 16 batches of 3: 24 per reader
    assert notes == []
    unknown = find_shards(f"pipe:cat {shard_dir[0]}/train-{{000000..000004}}.tar")  # 5 shards, no counts
    NameStream(unknown, 30).split_epochs(3, 30, 0, 1, 2, logger=notes.append)
    assert any("5 shards for 2 readers" in n for n in notes)


def test_a_shard_lost_whole_is_replaced_from_the_next_buffer_and_resume_stays_exact(shard_dir, tmp_path):
    folder, keys = shard_dir
    shutil.copytree(folder, tmp_path / "s")
    (tmp_path / "s" / "train-000003.tar").write_bytes(b"")  # empty: its 6 samples are lost
    spec = find_shards(tmp_path / "s")
    stream = NameStream(spec, 48, seed=0, buffer=6)  # a buffer is one shard: one buffer holds nothing readable
    stream.split_epochs(4, 48, 0, 1, 0)
    stream.set_epoch(0)
    items = list(stream)
    assert len(items) == 48 and all(isinstance(k, str) for k, _ in items)
    bad = [b for _, reported in items for b in reported]
    tracker = BadImageTracker(48, 0.2, logger=lambda m: None)
    tracker.update(bad)
    assert tracker.lost == 6 and list(tracker.seen) == [str(tmp_path / "s" / "train-000003.tar")]
    whole = read_epoch(NameStream(spec, 48, seed=0, buffer=6), 0, 1, 2, 4, 48)
    for start in (1, 5, 9):
        assert read_epoch(NameStream(spec, 48, seed=0, buffer=6), 0, 1, 2, 4, 48, start_batch=start) == whole[start:]


def test_a_shard_cut_inside_a_header_is_reported_not_read_as_shorter(shard_dir, tmp_path):
    data = (shard_dir[0] / "train-000000.tar").read_bytes()
    members = list(read_shard(str(shard_dir[0] / "train-000000.tar")))
    with tarfile.open(shard_dir[0] / "train-000000.tar") as tar:
        header = tar.getmembers()[4].offset  # where the 5th member's header begins
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:header + 100])  # tarfile alone reads this as a shorter, whole archive
    entries = list(read_shard(str(cut), None, estimate=6))
    assert entries[-1].error is not None and "cut short" in entries[-1].error and entries[-1].lost == 6
    assert len(entries) < len(members) + 1


def test_a_label_that_is_not_a_class_index_stops_with_its_name(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    with wds.TarWriter(str(tmp_path / "val-000000.tar")) as writer:
        writer.write({"__key__": "000000000", "png": buffer.getvalue(), "cls": b"cat"})
    with pytest.raises(LabelError, match=r"val-000000.tar:000000000.png has .cls 'cat', not a class index"):
        ShardEvalSet(find_shards(tmp_path / "val-000000.tar"), 3)
