"""`fcmae-make-shards SOURCE OUT`: image folders as WebDataset tar shards, resumable, checked by `--verify`."""

import errno
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import webdataset as wds
from PIL import Image

from fcmae.data import make_shards as ms
from tests.helpers import write_images


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        ms.main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def read_back(out: Path, split: str = "train") -> list:
    """The samples of a split, read through webdataset in _info.json's shard order."""
    info = json.loads((out / "_info.json").read_text())
    urls = [str(out / name) for name in info["splits"][split]["filenames"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def file_bytes(root: Path) -> dict:
    """{bytes: relative path} of the images below `root` (each test's images are all different)."""
    return {p.read_bytes(): p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()}


def labelled(tmp_path: Path) -> Path:
    source = tmp_path / "pets"
    write_images(source / "cats", 5, size=8, seed=0)
    write_images(source / "dogs", 4, size=8, seed=1)
    return source


def test_class_folders_become_shuffled_shards_with_labels(tmp_path):
    source, out = labelled(tmp_path), tmp_path / "shards"
    info = ms.make_shards(source, out, samples_per_shard=4, seed=0, in_chans=3, log=lambda line: None)
    assert info == json.loads((out / "_info.json").read_text())
    assert info["name"] == "pets" and info["fcmae_shards"] == 1 and info["classes"] == ["cats", "dogs"]
    assert info["splits"] == {"train": {"name": "train", "num_samples": 9, "shard_lengths": [4, 4, 1],
                                        "filenames": ["train-000000.tar", "train-000001.tar", "train-000002.tar"]}}
    samples, sources = read_back(out), file_bytes(source)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(9)]
    placed = [sources[s["png"]] for s in samples]  # every sample is a source file's bytes, unchanged
    assert sorted(placed) == sorted(sources.values())
    assert [int(s["cls"]) for s in samples] == [["cats", "dogs"].index(p.split("/")[0]) for p in placed]
    assert placed != sorted(placed)  # shuffled, so shards mix classes
    again = ms.make_shards(source, tmp_path / "seed1", samples_per_shard=4, seed=1, log=lambda line: None)
    assert again["splits"] == info["splits"]
    assert [sources[s["png"]] for s in read_back(tmp_path / "seed1")] != placed  # the order follows --seed


def test_a_flat_folder_has_no_classes_and_a_corrupt_file_goes_in_as_it_is(tmp_path):
    source = tmp_path / "flat"
    write_images(source, 5, size=8)
    (source / "zz_broken.png").write_bytes(b"\x89PNG not really")  # training skips it later
    info = ms.make_shards(source, tmp_path / "out", samples_per_shard=10, log=lambda line: None)
    assert info["classes"] == [] and info["splits"]["train"]["shard_lengths"] == [6]
    samples = read_back(tmp_path / "out")
    assert all("cls" not in s for s in samples)
    assert sorted(s["png"] for s in samples) == sorted(file_bytes(source))


def test_train_and_val_folders_give_both_splits(tmp_path):
    source = tmp_path / "split"
    for split, count in (("train", 3), ("val", 2)):
        for index, name in enumerate(("a", "b")):
            write_images(source / split / name, count, size=8, seed=10 * index + count)
    info = ms.make_shards(source, tmp_path / "out", samples_per_shard=2, log=lambda line: None)
    assert info["classes"] == ["a", "b"]
    assert {name: s["shard_lengths"] for name, s in info["splits"].items()} == {"train": [2, 2, 2], "val": [2, 2]}
    assert info["splits"]["val"]["filenames"] == ["val-000000.tar", "val-000001.tar"]
    val = read_back(tmp_path / "out", "val")
    assert [s["__key__"] for s in val] == [f"{i:09d}" for i in range(4)]  # numbered within the split
    sources = file_bytes(source / "val")
    assert sorted((sources[s["png"]].split("/")[0], int(s["cls"])) for s in val) == [("a", 0)] * 2 + [("b", 1)] * 2


def test_domain_images_keep_their_bytes(tmp_path):
    source, rng = tmp_path / "scans", np.random.default_rng(0)
    source.mkdir()
    Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)).save(source / "a.png")  # 16-bit grey PNG
    tifffile.imwrite(source / "b.TIF", rng.integers(0, 65535, (8, 8), dtype=np.uint16))
    np.save(source / "c.npy", rng.integers(0, 65535, (8, 8), dtype=np.uint16))
    ms.make_shards(source, tmp_path / "out", in_chans=1, log=lambda line: None)
    samples = read_back(tmp_path / "out")
    stored = {ext: s[ext] for s in samples for ext in s if not ext.startswith("__")}
    assert stored == {"png": (source / "a.png").read_bytes(), "tif": (source / "b.TIF").read_bytes(),
                      "npy": (source / "c.npy").read_bytes()}


