"""Fine-tuning data with domain images: 1-channel 16-bit PNG and 4-channel .npy classes."""

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.data import labelled
from fcmae.data.folder import DataError
from finetune import data as ftdata

CFG = {"input_size": 32, "crop_pct": 0.875, "reprob": 0.25, "remode": "pixel", "recount": 1}


def make_split(root, write):
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            write(root / label, i + (10 if label == "b" else 0))


def test_sixteen_bit_grey_and_four_channel_npy(tmp_path):
    def png16(folder, i):
        Image.fromarray(np.full((40, 48), 1000 * i, np.uint16)).save(folder / f"{i}.png")

    def npy4(folder, i):
        np.save(folder / f"{i}.npy", np.random.default_rng(i).random((40, 48, 4), dtype=np.float32))

    for name, write, chans in (("g16", png16, 1), ("c4", npy4, 4)):
        make_split(tmp_path / name, write)
        classes = labelled.class_folders(tmp_path / name)
        mean, std = [0.5] * chans, [0.25] * chans
        ds = labelled.LabelledFolder(tmp_path / name, classes, seed=1, in_chans=chans)
        assert not ds.uses_pil and ds.in_chans == chans
        ds.transform = ftdata.train_transform(CFG, mean, std, pil=ds.uses_pil)
        x, label = ds[4]
        assert x.shape == (chans, 32, 32) and label == 1
        torch.testing.assert_close(ds[4][0], x)  # seeded per (seed, epoch, index)
        ds.transform = labelled.eval_transform(CFG, mean, std, pil=ds.uses_pil)
        x, _ = ds[4]
        assert x.shape == (chans, 32, 32)
        if name == "g16":  # a constant image stays constant: 1000 * 11 / 65535, normalised
            torch.testing.assert_close(x, torch.full_like(x, (11000 / 65535 - 0.5) / 0.25), atol=1e-4, rtol=0)
    with pytest.raises(DataError, match=r"0\.png has 1 channel\(s\) but the data set has in_chans=3"):
        labelled.LabelledFolder(tmp_path / "g16", ["a", "b"])


def test_each_sample_opens_its_file_once_and_the_train_crop_equals_the_whole_image_cropped(tmp_path, monkeypatch):
    """Fine-tuning opened each file two or three times per sample (header, then pixels) and converted the whole
    image to float before the training crop; now one open, and only the crop read and converted, bit for bit
    the same tensors as transforming the whole image."""
    import tifffile

    from fcmae.data import image_io
    from fcmae.data.crops import sample_crop
    from fcmae.data.folder import sample_seed
    from fcmae.data.image_io import scale_to_unit
    from tests.data.test_image_reading import OpenCounter

    rng = np.random.default_rng(3)
    deep, grey, photos = tmp_path / "deep", tmp_path / "grey", tmp_path / "photos"
    wholes = {}  # file name -> the whole image in [0, 1]
    for i, write in enumerate((lambda p, a: np.save(p.with_suffix(".npy"), a),
                               lambda p, a: tifffile.imwrite(p.with_suffix(".tif"), a),
                               lambda p, a: tifffile.imwrite(p.with_suffix(".tif"), a, compression="zlib"),
                               lambda p, a: Image.fromarray(a).save(p.with_suffix(".png")))):
        (deep / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 65536, (40 + i, 56 - i), dtype=np.uint16)
        write(deep / "ab"[i % 2] / f"{i}", a)
        wholes[next((deep / "ab"[i % 2]).glob(f"{i}.*")).name] = scale_to_unit(a[None])
    for label in "ab":
        (grey / label).mkdir(parents=True)  # 8-bit, 1 channel: Pillow's files, as tensors
        a = rng.integers(0, 256, (38, 45), dtype=np.uint8)
        Image.fromarray(a).save(grey / label / f"{label}.png")
        Image.fromarray(a).save(grey / label / f"{label}.jpg")
        for path in (grey / label).iterdir():
            wholes[path.name] = scale_to_unit(np.asarray(Image.open(path))[None])
        (photos / label).mkdir(parents=True)
        rgb = rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(photos / label / "x.png")
        Image.fromarray(rgb).save(photos / label / "y.jpg")
    sets = [labelled.LabelledFolder(root, ["a", "b"], seed=4, in_chans=1) for root in (deep, grey)]
    for ds in sets:
        ds.transform = ftdata.train_transform({**CFG, "reprob": 0.5}, [0.5], [0.25], pil=False)
        for epoch in range(3):
            ds.set_epoch(epoch)
            for index, (path, _) in enumerate(ds.samples):
                x, _ = ds[index]
                with labelled.seeded_rngs(sample_seed(4, epoch, index)):
                    expected = ds.transform(torch.from_numpy(wholes[path.name]))
                assert torch.equal(x, expected), (path.name, epoch)
    ds = sets[0]
    photo_ds = labelled.LabelledFolder(photos, ["a", "b"], in_chans=3)
    photo_ds.transform = ftdata.train_transform({**CFG, "aa": None, "color_jitter": 0.4}, pil=True)
    converted = []
    monkeypatch.setattr(image_io, "scale_to_unit", lambda x: converted.append(x.shape) or scale_to_unit(x))
    counter = OpenCounter(monkeypatch)
    for data, transforms in ((ds, (ds.transform, labelled.eval_transform(CFG, [0.5], [0.25], pil=False), None)),
                             (photo_ds, (photo_ds.transform, None))):
        for transform in transforms:
            data.transform = transform
            for index, (path, _) in enumerate(data.samples):
                counter.opens.clear()
                converted.clear()
                data[index]
                assert counter.opens == {path.name: 1}, (path.name, counter.opens)
                if isinstance(transform, labelled.TensorTrainTransform):
                    with labelled.seeded_rngs(sample_seed(4, data.epoch, index)):
                        box, _ = sample_crop(*wholes[path.name].shape[1:], transform.scale)
                    assert converted == [(1, box[2], box[3])], (path.name, converted, box)  # the crop only


