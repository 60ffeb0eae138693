"""Reading a random crop of a domain image: one open per sample, only the crop read and converted, and the
same tensors as reading the whole image, converting it to float and cropping it (the old way)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcmae.data.folder
import fcmae.data.image_io
from fcmae.data.crops import array_crop
from fcmae.data.folder import ImageFolderDataset
from fcmae.data.image_io import ImageFile, scale_to_unit
from tests.data.test_data_formats import write_png16

SIZE = 16  # the crop's output size


def whole_then_crop(ds: ImageFolderDataset, unit: np.ndarray, index: int) -> torch.Tensor:
    """Sample `index` computed the straightforward way from the whole image `unit` (C, H, W) in [0, 1]."""
    box, flip = ds.sample_crop(unit.shape[1], unit.shape[2], index)
    x = array_crop(torch.from_numpy(unit), box, SIZE)
    return ds.normalise(x.flip(-1) if flip else x)


def check_same_as_whole(root: Path, units: dict, in_chans: int, samples: int = 12) -> ImageFolderDataset:
    """Every file of `root` (`units`: file name -> its whole image in [0, 1]) gives, bit for bit, the samples
    of the full-read-then-crop way, for several crops each."""
    ds = ImageFolderDataset(root, input_size=SIZE, in_chans=in_chans, mean=[0.25] * in_chans,
                            std=[0.5] * in_chans, seed=7, logger=None)
    assert sorted(p.name for p in ds.files) == sorted(units)
    for index in range(samples * len(ds)):
        x, bad = ds[index]
        assert not bad, bad
        name = ds.files[index % len(ds)].name
        expected = whole_then_crop(ds, units[name], index)
        assert x.dtype == expected.dtype == torch.float32 and torch.equal(x, expected), (name, index)
    return ds


def test_array_crops_equal_the_whole_image_cropped(tmp_path):
    """.npy in every layout and byte order (memory-mapped), TIFFs that are memory-mapped (uncompressed, one
    piece) and decoded (compressed, tiled), 16-bit PNG: one folder of 1-channel uint16, one of 3 channels."""
    import tifffile

    rng = np.random.default_rng(0)
    grey = {}
    root = tmp_path / "grey"
    root.mkdir()

    def add(name, array):
        grey[name] = scale_to_unit(np.asarray(array)[None])
        return root / name

    a = rng.integers(0, 65536, (37, 53), dtype=np.uint16)
    np.save(add("a.npy", a), a)
    np.save(add("b_fortran.npy", a), np.asfortranarray(a))
    np.save(add("c_big_endian.npy", a), a.astype(">u2"))
    np.save(add("d_hw1.npy", a[:, ::-1]), np.ascontiguousarray(a[:, ::-1])[..., None])  # (H, W, 1)
    tifffile.imwrite(add("e_plain.tif", a[::-1]), a[::-1])
    tifffile.imwrite(add("f_big_endian.tif", a.T), a.T, byteorder=">")
    tifffile.imwrite(add("g_strips.tif", a + 1), a + 1, rowsperstrip=5)
    tifffile.imwrite(add("h_zlib.tif", a // 2), a // 2, compression="zlib")
    tifffile.imwrite(add("i_tiled.tif", a[:32, :48]), a[:32, :48], tile=(16, 16))
    Image.fromarray(a[5:]).save(add("j.png", a[5:]))
    for name in ("e_plain.tif", "f_big_endian.tif", "g_strips.tif"):  # the memory-mapped kind, as intended
        with tifffile.TiffFile(root / name) as tif:
            assert tif.series[0].dataoffset is not None, name
    check_same_as_whole(root, grey, in_chans=1)

    colour = {}
    root = tmp_path / "colour"
    root.mkdir()
    hwc = rng.integers(0, 65536, (29, 41, 3), dtype=np.uint16)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    for name, write in (("a.npy", lambda p: np.save(p, hwc)), ("b.npy", lambda p: np.save(p, chw)),
                        ("c.tif", lambda p: tifffile.imwrite(p, hwc, photometric="rgb")),
                        ("d.tif", lambda p: tifffile.imwrite(p, chw, photometric="minisblack")),
                        ("e.tif", lambda p: tifffile.imwrite(p, hwc, photometric="rgb", compression="zlib")),
                        ("f.png", lambda p: write_png16(p, hwc))):
        write(root / name)
        colour[name] = scale_to_unit(chw)
    check_same_as_whole(root, colour, in_chans=3)


def test_float_bool_and_pillow_crops_equal_the_whole_image_cropped(tmp_path):
    rng = np.random.default_rng(1)
    for dtype in ("float32", "bool"):
        root = tmp_path / dtype
        root.mkdir()
        chw = (rng.random((2, 30, 44)) * 3).astype(np.float32) if dtype == "float32" else rng.random((2, 30, 44)) > 0.5
        np.save(root / "a.npy", chw)
        check_same_as_whole(root, {"a.npy": scale_to_unit(chw)}, in_chans=2)
    root = tmp_path / "rgba"  # 8-bit, 4 channels: Pillow's file, cropped as stored
    root.mkdir()
    rgba = rng.integers(0, 256, (33, 47, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "a.png")
    check_same_as_whole(root, {"a.png": scale_to_unit(np.ascontiguousarray(rgba.transpose(2, 0, 1)))}, in_chans=4)


class OpenCounter:
    """Counts the times a file is opened: builtins.open, PIL's Image.open, np.load, tifffile.TiffFile and
    torchvision's read_file given its path; an open made inside another (np.load's own) is not counted."""

    def __init__(self, monkeypatch):
        import builtins

        import tifffile
        import torchvision.io

        self.opens, self.depth = {}, 0
        for owner, name in ((builtins, "open"), (Image, "open"), (np, "load"), (torchvision.io, "read_file")):
            monkeypatch.setattr(owner, name, self.counted(getattr(owner, name)))
        counter = self

        class CountedTiffFile(tifffile.TiffFile):
            def __init__(self, file, *args, **kwargs):
                counter.counted(super().__init__)(file, *args, **kwargs)

        monkeypatch.setattr(tifffile, "TiffFile", CountedTiffFile)

    def counted(self, fn):
        def call(*args, **kwargs):
            if self.depth == 0 and args and isinstance(args[0], (str, os.PathLike)):
                name = Path(args[0]).name
                self.opens[name] = self.opens.get(name, 0) + 1
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        return call


def test_each_sample_opens_its_file_once_and_converts_only_the_crop(tmp_path, monkeypatch):
    """The header was read twice (.npy, TIFF; a 16-bit PNG's three times, an 8-bit PNG's twice) and the whole
    image converted to float before the crop was cut; now one open, a memory map for .npy and uncompressed
    TIFF, and only the crop converted."""
    import tifffile

    a = np.random.default_rng(2).integers(0, 65536, (40, 60), dtype=np.uint16)
    deep, photos = tmp_path / "deep", tmp_path / "photos"
    deep.mkdir()
    photos.mkdir()
    np.save(deep / "a.npy", a)
    tifffile.imwrite(deep / "b.tif", a)
    tifffile.imwrite(deep / "c.tif", a, compression="zlib")
    Image.fromarray(a).save(deep / "d.png")
    Image.fromarray((a >> 8).astype(np.uint8)).save(photos / "e.png")
    Image.fromarray((a >> 8).astype(np.uint8)).save(photos / "f.jpg")
    sets = [ImageFolderDataset(root, input_size=SIZE, in_chans=1, mean=[0.5], std=[0.25], logger=None)
            for root in (deep, photos)]

    converted, decoded, loads = [], [], []
    real_scale, real_asarray, real_load = scale_to_unit, tifffile.TiffFile.asarray, np.load
    # ImageFile.read_unit, and the Pillow crops of fcmae/data/folder.py
    for module in (fcmae.data.folder, fcmae.data.image_io):
        monkeypatch.setattr(module, "scale_to_unit", lambda x: converted.append(x.shape) or real_scale(x))
    monkeypatch.setattr(tifffile.TiffFile, "asarray", lambda self, *args, **kwargs: (
        decoded.append(Path(self.filehandle.path).name) or real_asarray(self, *args, **kwargs)))
    monkeypatch.setattr(np, "load", lambda *args, **kwargs: loads.append(kwargs.get("mmap_mode")) or
                        real_load(*args, **kwargs))
    counter = OpenCounter(monkeypatch)
    for ds in sets:
        for index in range(len(ds)):
            name = ds.files[index].name
            counter.opens.clear()
            converted.clear()
            x = ds.crop_item(index, index)
            assert x.shape == (1, SIZE, SIZE)
            assert counter.opens == {name: 1}, (name, counter.opens)
            if ds is sets[0]:
                box, _ = ds.sample_crop(40, 60, index)
                assert converted == [(1, box[2], box[3])], (name, converted, box)  # the crop only
    assert loads == ["r"]  # the .npy: one memory-mapped load, never a full read
    assert decoded == ["c.tif"]  # the uncompressed TIFF is memory-mapped, only the compressed one decoded whole


def test_image_file_reads_header_then_crop_or_whole(tmp_path):
    a = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)
    np.save(tmp_path / "a.npy", a)
    with ImageFile(tmp_path / "a.npy", in_chans=1) as image:
        assert (image.info.height, image.info.width, image.info.layout) == (20, 30, "HW")
        crop = image.read(1, (2, 0, 5, 30))  # full rows: a contiguous slice of the map, still copied out
        whole = image.read(1)
    assert type(crop) is np.ndarray and type(whole) is np.ndarray and crop.flags.c_contiguous and crop.flags.owndata
    np.testing.assert_array_equal(crop[0], a[2:7])
    np.testing.assert_array_equal(whole[0], a)
    with pytest.raises(OSError, match="not a readable .npy"):
        (tmp_path / "bad.npy").write_bytes(b"nope")
        ImageFile(tmp_path / "bad.npy")