def test_an_interrupted_run_finishes_byte_for_byte_like_a_clean_one(tmp_path, monkeypatch):
    source = labelled(tmp_path)
    write_images(source / "owls", 6, size=8, seed=2)
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    with monkeypatch.context() as years_ago:  # the clean run's clock, as an earlier day's would be
        years_ago.setattr(wds.writer, "time", SimpleNamespace(time=lambda: 1e9))
        ms.make_shards(source, clean, samples_per_shard=3, log=lambda line: None)

    read, calls = ms.read_source, []

    def interrupt_at_the_eighth_file(path):
        calls.append(path)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return read(path)

    monkeypatch.setattr(ms, "read_source", interrupt_at_the_eighth_file)
    with pytest.raises(KeyboardInterrupt):
        ms.make_shards(source, resumed, samples_per_shard=3, log=lambda line: None)
    monkeypatch.setattr(ms, "read_source", read)
    # two complete shards under their names, the third (samples 6..8) nowhere: never half-written under its name
    assert sorted(p.name for p in resumed.iterdir()) == ["_make_shards.json", "train-000000.tar", "train-000001.tar"]
    assert all((resumed / n).read_bytes() == (clean / n).read_bytes() for n in ("train-000000.tar", "train-000001.tar"))

    ms.make_shards(source, resumed, samples_per_shard=3, log=lambda line: None)  # finish, then break it again:
    (resumed / "_info.json").unlink()
    (resumed / "train-000004.tar").unlink()
    (resumed / "train-000002.tar.partial").write_bytes(b"what a killed run left")
    with open(resumed / "train-000003.tar", "r+b") as f:  # a shard cut short outside the command
        f.truncate(2048)
    kept = (resumed / "train-000000.tar").stat().st_mtime_ns
    lines = []
    ms.make_shards(source, resumed, samples_per_shard=3, log=lines.append)
    assert any("3 of 5 shards are complete already; writing the other 2" in line for line in lines), lines
    assert (resumed / "train-000000.tar").stat().st_mtime_ns == kept
    names = sorted(p.name for p in clean.iterdir())
    assert sorted(p.name for p in resumed.iterdir()) == names
    assert all((resumed / n).read_bytes() == (clean / n).read_bytes() for n in names)


