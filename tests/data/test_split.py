"""`python -m fcmae.data.split SOURCE TARGET`: a labelled folder (train/ and val/) from images sorted by class."""

import os

import pytest

from fcmae.data import split
from fcmae.data.labelled import check_splits
from tests.helpers import write_images


def run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        split.main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def files_of(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_each_class_gives_one_in_five_to_val_the_same_way_every_time(tmp_path, capsys):
    source = tmp_path / "mine"
    for name, count, seed in (("cats", 11, 0), ("dogs", 2, 1), ("owls", 5, 2)):
        write_images(source / name, count, size=8, seed=seed)
    write_images(source / "owls" / "2024", 1, size=8, seed=3)  # below a class folder: keeps its place
    code, out, err = run(capsys, source, tmp_path / "photos")
    assert code == 0, err
    assert "made" in out and "3 classes, 15 train and 4 val images (hard links to" in out
    photos = tmp_path / "photos"
    assert check_splits(photos) == ["cats", "dogs", "owls"]
    counts = {name: (len(os.listdir(photos / "train" / name)), len(os.listdir(photos / "val" / name)))
              for name in ("cats", "dogs")}
    assert counts == {"cats": (9, 2), "dogs": (1, 1)}  # round(11 x 0.2) = 2; at least one each side
    every = sorted(p.split(os.sep, 1)[1] for p in files_of(photos))  # without train/ or val/
    assert every == files_of(source) and "owls/2024/img_000.png" in every
    linked = photos / "train" / "cats" / os.listdir(photos / "train" / "cats")[0]
    assert linked.stat().st_ino == (source / "cats" / linked.name).stat().st_ino  # a hard link, no copy
    code, _, _ = run(capsys, source, tmp_path / "again")
    assert code == 0 and files_of(tmp_path / "again") == files_of(photos)  # seeded: the same split


@pytest.mark.parametrize("case, message", [
    ("flat", "has no class sub-folders"),
    ("one_image", "has 1 image(s): each class needs 2 or more"),
    ("loose", "holds images outside the class folders"),
    ("split_already", "is split already"),
    ("target_taken", "exists and is not an empty folder"),
    ("fraction", "--val_fraction must be between 0 and 1"),
])
def test_folders_that_cannot_be_split_are_one_line_and_leave_nothing(tmp_path, capsys, case, message):
    source, target = tmp_path / "mine", tmp_path / "photos"
    write_images(source / "cats", 3, size=8)
    extra = []
    if case == "flat":
        source = tmp_path / "flat"
        write_images(source, 3, size=8)
    elif case == "one_image":
        write_images(source / "dogs", 1, size=8)
    elif case == "loose":
        write_images(source, 1, size=8)
    elif case == "split_already":
        (source / "train").mkdir()
        (source / "val").mkdir()
    elif case == "target_taken":
        (target / "x").mkdir(parents=True)
    elif case == "fraction":
        extra = ["--val_fraction", "1"]
    before = files_of(tmp_path)
    code, _, err = run(capsys, source, target, *extra)
    assert code == 2 and err.startswith("fcmae-split: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert files_of(tmp_path) == before and not any(p.name.startswith(".photos") for p in tmp_path.iterdir())
