"""Fine-tuning data with domain images: 1-channel 16-bit PNG and 4-channel .npy classes."""

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.data import DataError
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
        classes = ftdata.class_folders(tmp_path / name)
        mean, std = [0.5] * chans, [0.25] * chans
        ds = ftdata.LabelledFolder(tmp_path / name, classes, seed=1, in_chans=chans)
        assert not ds.uses_pil and ds.in_chans == chans
        ds.transform = ftdata.train_transform(CFG, mean, std, pil=ds.uses_pil)
        x, label = ds[4]
        assert x.shape == (chans, 32, 32) and label == 1
        torch.testing.assert_close(ds[4][0], x)  # seeded per (seed, epoch, index)
        ds.transform = ftdata.eval_transform(CFG, mean, std, pil=ds.uses_pil)
        x, _ = ds[4]
        assert x.shape == (chans, 32, 32)
        if name == "g16":  # a constant image stays constant: 1000 * 11 / 65535, normalised
            torch.testing.assert_close(x, torch.full_like(x, (11000 / 65535 - 0.5) / 0.25), atol=1e-4, rtol=0)
    with pytest.raises(DataError, match=r"0\.png has 1 channel\(s\) but the data set has in_chans=3"):
        ftdata.LabelledFolder(tmp_path / "g16", ["a", "b"])