@pytest.mark.parametrize("change, message", [
    (["--seed", "1"], "another plan, made with --seed 0 (this run: 1)"),
    (["--samples_per_shard", "2"], "another plan, made with --samples_per_shard 4 (this run: 2)"),
    ("new file", "another plan, made with another list of source files ({'train': 9} images then)"),
])
def test_an_out_of_another_plan_is_refused(tmp_path, capsys, change, message):
    source, out = labelled(tmp_path), tmp_path / "out"
    assert run(capsys, source, out, "--samples_per_shard", "4")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if change == "new file":
        write_images(source / "dogs" / "more", 1, size=8, seed=7)
        change = ["--samples_per_shard", "4"]
    code, _, err = run(capsys, source, out, *change)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_verify_passes_a_good_set_and_finds_truncated_and_miscounted_shards(tmp_path, capsys):
    source, out = labelled(tmp_path), tmp_path / "out"
    code, stdout, err = run(capsys, source, out, "--samples_per_shard", "4", "--verify", "--progress", "1")
    assert code == 0, err
    assert "ETA" in stdout and "made" in stdout and "train: 9 samples in 3 shards; per class: cats 5, dogs 4" in stdout
    assert ms.verify_shards(out, log=lambda line: None)["splits"] == {
        "train": {"shards": 3, "samples": 9, "labels": {"cats": 5, "dogs": 4}}}

    with open(out / "train-000001.tar", "r+b") as f:
        f.truncate(1700)  # inside the first sample's image bytes
    code, stdout, err = run(capsys, "--verify", out)
    assert code == 2 and "1 problem(s) in the shards of" in err and len(err.strip().splitlines()) == 1, err
    assert "train: 5 samples in 3 shards" in stdout  # what could be read
    assert "problem: train-000001.tar is corrupt or truncated (unexpected end of data): read 0 of 4 samples" in stdout

    (out / "train-000001.tar").unlink()
    ms.make_shards(source, out, samples_per_shard=4, log=lambda line: None)  # rewrites the shard
    info = json.loads((out / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"] = [4, 3, 2]
    (out / "_info.json").write_text(json.dumps(info))
    result = ms.verify_shards(out, log=lambda line: None)
    assert result["problems"] == ["train-000001.tar holds 4 samples, _info.json says 3",
                                  "train-000002.tar: sample 000000007 has the key 000000008",
                                  "train-000002.tar holds 1 samples, _info.json says 2"]


def test_shard_mb_sets_the_samples_per_shard_from_the_mean_file_size(tmp_path):
    source = labelled(tmp_path)
    sizes = [p.stat().st_size for p in source.rglob("*.png")]
    lines = []
    info = ms.make_shards(source, tmp_path / "out", None, shard_mb=3 * sum(sizes) / len(sizes) / 1e6, log=lines.append)
    assert info["splits"]["train"]["shard_lengths"] == [3, 3, 3]
    assert any("3 samples per shard" in line for line in lines)


def test_a_file_that_cannot_be_opened_stops_the_command_naming_it(tmp_path, capsys):
    source = tmp_path / "flat"
    write_images(source, 3, size=8)
    os.symlink(source / "gone.png", source / "link.png")  # a dangling link: listed, not readable
    code, _, err = run(capsys, source, tmp_path / "out")
    assert code == 2 and f"cannot read {source / 'link.png'}" in err and len(err.strip().splitlines()) == 1, err
    assert not list((tmp_path / "out").glob("*.partial"))


def test_a_full_disk_is_one_line_and_leaves_no_partial_shard(tmp_path, capsys, monkeypatch):
    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ms, "flush_to_disk", full)
    code, _, err = run(capsys, labelled(tmp_path), tmp_path / "out")
    assert code == 4 and "no space left on device" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_make_shards.json"]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("a file", "is not a folder"),
    ("empty", "no images found in"),
    ("val only", "has val/ but no train/"),
    ("loose", "holds images outside its class folders (img_000.png)"),
    ("classes differ", "the classes of train/ and val/ differ"),
    ("mixed formats", "a folder must not mix bit depths"),
    ("out inside", "is inside the source folder"),
    ("out taken", "is not empty (notes.txt) and has no _make_shards.json"),
    ("out shards", "is not empty (train-000000.tar) and has no _make_shards.json"),
    ("both sizes", "give --samples_per_shard or --shard_mb, not both"),
    ("zero", "--samples_per_shard must be 1 or more"),
    ("no source", "give SOURCE and OUT"),
    ("verify nothing", "_info.json does not exist"),
])
def test_bad_input_is_one_line(tmp_path, capsys, case, message):
    source, out = tmp_path / "src", tmp_path / "out"
    write_images(source / "cats", 2, size=8)
    argv = [source, out]
    if case == "missing":
        argv = [tmp_path / "nothing", out]
    elif case == "a file":
        argv = [source / "cats" / "img_000.png", out]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        argv = [tmp_path / "empty", out]
    elif case == "val only":
        write_images(source / "val" / "cats", 1, size=8)
    elif case == "loose":
        write_images(source, 1, size=8)
    elif case == "classes differ":
        write_images(source / "train" / "cats", 1, size=8)
        write_images(source / "val" / "dogs", 1, size=8)
    elif case == "mixed formats":
        Image.fromarray(np.zeros((8, 8), np.uint16)).save(source / "cats" / "zz_16bit.png")
    elif case == "out inside":
        argv = [source, source / "shards"]
    elif case in ("out taken", "out shards"):
        out.mkdir()
        (out / ("notes.txt" if case == "out taken" else "train-000000.tar")).write_text("mine")
    elif case == "both sizes":
        argv += ["--samples_per_shard", "5", "--shard_mb", "100"]
    elif case == "zero":
        argv += ["--samples_per_shard", "0"]
    elif case == "no source":
        argv = [out]
    elif case == "verify nothing":
        argv = ["--verify", out]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.startswith("fcmae-make-shards: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    if case not in ("out taken", "out shards"):
        assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.rglob("_info.json"))