@pytest.mark.slow
def test_an_unreadable_file_is_replaced_in_training_and_named_in_evaluation(tmp_path):
    """Fine-tuning's training set skips an unreadable file as pre-training does (the next readable file, with its
    own label, augmented as the sample would be); evaluation sets name it, also through a loader worker."""
    from torch.utils.data import DataLoader

    from fcmae.data.folder import collate_images, sample_seed
    from fcmae.data.image_io import UnreadableImageError

    rng = np.random.default_rng(0)
    for label, count in (("a", 3), ("b", 1)):
        (tmp_path / label).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    whole = (tmp_path / "b" / "0.png").read_bytes()
    bad = tmp_path / "b" / "1_bad.png"  # sample 4, the last: its stand-in is sample 0 (wrapping), of class a
    bad.write_bytes(whole[: len(whole) // 3])
    transform = ftdata.train_transform({**CFG, "aa": "rand-m9-mstd0.5-inc1", "color_jitter": None})
    train = labelled.LabelledFolder(tmp_path, ["a", "b"], transform, seed=3, skip_unreadable=True)
    plain = labelled.LabelledFolder(tmp_path, ["a", "b"], transform, seed=3)
    train.set_epoch(2), plain.set_epoch(2)
    for index in range(4):  # readable files: the same samples as without skipping
        (x, label), skipped = train[index]
        assert skipped == () and label == plain[index][1] and torch.equal(x, plain[index][0])
    (x, label), skipped = train[4]
    assert label == 0 and [path for path, _ in skipped] == [str(bad)] and skipped[0][1].startswith("OSError")
    with labelled.seeded_rngs(sample_seed(3, 2, 4)):
        assert torch.equal(x, transform(Image.open(tmp_path / "a" / "0.png").convert("RGB")))
    (images, labels), found = next(iter(DataLoader(train, batch_size=5, collate_fn=collate_images)))
    assert images.shape == (5, 3, 32, 32) and labels.tolist() == [0, 0, 0, 1, 0] and found == list(skipped)

    plain.transform = labelled.eval_transform(CFG)
    with pytest.raises(UnreadableImageError) as in_process:
        plain[4]
    message = str(in_process.value)
    assert message.startswith(f"unreadable image {bad} (OSError") and "\n" not in message
    # torch re-raises a worker's error with the worker's traceback as its text. (A spawned worker: a forked one
    # can inherit a lock held by a thread of an earlier test in this process and wait forever.)
    with pytest.raises(UnreadableImageError) as from_worker:
        list(DataLoader(plain, batch_size=5, num_workers=1, multiprocessing_context="spawn", timeout=120))
    assert str(from_worker.value) == message
